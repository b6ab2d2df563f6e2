"""Transport security and authentication: TLS credentials, the shared token, safe listening.

The server serves TLS with a certificate and key, and with a client CA it requires every
client to present a certificate signed by that CA (mutual TLS). Independently, a shared
token may be required: each call then carries the metadata ``authorization: Bearer <token>``,
which :class:`gapaware.server.auth.TokenAuthInterceptor` checks in constant time.

How the client attaches the token: over TLS as gRPC call credentials
(``grpc.access_token_call_credentials``); gRPC sends call credentials only on secure
channels, so on a plaintext channel an interceptor adds the same header itself. A token
without TLS travels in clear text: fine on loopback or a private network you trust,
otherwise add TLS.

The token comes from a file (``--token-file``) or the ``GAPAWARE_TOKEN`` environment
variable, never from a flag value, which ``ps`` shows to every user of the machine. A client
built in Python (:func:`client_security`, used by :class:`gapaware.WorkerClient`) reads the
same variables as the command line for whatever it is not given.
"""
from __future__ import annotations

import collections
import dataclasses
import ipaddress
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

TOKEN_ENV = "GAPAWARE_TOKEN"
CLIENT_ENV = {"tls_ca": "GAPAWARE_TLS_CA", "tls_cert": "GAPAWARE_TLS_CERT", "tls_key": "GAPAWARE_TLS_KEY",
              "token_file": "GAPAWARE_TOKEN_FILE"}
"""The variables of the command line's ``--tls-ca``, ``--tls-cert``, ``--tls-key`` and ``--token-file``."""
TOKEN_METADATA_KEY = "authorization"

log = logging.getLogger("gapaware.security")


class SecurityConfigError(ValueError):
    """Credentials or a listening address that cannot be used; the message says what to change."""


def bearer(token: str) -> str:
    """The ``authorization`` metadata value that carries ``token``."""
    return f"Bearer {token}"


def load_token(token_file: Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The shared token: the contents of ``token_file`` if given, else ``$GAPAWARE_TOKEN``, else None.

    Surrounding whitespace (a trailing newline) is stripped; an empty token is refused, since it
    would authenticate nobody while looking as if it did.
    """
    if token_file is not None:
        try:
            text = Path(token_file).read_text()
            mode = Path(token_file).stat().st_mode
        except OSError as error:
            raise SecurityConfigError(f"cannot read the token file {token_file}: {error.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the token file %s is readable by other users: chmod 600 %s", token_file, token_file)
        source = f"the token file {token_file}"
    elif TOKEN_ENV in environ:
        text, source = environ[TOKEN_ENV], f"${TOKEN_ENV}"
    else:
        return None
    token = text.strip()
    if not token:
        raise SecurityConfigError(f"{source} is empty: put a long random secret in it "
                                  "(e.g. `openssl rand -hex 32`)")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in token):
        raise SecurityConfigError(f"{source} holds characters that cannot travel in gRPC metadata: "
                                  "use printable ASCII without spaces (e.g. `openssl rand -hex 32`)")
    return token


def read_pem(path: Path, flag: str) -> bytes:
    """The bytes of a PEM file named by ``flag``, or an error that names the flag and the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"cannot read {flag} {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"{flag} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback literals (127.0.0.0/8, ::1); other names count as remote."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerSecurity:
    """What the server requires of its clients. The default: nothing, allowed on loopback only."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    token: str | None = field(default=None, repr=False)
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityConfigError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SecurityConfigError("--tls-client-ca (mutual TLS) needs the server's own --tls-cert and --tls-key")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check_listen(self, host: str) -> None:
        """Refuses to listen on a non-loopback ``host`` with neither TLS nor a token, unless insecure."""
        if not (is_loopback(host) or self.insecure or self.tls or self.token):
            raise SecurityConfigError(
                f"refusing to listen on {host} without TLS or a token: anyone who can reach this port "
                "could join and push gradients into the model. Set GAPAWARE_TOKEN or --token-file, add "
                "--tls-cert/--tls-key, or pass --insecure if the network is private and trusted."
            )

    def describe(self, host: str) -> str:
        """How clients are admitted, for the server's first log line, with a warning where it is weak."""
        transport = "mutual TLS" if self.tls_client_ca else "TLS" if self.tls else "plaintext"
        text = f"{transport}, {'token required' if self.token else 'no token'}"
        if self.token and not self.tls and not is_loopback(host):
            text += "; WARNING: the token travels in clear text, add --tls-cert/--tls-key unless the network is trusted"
        return text

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for the listening port, or None for plaintext."""
        if not self.tls:
            return None
        pair = (read_pem(self.tls_key, "--tls-key"), read_pem(self.tls_cert, "--tls-cert"))
        client_ca = read_pem(self.tls_client_ca, "--tls-client-ca") if self.tls_client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches the server: plaintext by default; TLS once ``tls_ca`` is given."""

    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityConfigError("a client certificate needs both --tls-cert and --tls-key")
        if self.tls_cert is not None and self.tls_ca is None:
            raise SecurityConfigError("a client certificate (mutual TLS) needs --tls-ca, the CA that "
                                      "signed the server's certificate")

    def client_kwargs(self) -> dict:
        """The keyword arguments of :class:`gapaware.WorkerClient` that carry this security."""
        return dataclasses.asdict(self)

    def open_channel(self, address: str, options: list[tuple[str, int]]) -> grpc.Channel:
        """A channel to ``address`` that carries this security on every call."""
        if self.tls_ca is not None:
            key = read_pem(self.tls_key, "--tls-key") if self.tls_key else None
            cert = read_pem(self.tls_cert, "--tls-cert") if self.tls_cert else None
            credentials = grpc.ssl_channel_credentials(read_pem(self.tls_ca, "--tls-ca"), key, cert)
            if self.token:
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.access_token_call_credentials(self.token))
            return grpc.secure_channel(address, credentials, options=options)
        channel = grpc.insecure_channel(address, options=options)
        if not self.token:
            return channel
        host = address.rsplit(":", 1)[0]
        if not is_loopback(host):
            log.warning("sending the token to %s without TLS: it travels in clear text; give --tls-ca "
                        "unless the network is trusted", address)
        return grpc.intercept_channel(channel, TokenMetadataInterceptor(self.token))


def client_security(*, tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                    tls_key: str | Path | None = None, token: str | None = None,
                    environ: Mapping[str, str] = os.environ) -> ClientSecurity:
    """A client's security as the command line would build it: each setting not given (None) is read
    from its variable (:data:`CLIENT_ENV`), and the token from the file ``$GAPAWARE_TOKEN_FILE`` names,
    or else from ``$GAPAWARE_TOKEN`` (:func:`load_token`). An empty variable counts as unset."""
    def path(given: str | Path | None, name: str) -> Path | None:
        value = given if given is not None else environ.get(CLIENT_ENV[name]) or None
        return None if value is None else Path(value)

    if token is None:
        token = load_token(path(None, "token_file"), environ)
    return ClientSecurity(tls_ca=path(tls_ca, "tls_ca"), tls_cert=path(tls_cert, "tls_cert"),
                          tls_key=path(tls_key, "tls_key"), token=token)


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                            "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class TokenMetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                               grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call of a plaintext channel."""

    def __init__(self, token: str) -> None:
        self._entry = (TOKEN_METADATA_KEY, bearer(token))

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._entry]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
