"""The security flags of the ``gapaware`` commands and the objects they build.

The token itself is never a flag (``ps`` shows every process's arguments to every user):
``--token-file`` names a file that holds it, or ``GAPAWARE_TOKEN`` holds it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import click

from gapaware.common.security import TOKEN_ENV, ClientSecurity, SecurityConfigError, ServerSecurity, load_token

PEM = click.Path(exists=True, dir_okay=False, path_type=Path)

# Not checked at parse time: load_token() says clearly when it is missing, and recipes that name a
# secret mounted only at run time (/run/secrets/...) still parse.
_token_file = click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                           help=f"File holding the shared token (default: ${TOKEN_ENV} if set). "
                                "Every call must carry it.")
_server_tls = [
    click.option("--tls-cert", type=PEM, default=None, help="The server's certificate (PEM): serve TLS."),
    click.option("--tls-key", type=PEM, default=None, help="The private key of --tls-cert (PEM)."),
    click.option("--tls-client-ca", type=PEM, default=None,
                 help="Require client certificates signed by this CA (PEM): mutual TLS."),
]
_server_tls_ca = click.option("--tls-ca", type=PEM, default=None,
                              help="CA that signed the server's certificate (PEM): connect with TLS.")


def _apply(options, fn):
    return functools.reduce(lambda f, option: option(f), reversed(options), fn)


def server_security_options(fn):
    """``--tls-cert``, ``--tls-key``, ``--tls-client-ca``, ``--token-file``, ``--insecure``."""
    insecure = click.option("--insecure", is_flag=True,
                            help="Allow listening on a non-loopback address with neither TLS nor a token.")
    return _apply([*_server_tls, _token_file, insecure], fn)


def client_security_options(fn):
    """``--tls-ca``, ``--tls-cert``, ``--tls-key`` (this client's, for mutual TLS), ``--token-file``."""
    return _apply([
        _server_tls_ca,
        click.option("--tls-cert", type=PEM, default=None,
                     help="This client's certificate (PEM), for a server that requires mutual TLS."),
        click.option("--tls-key", type=PEM, default=None, help="The private key of --tls-cert (PEM)."),
        _token_file,
    ], fn)


def local_security_options(fn):
    """``gapaware train``: the server's TLS files, the CA its workers trust, and the token file."""
    return _apply([*_server_tls, _server_tls_ca, _token_file], fn)


def _usage_errors(build):
    @functools.wraps(build)
    def wrapper(values: dict):
        try:
            return build(values)
        except SecurityConfigError as error:
            raise click.UsageError(str(error)) from None
    return wrapper


@_usage_errors
def server_security_from_options(values: dict) -> ServerSecurity:
    """Pops the server's security flags out of ``values`` and builds what they ask for."""
    return ServerSecurity(tls_cert=values.pop("tls_cert"), tls_key=values.pop("tls_key"),
                          tls_client_ca=values.pop("tls_client_ca"), insecure=values.pop("insecure"),
                          token=load_token(values.pop("token_file")))


@_usage_errors
def client_security_from_options(values: dict) -> ClientSecurity:
    """Pops a client's security flags out of ``values`` and builds what they ask for."""
    return ClientSecurity(tls_ca=values.pop("tls_ca"), tls_cert=values.pop("tls_cert"),
                          tls_key=values.pop("tls_key"), token=load_token(values.pop("token_file")))
