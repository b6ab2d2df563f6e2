"""``WorkerClient(address)`` reads the token and TLS files from the same ``GAPAWARE_*`` variables as the
command line, for whatever it is not given (common/security.py ``client_security``)."""
from __future__ import annotations

from types import SimpleNamespace

import click
import grpc
import pytest
import torch

from gapaware import WorkerClient
from gapaware.cli import main
from gapaware.common.security import CLIENT_ENV, ServerSecurity
from gapaware.server.app import ServerOptions
from tests.inprocess import small_state
from tests.pki import CertificateAuthority

TOKEN = "c0ffee00c0ffee00c0ffee00c0ffee00"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = CertificateAuthority(tmp_path_factory.mktemp("pki"), "cluster-ca")
    return SimpleNamespace(ca=ca.cert, server=ca.issue("server"), worker=ca.issue("worker"))


def one_push(address: str, **given) -> int:
    with WorkerClient(address, timeout=10, **given) as client:
        client.join()
        version, theta = client.pull()
        result = client.push(torch.zeros_like(theta), version)
        client.leave()
        return result.version


def refused(address: str, **given) -> grpc.RpcError:
    with WorkerClient(address, timeout=10, **given) as client, pytest.raises(grpc.RpcError) as error:
        client.status()
    return error.value


def test_the_variables_are_the_command_lines():
    worker = {max(o.opts, key=len): o.envvar for o in main.commands["worker"].params if isinstance(o, click.Option)}
    assert CLIENT_ENV == {"tls_ca": worker["--tls-ca"], "tls_cert": worker["--tls-cert"],
                          "tls_key": worker["--tls-key"], "token_file": worker["--token-file"]}


def test_a_client_reads_the_token_from_the_environment_as_the_refusal_says(servers, monkeypatch, tmp_path):
    server = servers("--task", "digits-mlp", env={"GAPAWARE_TOKEN": TOKEN})
    error = refused(server.address)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "set GAPAWARE_TOKEN" in error.details()

    monkeypatch.setenv("GAPAWARE_TOKEN", TOKEN)
    assert one_push(server.address) == 1
    assert refused(server.address, token="not-the-token").code() == grpc.StatusCode.UNAUTHENTICATED, \
        "a token given explicitly wins"

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    monkeypatch.setenv("GAPAWARE_TOKEN", "not-the-token")
    monkeypatch.setenv("GAPAWARE_TOKEN_FILE", str(token_file))
    assert one_push(server.address) == 2, "$GAPAWARE_TOKEN_FILE wins over $GAPAWARE_TOKEN, as --token-file does"
    monkeypatch.setenv("GAPAWARE_TOKEN_FILE", "")
    assert refused(server.address).code() == grpc.StatusCode.UNAUTHENTICATED, "an empty variable is unset"


def test_a_client_reads_its_tls_files_from_the_environment(inprocess_servers, pki, monkeypatch):
    server = inprocess_servers(small_state(50), ServerOptions(security=ServerSecurity(
        tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca, token=TOKEN)))
    monkeypatch.setenv("GAPAWARE_TOKEN", TOKEN)
    assert refused(server.address).code() == grpc.StatusCode.UNAVAILABLE, "plaintext to a TLS server"

    monkeypatch.setenv("GAPAWARE_TLS_CA", str(pki.ca))
    monkeypatch.setenv("GAPAWARE_TLS_CERT", str(pki.worker.cert))
    monkeypatch.setenv("GAPAWARE_TLS_KEY", str(pki.worker.key))
    assert one_push(server.address) == 1
    assert one_push(server.address, tls_cert=pki.server.cert, tls_key=pki.server.key) == 2, \
        "files given explicitly win (the server's certificate is from the same CA)"
