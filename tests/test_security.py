"""TLS, mutual TLS and token authentication, and the refusal to listen unprotected on a network."""
import json
import subprocess
from types import SimpleNamespace

import grpc
import pytest
import torch
from click.testing import CliRunner
from cryptography import x509

from gapaware import WorkerClient
from gapaware.cli import main
from gapaware.command_line import gapaware_command
from gapaware.common.transport import encode
from gapaware.common.security import ClientSecurity, SecurityConfigError, ServerSecurity, is_loopback, load_token
from gapaware.local_run import LocalSecurity
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.server.app import ServerOptions
from tests.inprocess import small_state
from tests.pki import CertificateAuthority

TOKEN = "3f1c0f6a9b2e4d7c8a5b6e1f0d2c3b4a"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority(directory, "cluster-ca"), CertificateAuthority(directory, "other-ca")
    return SimpleNamespace(
        ca=ca.cert, server=ca.issue("server"), worker=ca.issue("worker"), other_ca=other.cert,
        rogue=other.issue("rogue"), misnamed=ca.issue("misnamed", [x509.DNSName("elsewhere.example")]),
    )


def serve(inprocess_servers, **security):
    return inprocess_servers(small_state(50), ServerOptions(security=ServerSecurity(**security)))


def train_one_step(address: str, **client_kwargs) -> int:
    """Join, pull, push, leave through every kind of RPC (unary, server-, client-, bidi-streaming)."""
    with WorkerClient(address, timeout=10, **client_kwargs) as client:
        client.join()
        version, theta = client.pull()
        result, version, _ = client.push_pull(torch.ones_like(theta), base_version=version)
        client.push(torch.ones_like(theta), base_version=version)
        client.heartbeat()
        client.leave()
        return client.status().version


def refusal(address: str, **client_kwargs) -> grpc.RpcError:
    with WorkerClient(address, timeout=10, **client_kwargs) as client, pytest.raises(grpc.RpcError) as refused:
        client.join()
    return refused.value


def test_token_is_required_on_every_call_and_compared_exactly(inprocess_servers):
    server = serve(inprocess_servers, token=TOKEN)

    assert train_one_step(server.address, token=TOKEN) == 2
    for wrong in (None, TOKEN[:-1], TOKEN + "0", TOKEN.upper()):
        error = refusal(server.address, token=wrong)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, wrong
        assert ("requires a token" if wrong is None else "wrong token") in error.details()
    guess = [("authorization", "Bearer guess")]
    frames = [pb.PushFrame(header=pb.PushHeader(worker_id=1, tensor=encode(torch.zeros(50))[0]))]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        for call in (lambda: stub.Status(pb.StatusRequest(), metadata=guess),
                     lambda: list(stub.Pull(pb.PullRequest(worker_id=1), metadata=guess)),
                     lambda: list(stub.Push(iter(frames), metadata=guess))):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.state.version == 2 and not server.state.live_workers()


def test_tls_serves_clients_that_trust_its_ca_and_no_others(inprocess_servers, pki):
    server = serve(inprocess_servers, tls_cert=pki.server.cert, tls_key=pki.server.key)

    assert train_one_step(server.address, tls_ca=pki.ca) == 2
    assert refusal(server.address).code() == grpc.StatusCode.UNAVAILABLE, "plaintext client"
    assert refusal(server.address, tls_ca=pki.other_ca).code() == grpc.StatusCode.UNAVAILABLE, "untrusted server"


def test_a_certificate_for_another_host_name_is_refused(inprocess_servers, pki):
    server = serve(inprocess_servers, tls_cert=pki.misnamed.cert, tls_key=pki.misnamed.key)
    assert refusal(server.address, tls_ca=pki.ca).code() == grpc.StatusCode.UNAVAILABLE


def test_token_travels_as_call_credentials_over_tls(inprocess_servers, pki):
    server = serve(inprocess_servers, tls_cert=pki.server.cert, tls_key=pki.server.key, token=TOKEN)

    assert train_one_step(server.address, tls_ca=pki.ca, token=TOKEN) == 2
    assert refusal(server.address, tls_ca=pki.ca).code() == grpc.StatusCode.UNAUTHENTICATED
    assert refusal(server.address, tls_ca=pki.ca, token="x" * 32).code() == grpc.StatusCode.UNAUTHENTICATED


def test_mutual_tls_requires_a_client_certificate_from_the_cluster_ca(inprocess_servers, pki):
    server = serve(inprocess_servers, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca)

    assert train_one_step(server.address, tls_ca=pki.ca, tls_cert=pki.worker.cert, tls_key=pki.worker.key) == 2
    assert refusal(server.address, tls_ca=pki.ca).code() == grpc.StatusCode.UNAVAILABLE, "no client certificate"
    assert refusal(server.address, tls_ca=pki.ca, tls_cert=pki.rogue.cert,
                   tls_key=pki.rogue.key).code() == grpc.StatusCode.UNAVAILABLE, "certificate from another CA"
    assert server.state.version == 2


def test_status_command_passes_tls_and_token(inprocess_servers, pki, tmp_path):
    server = serve(inprocess_servers, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca,
                   token=TOKEN)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    flags = ["status", "--server", server.address, "--json", "--tls-ca", str(pki.ca),
             "--tls-cert", str(pki.worker.cert), "--tls-key", str(pki.worker.key)]

    shown = CliRunner().invoke(main, [*flags, "--token-file", str(token_file)])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["policy"] == "gap-aware"
    refused = CliRunner().invoke(main, flags)
    assert refused.exit_code != 0 and "UNAUTHENTICATED" in refused.output


# -- the token's source -------------------------------------------------------------------------

def test_token_comes_from_the_file_else_the_environment(tmp_path, caplog):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    token_file.chmod(0o600)
    assert load_token(token_file, environ={"GAPAWARE_TOKEN": "from-env"}) == TOKEN
    assert load_token(None, environ={"GAPAWARE_TOKEN": "from-env"}) == "from-env"
    assert load_token(None, environ={}) is None
    assert not caplog.records
    token_file.chmod(0o644)
    load_token(token_file, environ={})
    assert "readable by other users" in caplog.text


@pytest.mark.parametrize("content, message", [("", "is empty"), ("\n  \n", "is empty"),
                                               ("two words", "cannot travel"), ("tök", "cannot travel")])
def test_unusable_tokens_are_refused(tmp_path, content, message):
    token_file = tmp_path / "token"
    token_file.write_text(content)
    with pytest.raises(SecurityConfigError, match=message):
        load_token(token_file, environ={})
    with pytest.raises(SecurityConfigError, match=message):
        load_token(None, environ={"GAPAWARE_TOKEN": content})
    with pytest.raises(SecurityConfigError, match="cannot read the token file"):
        load_token(tmp_path / "absent", environ={})


def test_incomplete_tls_settings_are_refused(pki, tmp_path):
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    with pytest.raises(SecurityConfigError, match="both --tls-cert and --tls-key"):
        ServerSecurity(tls_cert=pki.server.cert)
    with pytest.raises(SecurityConfigError, match="needs the server's own"):
        ServerSecurity(tls_client_ca=pki.ca)
    with pytest.raises(SecurityConfigError, match="needs --tls-ca"):
        ClientSecurity(tls_cert=pki.worker.cert, tls_key=pki.worker.key)
    with pytest.raises(SecurityConfigError, match="not a PEM file"):
        ServerSecurity(tls_cert=not_pem, tls_key=pki.server.key).credentials()
    with pytest.raises(SecurityConfigError, match="trust"):
        LocalSecurity(tls_cert=pki.server.cert, tls_key=pki.server.key)


# -- safe defaults ------------------------------------------------------------------------------

@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("::", False), ("10.0.0.5", False), ("head-node", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_listening_beyond_loopback_needs_tls_a_token_or_insecure(pki):
    ServerSecurity().check_listen("127.0.0.1")
    with pytest.raises(SecurityConfigError, match="without TLS or a token.*--insecure"):
        ServerSecurity().check_listen("0.0.0.0")
    ServerSecurity(token=TOKEN).check_listen("0.0.0.0")
    ServerSecurity(tls_cert=pki.server.cert, tls_key=pki.server.key).check_listen("0.0.0.0")
    ServerSecurity(insecure=True).check_listen("0.0.0.0")
    assert "travels in clear text" in ServerSecurity(token=TOKEN).describe("0.0.0.0")
    assert ServerSecurity(token=TOKEN).describe("127.0.0.1") == "plaintext, token required"
    assert ServerSecurity(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca,
                          token=TOKEN).describe("0.0.0.0") == "mutual TLS, token required"


@pytest.fixture
def captured_server_runs(monkeypatch):
    """Replaces the server's run so the command is parsed and checked but never listens."""
    runs = []
    monkeypatch.setattr("gapaware.server.app.run_server", lambda config, options: runs.append(options))
    return runs


def test_server_command_refuses_an_unprotected_network_bind(captured_server_runs, monkeypatch, tmp_path):
    monkeypatch.delenv("GAPAWARE_TOKEN", raising=False)
    refused = CliRunner().invoke(main, ["server", "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "without TLS or a token" in refused.output
    assert "--insecure" in refused.output and captured_server_runs == []

    assert CliRunner().invoke(main, ["server", "--host", "0.0.0.0", "--insecure"]).exit_code == 0
    monkeypatch.setenv("GAPAWARE_TOKEN", TOKEN)
    assert CliRunner().invoke(main, ["server", "--host", "0.0.0.0"]).exit_code == 0
    assert [options.security.token for options in captured_server_runs] == [None, TOKEN]
    assert TOKEN not in repr(captured_server_runs), "the token must not show up in logs or reprs"


def test_server_command_passes_its_transport_limits(captured_server_runs):
    assert CliRunner().invoke(main, ["server", "--chunk-timeout", "5", "--receive-window", "0", "--max-workers", "3",
                                     "--request-timeout", "4", "--min-transfer-rate", "2",
                                     "--max-concurrent-rpcs", "7"]).exit_code == 0
    (options,) = captured_server_runs
    assert (options.chunk_timeout, options.receive_window_mib) == (5.0, 0)
    assert (options.max_workers, options.request_timeout, options.min_transfer_rate,
            options.max_concurrent_rpcs) == (3, 4.0, 2.0, 7)


def test_train_hands_security_to_its_processes_as_files_never_the_token(pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    security = LocalSecurity(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca,
                             tls_ca=pki.ca, token_file=token_file)
    assert security.server_flags() == ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                                       "--tls-client-ca", str(pki.ca), "--token-file", str(token_file)]
    assert security.worker_flags() == ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.server.cert),
                                       "--tls-key", str(pki.server.key), "--token-file", str(token_file)]
    assert security.client().token == TOKEN


def test_train_runs_over_mutual_tls_with_a_token(pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    out = tmp_path / "run"
    done = subprocess.run(
        gapaware_command("train", "--task", "digits-mlp", "--workers", "1", "--max-updates", "20", "--eval-every", "10",
                      "--out", str(out), "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                      "--tls-client-ca", str(pki.ca), "--tls-ca", str(pki.ca), "--token-file", str(token_file)),
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr + (out / "server.log").read_text()
    assert "after 20 updates" in done.stdout
    assert "mutual TLS, token required" in (out / "server.log").read_text()


def test_client_warns_when_its_token_would_cross_a_network_in_clear_text(caplog):
    ClientSecurity(token=TOKEN).open_channel("127.0.0.1:7070", []).close()
    assert not caplog.records
    ClientSecurity(token=TOKEN).open_channel("10.0.0.5:7070", []).close()  # channels connect lazily: no traffic
    assert "travels in clear text" in caplog.text and TOKEN not in caplog.text


def test_health_answers_without_the_token_while_the_service_refuses_it(inprocess_servers):
    """Kubernetes probes and load balancers send no token: health is the one open service."""
    from gapaware.worker.health import check_health

    server = serve(inprocess_servers, token=TOKEN)
    assert check_health(server.address, timeout=5) == "SERVING"
    with WorkerClient(server.address, timeout=10) as client, pytest.raises(grpc.RpcError) as refused:
        client.status()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_command_asks_a_tls_server_over_tls(inprocess_servers, pki):
    server = serve(inprocess_servers, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca,
                   token=TOKEN)
    flags = ["health", "--server", server.address]
    trusted = CliRunner().invoke(main, [*flags, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.worker.cert),
                                        "--tls-key", str(pki.worker.key)])
    assert trusted.exit_code == 0 and "SERVING" in trusted.output, trusted.output
    plaintext = CliRunner().invoke(main, flags)
    assert plaintext.exit_code == 1 and "UNREACHABLE" in plaintext.output, plaintext.output


def test_refused_calls_are_logged_at_most_once_per_interval(caplog):
    from gapaware.server.auth import RefusalLog
    now = [100.0]
    refusals = RefusalLog(interval=10.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="gapaware.server.auth"):
        for _ in range(50):
            refusals.refused("/gapaware.v2.ParameterServer/Status", "ipv4:10.0.0.9:5000", "wrong token")
            now[0] += 0.01
        now[0] += 10.0
        refusals.refused("/gapaware.v2.ParameterServer/Status", "ipv4:10.0.0.9:5000", "wrong token")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert "more calls refused" not in lines[0] and "(49 more calls refused since the last line)" in lines[1]


def test_a_flood_of_wrong_tokens_logs_one_line(inprocess_servers, caplog):
    server = serve(inprocess_servers, token=TOKEN)
    with caplog.at_level("WARNING", logger="gapaware.server.auth"):
        for _ in range(20):
            assert refusal(server.address, token="wrong").code() == grpc.StatusCode.UNAUTHENTICATED
    assert sum("refused" in record.getMessage() for record in caplog.records) == 1
