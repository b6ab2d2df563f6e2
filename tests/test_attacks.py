"""The attacks of issue 21 against a real server process (loopback only), each with a worker that keeps
training through it.

Every test starts a ``gapaware server`` process, attacks it as the review found it could be attacked,
and asserts that a worker with the right credentials has each of its pushes applied within
:data:`PUSH_SECONDS` during and after the attack, and that the server's peak memory (``VmHWM`` of its
process) grew by less than the bound docs/SECURITY.md states for that attack.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gapaware import WorkerClient
from gapaware.common.security import bearer
from gapaware.common.transport import MAX_MESSAGE_BYTES, encode, serialize_frame
from gapaware.processes import NotReady, ServerProcess
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.worker.client import JoinInfo
from gapaware.worker.retry import RetryPolicy, call_with_retries
from tests.h2_peer import RawCall, RawPeer, grpc_message, open_calls
from tests.pki import CertificateAuthority
from tests.test_observability import free_port

TOKEN = "5d0b1c7e2f8a4e6b9c3d1a0f7e6b5c4d"
PUSH_SECONDS = 5.0
"""A push of a worker with the right credentials is applied within this, attack or not."""
SERVICE = "/gapaware.v2.ParameterServer/"
MIB = 2**20
GRPC_DEADLINE_EXCEEDED, GRPC_RESOURCE_EXHAUSTED, GRPC_UNAUTHENTICATED = "4", "8", "16"  # grpc-status values


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), in MiB, and its threads."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {"rss": int(fields["VmRSS"].split()[0]) / 1024, "peak": int(fields["VmHWM"].split()[0]) / 1024,
            "threads": int(fields["Threads"])}


class Trainer:
    """A worker with the right credentials, stepped by the test: join, pull, then push-and-pull steps of
    a zero gradient, each call retried as the worker's training loop retries it (with a shorter backoff)."""

    def __init__(self, address: str, **client_kwargs) -> None:
        self.client = WorkerClient(address, timeout=30, **client_kwargs)
        self._policy = RetryPolicy(initial_backoff=0.05, max_backoff=0.5, give_up_after=60)
        self.info = self._retry(lambda: self.client.join(), "join")
        self.version, self.theta = self._retry(lambda: self.client.pull(), "pull")
        self.steps: list[float] = []

    def _retry(self, call, what: str):
        return call_with_retries(call, self._policy, what=what)

    def step(self) -> float:
        """One push, applied; returns how long it took, retries included."""
        started, seq = time.monotonic(), self.client.next_seq()
        grad = torch.zeros_like(self.theta)
        result, self.version, self.theta = self._retry(
            lambda: self.client.push_pull(grad, self.version, seq=seq), f"push {seq}")
        assert result.applied, result
        self.steps.append(time.monotonic() - started)
        return self.steps[-1]

    def train_until(self, done, at_least: int = 3, timeout: float = 120.0) -> None:
        """Steps until ``done()`` and at least ``at_least`` times, each within :data:`PUSH_SECONDS`."""
        deadline, count = time.monotonic() + timeout, 0
        while count < at_least or not done():
            assert time.monotonic() < deadline, "the attack did not end"
            elapsed = self.step()
            assert elapsed < PUSH_SECONDS, f"a push took {elapsed:.1f}s (steps so far: {self.steps})"
            count += 1

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def repeated(attack, rounds: int):
    """Runs ``attack()`` ``rounds`` times in a thread while the block runs; yields a function that tells
    whether it is over. Whatever ``attack`` raised is raised at the end of the block."""
    failures: list[BaseException] = []

    def run():
        try:
            for _ in range(rounds):
                attack()
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            failures.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield lambda: not thread.is_alive()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the attack did not end"
    if failures:
        raise failures[0]


def ended_within(peers: list[RawPeer], seconds: float) -> list[RawCall]:
    """Waits until every call of ``peers`` has ended (at most ``seconds``); returns the calls."""
    deadline = time.monotonic() + seconds
    calls = [call for peer in peers for call in peer.calls]
    while any(call.ended_at is None for call in calls) and time.monotonic() < deadline:
        time.sleep(0.02)
    open_ones = [call for call in calls if call.ended_at is None]
    assert not open_ones, f"{len(open_ones)} of {len(calls)} calls still open after {seconds}s"
    return calls


def close_all(peers: list[RawPeer]) -> None:
    for peer in peers:
        peer.close()


# -- item 1: calls that never send their message ---------------------------------------------------

def unfinished_calls(count: int, token: str | None = None) -> list[RawCall]:
    """Unary calls that send their headers and never their message, or part of one and then end."""
    methods = ("Status", "Join", "Heartbeat", "Leave")
    return [RawCall(SERVICE + methods[i % len(methods)], token=token,
                    **({} if i % 2 else {"data": grpc_message(b"\x08", announced=100), "end": True}))
            for i in range(count)]


def test_unauthenticated_calls_are_refused_before_their_message_and_hold_no_slot(servers):
    """1,100 calls without the token, over and over: each is refused as soon as its headers arrive,
    so none counts against --max-concurrent-rpcs (here 64) and the worker never waits for a slot."""
    server = servers("--task", "digits-mlp", "--max-updates", "100000", "--max-concurrent-rpcs", "64",
                     env={"GAPAWARE_TOKEN": TOKEN})
    before = memory_mib(server.proc.pid)
    trainer = Trainer(server.address, token=TOKEN)
    refused: list[RawCall] = []

    def attack():
        peers = open_calls(server.address, unfinished_calls(1100))
        try:
            refused.extend(ended_within(peers, 10))
        finally:
            close_all(peers)

    with repeated(attack, rounds=3) as over:
        trainer.train_until(over)
    trainer.train_until(lambda: True)
    assert len(refused) == 3300 and {call.status for call in refused} == {GRPC_UNAUTHENTICATED}
    grown = memory_mib(server.proc.pid)["peak"] - before["peak"]
    print(f"3,300 unauthenticated unfinished calls: server peak memory +{grown:.0f} MiB, "
          f"slowest push {max(trainer.steps):.2f}s")
    assert grown < 100
    trainer.close()


def test_over_tls_too_calls_without_the_token_hold_no_slot(servers, tmp_path):
    """The same attack over TLS, where the review found it worked as well: TLS admits anyone who
    trusts the server, the token is what keeps the slots."""
    authority = CertificateAuthority(tmp_path, "attack-ca")
    issued = authority.issue("server")
    server = servers("--task", "digits-mlp", "--max-updates", "100000", "--max-concurrent-rpcs", "64",
                     "--tls-cert", str(issued.cert), "--tls-key", str(issued.key), env={"GAPAWARE_TOKEN": TOKEN})
    trainer = Trainer(server.address, token=TOKEN, tls_ca=authority.cert)
    peers = open_calls(server.address, unfinished_calls(300), tls_ca=authority.cert)
    try:
        trainer.train_until(lambda: all(call.ended_at for peer in peers for call in peer.calls))
        calls = ended_within(peers, 10)
    finally:
        close_all(peers)
    assert {call.status for call in calls} == {GRPC_UNAUTHENTICATED}
    trainer.train_until(lambda: True)
    trainer.close()


def test_an_authenticated_peer_holds_a_slot_only_until_the_request_timeout(servers):
    """Without a token every peer is a client: 200 calls that never send their message fill the 32
    slots, the rest are refused at once, and the slots are free again --request-timeout (2 s) later;
    the worker, refused meanwhile, retries and trains."""
    server = servers("--task", "digits-mlp", "--max-updates", "100000", "--max-concurrent-rpcs", "32",
                     "--request-timeout", "2")
    trainer = Trainer(server.address)
    peers = open_calls(server.address, [RawCall(SERVICE + "Status") for _ in range(200)])
    try:
        trainer.train_until(lambda: all(call.ended_at for peer in peers for call in peer.calls))
        calls = ended_within(peers, 10)
    finally:
        close_all(peers)
    statuses = [call.status for call in calls]
    assert statuses.count(GRPC_DEADLINE_EXCEEDED) <= 32 and set(statuses) == {GRPC_DEADLINE_EXCEEDED,
                                                                              GRPC_RESOURCE_EXHAUSTED}
    held = [call for call in calls if call.status == GRPC_DEADLINE_EXCEEDED]
    assert "did not arrive within 2s" in held[0].message
    assert max(call.ended_at for call in held) - min(peer.opened_at for peer in peers) < 2 + 3
    trainer.train_until(lambda: True)
    trainer.close()


# -- item 2: memory held by messages that never end ------------------------------------------------

def big_unfinished_calls(count: int, announced: int, sent: int, token: str | None = None) -> list[RawCall]:
    """Calls announcing a message of ``announced`` bytes and sending the first ``sent`` of them, never more
    (all sending the same bytes object)."""
    data = grpc_message(b"\0" * sent, announced=announced)
    return [RawCall(SERVICE + "Status", data, token=token) for _ in range(count)]


def test_unauthenticated_big_messages_are_never_buffered(servers):
    """700 calls without the token, each announcing an 8 MiB message and sending 7.6 MiB of it (5.2 GB
    in all): refused at their headers, only what their connections' receive windows let through
    before that (4 MiB each) is ever taken in."""
    server = servers("--task", "digits-mlp", "--max-updates", "100000", env={"GAPAWARE_TOKEN": TOKEN})
    before = memory_mib(server.proc.pid)
    trainer = Trainer(server.address, token=TOKEN)
    peers = open_calls(server.address, big_unfinished_calls(700, 8 * MIB, int(7.6 * MIB)))
    try:
        trainer.train_until(lambda: all(call.ended_at for peer in peers for call in peer.calls))
        calls = ended_within(peers, 30)
    finally:
        close_all(peers)
    trainer.train_until(lambda: True)
    assert {call.status for call in calls} == {GRPC_UNAUTHENTICATED}
    grown = memory_mib(server.proc.pid)["peak"] - before["peak"]
    print(f"700 unauthenticated 7.6 MiB partial messages: server peak memory +{grown:.0f} MiB")
    assert grown < 256, "more than the 8 connections' receive windows (4 MiB each) and the calls' state"
    trainer.close()


@pytest.mark.slow
def test_an_authenticated_peer_buffers_at_most_one_message_per_call_slot(servers):
    """Without a token: 20 calls announcing an 8 MiB message, then 700 announcing one as big as allowed
    and sending all but a few bytes of it. Only the --max-concurrent-rpcs (64) admitted calls are read, each for at most
    --request-timeout (3 s); the server's memory grows by less than 64 messages, and a message
    announced bigger than a chunk is refused at its length prefix."""
    server = servers("--task", "digits-mlp", "--max-updates", "100000", "--max-concurrent-rpcs", "64",
                     "--request-timeout", "3")
    before = memory_mib(server.proc.pid)
    trainer = Trainer(server.address)
    largest = MAX_MESSAGE_BYTES
    oversized = open_calls(server.address, big_unfinished_calls(20, 8 * MIB, int(7.6 * MIB)))
    try:
        calls = ended_within(oversized, 10)
    finally:
        close_all(oversized)
    peers = open_calls(server.address, big_unfinished_calls(700, largest, largest - 100))
    try:
        trainer.train_until(lambda: all(call.ended_at for peer in peers for call in peer.calls))
        calls += ended_within(peers, 60)
    finally:
        close_all(peers)
    trainer.train_until(lambda: True)
    statuses = [call.status for call in calls]
    assert statuses.count(GRPC_DEADLINE_EXCEEDED) <= 64 + 1  # the trainer's calls take slots too
    assert set(statuses) <= {GRPC_DEADLINE_EXCEEDED, GRPC_RESOURCE_EXHAUSTED}
    assert all("larger than max" in call.message for call in calls[:20]), calls[0]
    grown = memory_mib(server.proc.pid)["peak"] - before["peak"]
    print(f"720 authenticated partial messages: server peak memory +{grown:.0f} MiB (bound {64 * largest / MIB:.0f})")
    assert grown < 64 * largest / MIB + 100
    trainer.close()


# -- item 5: pushes that trickle in ----------------------------------------------------------------

def raw_push(channel: grpc.Channel):
    return channel.stream_stream(SERVICE + "Push", request_serializer=serialize_frame,
                                 response_deserializer=pb.PullFrame.FromString)


def trickled(joined: pb.JoinReply | JoinInfo, version: int, numel: int, gap: float, stop: threading.Event, **tensor):
    """A push of ``joined``'s worker that sends one 4 KiB chunk every ``gap`` seconds; ``tensor``
    overrides its TensorHeader fields."""
    header, chunks = encode(torch.zeros(numel), chunk_bytes=4096)
    for name, value in tensor.items():
        setattr(header, name, value)
    yield pb.PushFrame(header=pb.PushHeader(worker_id=joined.worker_id, worker_secret=joined.worker_secret,
                                            base_version=version, tensor=header))
    for chunk in chunks:
        if stop.wait(gap):
            return
        yield chunk


def test_a_push_that_trickles_in_holds_its_gradient_slot_only_until_its_deadline(servers):
    """Two workers of the attacker's push one 4 KiB chunk every 1.5 s, under --chunk-timeout 2 (so
    each chunk is in time) and over and over: each push is ended at its deadline, 2 s plus its 38 KB
    at 1 MiB/s, so both gradient slots are never held longer. A push announcing 1-byte chunks (or
    any below 4 KiB on average) is refused before it is admitted."""
    server = servers("--task", "digits-mlp", "--max-updates", "100000", "--chunk-timeout", "2",
                     "--min-transfer-rate", "1")
    before = memory_mib(server.proc.pid)
    trainer = Trainer(server.address)
    numel = trainer.theta.numel()
    stop = threading.Event()
    attackers = [WorkerClient(server.address, timeout=30) for _ in range(2)]
    ended: list[tuple[grpc.RpcError, float]] = []

    def attack(client: WorkerClient):
        joined = client.join()
        with grpc.insecure_channel(server.address) as channel:
            while not stop.is_set():
                version, _ = client.pull()
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as refused:
                    list(raw_push(channel)(trickled(joined, version, numel, 1.5, stop), timeout=30))
                ended.append((refused.value, time.monotonic() - started))

    threads = [threading.Thread(target=attack, args=(client,), daemon=True) for client in attackers]
    for thread in threads:
        thread.start()
    try:
        trainer.train_until(lambda: len(ended) >= 4)
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as tiny:
            list(raw_push(channel)(trickled(trainer.info, trainer.version, numel, 0, threading.Event(),
                                            chunk_count=numel * 4), timeout=10))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    trainer.train_until(lambda: True)
    deadline = 2 + numel * 4 / MIB
    for error, seconds in ended[:4]:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "push too slow" in error.details()
        assert seconds < deadline + 1.5, f"a trickling push held its slot {seconds:.1f}s (deadline {deadline:.1f}s)"
    assert tiny.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"header announces {numel * 4} chunks" in tiny.value.details()
    grown = memory_mib(server.proc.pid)["peak"] - before["peak"]
    print(f"trickling pushes: slowest push of the worker {max(trainer.steps):.2f}s, "
          f"server peak memory +{grown:.0f} MiB")
    assert grown < 50
    for client in [trainer, *attackers]:
        client.close()


# -- item 6: pulls that are never read -------------------------------------------------------------

def stalled_pulls(joined: JoinInfo, count: int) -> list[RawCall]:
    """Pulls for ``joined``'s worker whose replies are never read past the first flow-control window."""
    request = pb.PullRequest(worker_id=joined.worker_id, worker_secret=joined.worker_secret).SerializeToString()
    return [RawCall(SERVICE + "Pull", grpc_message(request), end=True) for _ in range(count)]


def test_a_pull_that_is_never_read_holds_its_copy_only_until_its_send_deadline(servers):
    """Eight workers of the attacker's each start five pulls of a 32 MiB model and read none of them:
    one pull per worker is sent at a time (the other four are refused at once), and each is cut off at
    its deadline, 2 s plus 32 MiB at 32 MiB/s, which frees its copy of the model and the worker's
    place: it can pull again."""
    server = servers("--task", "tests.attack_task:large", "--policy", "asgd", "--momentum", "0",
                     "--max-updates", "100000", "--eval-every", "100000", "--chunk-timeout", "2",
                     "--min-transfer-rate", "32")
    trainer = Trainer(server.address)
    before = memory_mib(server.proc.pid)
    model_mib = trainer.theta.numel() * 4 / MIB
    deadline = 2 + model_mib / 32
    puppets = [WorkerClient(server.address, timeout=30) for _ in range(8)]
    calls = [call for puppet in puppets for call in stalled_pulls(puppet.join(), 5)]
    peers = open_calls(server.address, calls, per_connection=5)
    waiting = list(puppets)

    def all_pull_again() -> bool:
        for puppet in list(waiting):
            try:
                puppet.pull()
            except grpc.RpcError as refused:
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
                return False
            waiting.remove(puppet)
        return True

    try:
        started = min(peer.opened_at for peer in peers)
        trainer.train_until(all_pull_again)
        freed_after = time.monotonic() - started
        held = [call for call in calls if call.status is None]
        refused = [call for call in calls if call.status is not None]
        assert len(held) == 8 and all(call.received for call in held)
        assert {call.status for call in refused} == {GRPC_RESOURCE_EXHAUSTED} and len(refused) == 32
        assert "still being sent" in refused[0].message
    finally:
        close_all(peers)
    trainer.train_until(lambda: True)
    grown = memory_mib(server.proc.pid)["peak"] - before["peak"]
    print(f"40 stalled pulls of a {model_mib:.0f} MiB model: server peak memory +{grown:.0f} MiB "
          f"(bound {8 * model_mib:.0f} MiB held by them), copies freed after {freed_after:.1f}s "
          f"(deadline {deadline:.1f}s), slowest push {max(trainer.steps):.2f}s")
    assert freed_after < deadline + 6  # noticed between the worker's steps and the puppets' own 32 MiB pulls
    assert grown < 8 * model_mib + 4 * model_mib  # theirs, and the worker's own pushes and pulls
    for client in [trainer, *puppets]:
        client.close()


# -- item 7: a token holder acting as another worker -------------------------------------------------

def test_a_token_holder_cannot_act_as_another_worker(servers):
    """The attacker has the token and a worker id of its own, and knows the victim's id (ids are
    sequential): every call it makes as the victim, with its own secret or none, is refused, and the
    victim trains on, its sequence numbers and lease untouched."""
    server = servers("--task", "digits-mlp", "--max-updates", "100000", env={"GAPAWARE_TOKEN": TOKEN})
    victim = Trainer(server.address, token=TOKEN)
    victim.step()
    with WorkerClient(server.address, timeout=10, token=TOKEN) as attacker:
        own = attacker.join()
        version, _ = attacker.pull()
        stub = pb_grpc.ParameterServerStub(channel := grpc.insecure_channel(server.address))
        metadata = [("authorization", bearer(TOKEN))]
        header, chunks = encode(torch.zeros(victim.theta.numel()))
        real = victim.info.worker_secret
        for secret in (own.worker_secret, b"", real[:-1] + bytes([real[-1] ^ 1])):
            as_victim = {"worker_id": victim.info.worker_id, "worker_secret": secret}
            push = [pb.PushFrame(header=pb.PushHeader(**as_victim, base_version=victim.version, seq=2**64 - 1,
                                                      tensor=header)), *chunks]
            calls = {
                "push": lambda: list(raw_push(channel)(iter(push), timeout=10, metadata=metadata)),
                "pull": lambda: list(stub.Pull(pb.PullRequest(**as_victim), timeout=10, metadata=metadata)),
                "heartbeat": lambda: stub.Heartbeat(pb.HeartbeatRequest(**as_victim), timeout=10, metadata=metadata),
                "leave": lambda: stub.Leave(pb.LeaveRequest(**as_victim), timeout=10, metadata=metadata),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (name, refused.value)
                assert f"does not present worker {victim.info.worker_id}'s secret" in refused.value.details()
            header, chunks = encode(torch.zeros(victim.theta.numel()))
        channel.close()
        victim.train_until(lambda: True)
        workers = {w.worker_id: w for w in attacker.status().workers}
    assert workers[victim.info.worker_id].pushes == len(victim.steps), "the victim is still registered, pushing"
    victim.close()


# -- item 8: Joins without end ---------------------------------------------------------------------

def test_joins_are_capped_in_number_and_in_what_they_make_the_server_keep(servers):
    """Joins with 7 MiB hostnames (over the message limit), with 3.9 MiB ones, 300 with 300 characters
    and 10 with control characters are all refused; only --max-workers (8) workers are
    registered at once; status stays quick and the log small."""
    server = servers("--task", "digits-mlp", "--max-updates", "100000", "--max-workers", "8")
    before = memory_mib(server.proc.pid)
    trainer = Trainer(server.address)
    stub = pb_grpc.ParameterServerStub(channel := grpc.insecure_channel(
        server.address, options=[("grpc.max_send_message_length", 16 * MIB)]))
    refusals = {}
    for hostname, count in (("h" * 7 * MIB, 20), ("h" * int(3.9 * MIB), 20), ("h" * 300, 300),
                            ("evil\n2026 gapaware.server INFO forged", 10)):
        for _ in range(count):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Join(pb.JoinRequest(hostname=hostname), timeout=30)
            refusals.setdefault((len(hostname), refused.value.code()), refused.value.details())
        trainer.step()
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert [code for _, code in refusals] == [grpc.StatusCode.RESOURCE_EXHAUSTED, invalid, invalid, invalid]
    assert "at most 253 are allowed" in refusals[(300, grpc.StatusCode.INVALID_ARGUMENT)]
    joined = [stub.Join(pb.JoinRequest(hostname=f"w{i}"), timeout=10) for i in range(7)]
    with pytest.raises(grpc.RpcError) as full:
        stub.Join(pb.JoinRequest(hostname="ninth"), timeout=10)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-workers" in full.value.details()
    started = time.monotonic()
    assert len(stub.Status(pb.StatusRequest(), timeout=10).workers) == 8
    assert time.monotonic() - started < 1
    stub.Leave(pb.LeaveRequest(worker_id=joined[0].worker_id, worker_secret=joined[0].worker_secret), timeout=10)
    stub.Join(pb.JoinRequest(hostname="ninth"), timeout=10)  # a place freed up
    trainer.train_until(lambda: True)
    channel.close()
    grown = memory_mib(server.proc.pid)["peak"] - before["peak"]
    log_bytes = server.log_path.stat().st_size
    print(f"350 refused Joins: server peak memory +{grown:.0f} MiB, log {log_bytes} bytes")
    assert grown < 100 and log_bytes < 64 * 1024 and "forged" not in server.log()
    trainer.close()


# -- item 10: a second server on the same port -----------------------------------------------------

def test_a_second_server_on_a_taken_port_exits_and_says_why(servers):
    first = servers("--task", "digits-mlp", "--max-updates", "100000", "--lease-seconds", "600")
    trainer = Trainer(first.address)  # its lease outlasts the second server's start on a loaded machine
    with pytest.raises(NotReady) as refused:
        servers("--task", "digits-mlp", "--port", str(first.port), name="second")
    assert f"could not listen on 127.0.0.1:{first.port}: the port is taken" in str(refused.value)
    assert "Traceback" not in str(refused.value)
    trainer.train_until(lambda: True)
    assert len(trainer.client.status().workers) == 1
    trainer.close()


# -- item 11: idle connections, health Watch, the metrics port --------------------------------------

def open_file_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    return int(line.split()[3])


def idle_connections(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.slow
def test_a_thousand_idle_connections_leave_room_for_workers(tmp_path):
    """The server starts with the common soft limit of 1,024 descriptors and raises it to the hard
    limit; 1,100 connections that never say a word then take no descriptor a worker needs, and the
    server closes each once its handshake timeout (10 s) has passed."""
    server = ServerProcess(tmp_path, "--task", "digits-mlp", "--max-updates", "100000",
                           prefix=("prlimit", "--nofile=1024:8192", "--"))
    sockets: list[socket.socket] = []
    try:
        assert open_file_limit(server.proc.pid) == 8192
        before = memory_mib(server.proc.pid)
        sockets = idle_connections(server.port, 1100)
        trainer = Trainer(server.address)  # a connection opened after them
        deadline = time.monotonic() + 10 + 10
        trainer.train_until(lambda: all(closed_by_peer(s) for s in sockets[::50]) or time.monotonic() > deadline)
        assert all(closed_by_peer(s) for s in sockets[::50]), "idle connections outlived the handshake timeout"
        grown = memory_mib(server.proc.pid)["peak"] - before["peak"]
        print(f"1,100 idle connections: server peak memory +{grown:.0f} MiB, slowest push {max(trainer.steps):.2f}s")
        assert grown < 100
        trainer.close()
    finally:
        for sock in sockets:
            sock.close()
        server.kill()


def test_health_watch_streams_the_serving_status_behind_the_token(servers):
    server = servers("--task", "digits-mlp", "--max-updates", "100000", env={"GAPAWARE_TOKEN": TOKEN})
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            next(health.Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10, metadata=[("authorization", bearer(TOKEN))])
        assert next(watch).status == serving
        watch.cancel()


def test_the_metrics_port_serves_from_a_bounded_pool_and_drops_idle_connections(servers):
    metrics_port = free_port()
    server = servers("--task", "digits-mlp", "--max-updates", "100000", "--metrics-port", str(metrics_port))
    trainer = Trainer(server.address)
    before = memory_mib(server.proc.pid)
    sockets = idle_connections(metrics_port, 200)
    try:
        trainer.train_until(lambda: all(closed_by_peer(s) for s in sockets[:8]), timeout=30)
        threads = memory_mib(server.proc.pid)["threads"]
        assert threads <= before["threads"] + 2, f"{threads} threads, {before['threads']} before"
        assert all(closed_by_peer(s) for s in sockets)
    finally:
        for sock in sockets:
            sock.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        assert b"gapaware_pushes_accepted" in response.read()
    trainer.close()
