"""Every bad input gets a precise status code and changes nothing.

Each test sends one kind of bad request to a live server (its real gRPC stack, in this
process), checks the status code and message, then checks that the parameters, version,
sample count and policy state are exactly as before, that a pull returns the same version
and parameters, and that the worker can still push a good gradient.
"""
from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest
import torch

from gapaware import WorkerClient
from gapaware.common.transport import all_finite
from gapaware.common.layout import ParamLayout
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.server.app import ServerOptions
from gapaware.server.policies import POLICIES
from gapaware.server.servicer import SERVICE_NAME
from gapaware.worker.client import CHANNEL_OPTIONS
from tests.frames import push_stream
from tests.inprocess import StateSnapshot, small_state

NUMEL = 3000
CHUNK_BYTES = 4096  # 12000 bytes of float32: three chunks


def gradient(seed: int = 1) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(seed))


def push_frames(worker_id: int, base_version: int, grad: torch.Tensor, **header) -> list[pb.PushFrame]:
    """A valid push stream of three chunks; ``header`` overrides PushHeader fields, ``tensor`` TensorHeader's."""
    return push_stream(worker_id, base_version, grad, chunk_bytes=CHUNK_BYTES, **header)


class Harness:
    """A live server, a joined worker that pulled, a raw stub for crafted messages and an observer."""

    def __init__(self, server) -> None:
        self.server, self.state = server, server.state
        self._exits = contextlib.ExitStack()
        channel = self._exits.enter_context(grpc.insecure_channel(
            server.address, options=[("grpc.max_send_message_length", 16 * 1024 * 1024), *CHANNEL_OPTIONS[:1]]))
        self.stub = pb_grpc.ParameterServerStub(channel)
        self.worker = self._exits.enter_context(WorkerClient(server.address, chunk_bytes=CHUNK_BYTES, timeout=20))
        self.observer = self._exits.enter_context(WorkerClient(server.address, timeout=20))
        joined = self.worker.join()
        self.worker_id, self.secret = joined.worker_id, joined.worker_secret
        self.observer.join()
        self.version, self.theta = self.worker.pull()

    def frames(self, grad: torch.Tensor | None = None, **header) -> list[pb.PushFrame]:
        worker_id, base_version = header.pop("worker_id", self.worker_id), header.pop("base_version", self.version)
        header.setdefault("worker_secret", self.secret)
        return push_frames(worker_id, base_version, gradient() if grad is None else grad, **header)

    @contextlib.contextmanager
    def unchanged(self):
        """Asserts that what runs inside changes neither the state nor what a pull returns."""
        before, (observed_version, observed) = StateSnapshot.of(self.state), self.observer.pull()
        yield
        before.assert_same(StateSnapshot.of(self.state))
        version, theta = self.observer.pull()
        assert version == observed_version and torch.equal(theta, observed)

    def refused(self, call, code: grpc.StatusCode, message: str) -> None:
        with self.unchanged(), pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == code, refused.value.details()
        assert message in refused.value.details()
        self.assert_worker_can_still_push()

    def push_refused(self, frames: list[pb.PushFrame], code: grpc.StatusCode, message: str) -> None:
        self.refused(lambda: list(self.stub.Push(iter(frames), timeout=20)), code, message)

    def assert_worker_can_still_push(self) -> None:
        result = self.worker.push(gradient(), base_version=self.version)
        assert result.applied and result.version == self.version + 1
        self.version, self.theta = self.worker.pull()

    def close(self) -> None:
        self._exits.close()


@pytest.fixture
def harness(inprocess_servers):
    def start(**state_options) -> Harness:
        options = state_options.pop("options", None)
        return Harness(inprocess_servers(small_state(NUMEL, **state_options), options))

    started: list[Harness] = []
    yield lambda **kw: started.append(start(**kw)) or started[-1]
    for h in started:
        h.close()


INVALID = grpc.StatusCode.INVALID_ARGUMENT


# -- the tensor stream ---------------------------------------------------------------------------

def test_wrong_element_count(harness):
    h = harness()
    h.push_refused(h.frames(torch.zeros(NUMEL - 1)), INVALID,
                   f"tensor has {NUMEL - 1} elements but {NUMEL} are expected")


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 7])
def test_unknown_dtype(harness, dtype):
    h = harness()
    h.push_refused(h.frames(tensor={"dtype": dtype}), INVALID, f"unknown tensor dtype {dtype}")


def test_dtype_that_does_not_match_the_bytes(harness):
    h = harness()
    h.push_refused(h.frames(tensor={"dtype": pb.FLOAT16, "chunk_count": 2}), INVALID,
                   f"more than the {NUMEL * 2} bytes the header announced")


def test_checksum_that_does_not_match(harness):
    h = harness()
    frames = h.frames()
    frames[2].chunk.crc32c ^= 1
    h.push_refused(frames, INVALID, "checksum mismatch in chunk 1")


def test_chunk_of_a_partial_element(harness):
    h = harness()
    frames = h.frames()
    frames[1].chunk.data = frames[1].chunk.data[:-1]
    h.push_refused(frames, INVALID, "chunk 0 has 4095 bytes (1 to 4194304 allowed, whole elements of 4 bytes)")


def test_corrupted_payload(harness):
    h = harness()
    frames = h.frames()
    data = bytearray(frames[2].chunk.data)
    data[100] ^= 0x40
    frames[2].chunk.data = bytes(data)
    h.push_refused(frames, INVALID, "checksum mismatch in chunk 1")


def test_chunks_out_of_order(harness):
    h = harness()
    frames = h.frames()
    frames[1], frames[2] = frames[2], frames[1]
    h.push_refused(frames, INVALID, "chunk 1 arrived where chunk 0 was expected")


def test_missing_last_chunk(harness):
    h = harness()
    h.push_refused(h.frames()[:-1], INVALID, "stream ended after 2 of 3 chunks (8192 of 12000 bytes)")


def test_missing_middle_chunk(harness):
    h = harness()
    frames = h.frames()
    h.push_refused([frames[0], frames[1], frames[3]], INVALID, "chunk 2 arrived where chunk 1 was expected")


def test_extra_chunk(harness):
    h = harness()
    frames = h.frames()
    h.push_refused([*frames, pb.PushFrame(chunk=pb.Chunk(index=3, data=b"\0" * 8))], INVALID,
                   "more chunks than the 3 the header announced")


@pytest.mark.parametrize("chunk_count, message", [
    (0, "header announces 0 chunks for 12000 bytes"),
    (10**9, "header announces 1000000000 chunks for 12000 bytes"),
    (2, "more chunks than the 2 the header announced"),
    (4, "header announces 4 chunks for 12000 bytes (between 1 and 3 needed with chunks of 4096 to"),
])
def test_header_that_lies_about_the_chunk_count(harness, chunk_count, message):
    h = harness()
    h.push_refused(h.frames(tensor={"chunk_count": chunk_count}), INVALID, message)


def test_header_that_lies_about_the_element_count(harness):
    h = harness()
    h.push_refused(h.frames(tensor={"numel": 2**63}), INVALID, f"tensor has {2**63} elements")


def test_second_header_inside_a_push(harness):
    h = harness()
    frames = h.frames()
    h.push_refused([*frames[:2], frames[0], *frames[2:]], INVALID, "a header arrived among the chunks")


def test_push_that_starts_with_a_chunk(harness):
    h = harness()
    h.push_refused(h.frames()[1:], INVALID, "a push must start with a header")


def test_empty_push(harness):
    h = harness()
    h.push_refused([], INVALID, "a push must start with a header")


def test_header_without_chunks(harness):
    h = harness()
    h.push_refused(h.frames()[:1], INVALID, "stream ended after 0 of 3 chunks")


def test_message_beyond_the_size_limit(harness):
    h = harness()
    frames = h.frames()
    huge = pb.PushFrame(chunk=pb.Chunk(index=0, data=b"\0" * (9 * 1024 * 1024)))
    h.push_refused([frames[0], huge], grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")


# -- who pushes, on what ------------------------------------------------------------------------

def test_base_version_from_the_future(harness):
    h = harness()
    h.push_refused(h.frames(base_version=h.version + 5), INVALID, "is ahead of the server's version")


def test_unknown_worker(harness):
    h = harness()
    h.push_refused(h.frames(worker_id=999), grpc.StatusCode.NOT_FOUND, "worker 999 is not registered")


def test_forgotten_worker(harness):
    h = harness()
    with WorkerClient(h.server.address, timeout=20) as gone:
        worker_id = gone.join().worker_id
        version, _ = gone.pull()
        gone.leave()
    h.push_refused(push_frames(worker_id, version, gradient()), grpc.StatusCode.NOT_FOUND, "join again")


def test_gradient_on_parameters_the_worker_was_not_sent(harness):
    h = harness()
    h.assert_worker_can_still_push()
    h.push_refused(h.frames(base_version=h.version - 1), grpc.StatusCode.FAILED_PRECONDITION, "last sent version")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradient_is_rejected_and_counted(harness, value):
    h = harness()
    grad = gradient()
    grad[[5, 2999]] = value
    h.push_refused(h.frames(grad), INVALID, "gradient has 2 NaN or Inf elements (of 3000)")
    assert h.worker.status().nonfinite_pushes == 1


@pytest.mark.parametrize("values, finite", [
    ([1.0, -2.0, 3.0], True),
    ([3e38, 3e38, -1.0], True),                  # the float32 sum overflows, the elements are finite
    ([1.0, float("nan"), 2.0], False),
    ([float("inf"), 1.0], False),
    ([float("-inf"), 1.0], False),
    ([float("inf"), float("-inf")], False),      # the sum is NaN, not an infinity
])
def test_all_finite_agrees_with_the_elementwise_test(values, finite):
    tensor = torch.tensor(values)
    assert all_finite(tensor) is finite is bool(torch.isfinite(tensor).all())


def test_non_finite_element_in_a_later_chunk_is_found(harness):
    """The check runs chunk by chunk as they arrive: an infinity in the last chunk is found too."""
    h = harness()
    grad = gradient()
    grad[2100] = float("inf")
    h.push_refused(h.frames(grad), INVALID, "gradient has 1 NaN or Inf elements (of 3000)")


def test_non_finite_gradient_is_skipped_and_counted_under_skip(harness):
    h = harness(nonfinite="skip")
    grad = gradient()
    grad[7] = float("nan")
    with h.unchanged():
        result = h.worker.push(grad, base_version=h.version)
    assert (result.applied, result.version) == (False, h.version)
    assert h.worker.status().nonfinite_pushes == 1
    h.assert_worker_can_still_push()


def test_non_finite_gradient_is_applied_and_counted_under_apply(harness):
    """The simulator's mode: the arithmetic runs on the NaN, so the parameters diverge visibly."""
    h = harness(nonfinite="apply")
    grad = gradient()
    grad[7] = float("nan")
    result = h.worker.push(grad, base_version=h.version)
    assert (result.applied, result.version) == (True, h.version + 1)
    assert h.worker.status().nonfinite_pushes == 1
    _, theta = h.worker.pull()
    assert torch.isnan(theta[7]) and torch.isfinite(theta[8])


def test_worker_pushing_twice_at_once(harness):
    h = harness()
    release = threading.Event()

    def held(frames):
        yield frames[0]
        release.wait(timeout=20)
        yield from frames[1:]

    first = h.stub.Push(held(h.frames()), timeout=30)
    with h.unchanged():
        assert next(first).WhichOneof("frame") == "ready"  # the server holds the first push
        with pytest.raises(grpc.RpcError) as second:
            list(h.stub.Push(iter(h.frames(gradient(2))), timeout=20))
    assert second.value.code() == grpc.StatusCode.ABORTED
    assert "already has a push in progress" in second.value.details()
    release.set()
    (reply,) = list(first)
    assert reply.header.push.applied and reply.header.push.version == h.version + 1
    h.version, _ = h.worker.pull()
    h.assert_worker_can_still_push()


def test_more_concurrent_calls_than_allowed(harness):
    h = harness(options=ServerOptions(max_concurrent_rpcs=3))
    release = threading.Event()
    others = [WorkerClient(h.server.address, timeout=20) for _ in range(3)]
    joined = [client.join() for client in others]
    headers = [push_frames(info.worker_id, client.pull()[0], gradient(), worker_secret=info.worker_secret)[0]
               for info, client in zip(joined, others)]

    def held(header):  # a push that sends its header, then nothing until released, then ends
        yield header
        release.wait(timeout=20)

    try:
        with h.unchanged():
            started = time.monotonic()
            holders = [h.stub.Push(held(header), timeout=30) for header in headers]
            ids = {header.header.worker_id for header in headers}
            deadline = started + 20
            while time.monotonic() < deadline:  # until the server checked all three headers
                if all(w.last_seen > started for w in h.state.live_workers() if w.worker_id in ids):
                    break
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as refused:
                h.stub.Status(pb.StatusRequest(), timeout=20)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            release.set()
            for holder in holders:
                with pytest.raises(grpc.RpcError) as ended:
                    list(holder)
                assert ended.value.code() == INVALID and "stream ended" in ended.value.details()
    finally:
        release.set()
        for client in others:
            client.close()
    h.assert_worker_can_still_push()


# -- pull dtypes and layouts --------------------------------------------------------------------

def test_pull_with_an_unknown_dtype_changes_nothing(harness):
    h = harness()
    h.refused(lambda: list(h.stub.Pull(pb.PullRequest(worker_id=h.worker_id, worker_secret=h.secret, dtype=9),
                                       timeout=20)),
              INVALID, "pull dtype: unknown tensor dtype 9")


def test_push_pull_with_an_unknown_reply_dtype_applies_nothing(harness):
    h = harness()
    h.refused(lambda: list(h.stub.Push(iter(h.frames(pull=True, pull_dtype=9)), timeout=20)),
              INVALID, "reply dtype: unknown tensor dtype 9")


def test_layout_fingerprint_that_contradicts_its_parameters(harness):
    h = harness()
    message = h.state.layout.to_proto()
    message.fingerprint = "0" * 64
    h.refused(lambda: h.stub.Join(pb.JoinRequest(layout=message), timeout=20), INVALID,
              "is not that of the 1 parameters it lists")
    assert len(h.state.live_workers()) == 2


@pytest.mark.parametrize("with_params", [True, False])
def test_layout_fingerprint_of_another_model(harness, with_params):
    h = harness()
    other = ParamLayout(("w",), ((NUMEL + 1,),)).to_proto()
    if not with_params:
        del other.params[:]
    h.refused(lambda: h.stub.Join(pb.JoinRequest(layout=other), timeout=20), grpc.StatusCode.FAILED_PRECONDITION,
              "does not match the server's")
    assert len(h.state.live_workers()) == 2


# -- state that carries over: the next good update is as if the bad one never came ---------------

@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_refused_pushes_leave_the_next_updates_as_if_they_never_came(inprocess_servers, policy):
    def run(bad: bool) -> StateSnapshot:
        server = inprocess_servers(small_state(NUMEL, policy=policy, momentum=0.9))
        h = Harness(server)
        with WorkerClient(server.address, chunk_bytes=CHUNK_BYTES, timeout=20) as stale:
            stale_joined = stale.join()
            stale_id, stale_secret = stale_joined.worker_id, stale_joined.worker_secret
            stale_version, _ = stale.pull()
            h.assert_worker_can_still_push()  # `stale` is now one update behind
            if bad:
                nan = gradient(3)
                nan[0] = float("nan")
                corrupt = push_frames(stale_id, stale_version, gradient(3), worker_secret=stale_secret)
                corrupt[1].chunk.crc32c ^= 1
                for frames in (push_frames(stale_id, stale_version, nan, worker_secret=stale_secret), corrupt,
                               push_frames(stale_id, stale_version + 9, gradient(3), worker_secret=stale_secret),
                               push_frames(stale_id, stale_version, gradient(3), worker_secret=stale_secret)[:-1]):
                    with pytest.raises(grpc.RpcError):
                        list(h.stub.Push(iter(frames), timeout=20))
            assert stale.push(gradient(4), base_version=stale_version).staleness == 1
            assert h.worker.push(gradient(5), base_version=h.version).staleness == 1
        h.close()
        return StateSnapshot.of(server.state)

    clean, tried = run(bad=False), run(bad=True)
    clean.assert_same(tried)
    assert clean.version == 3 and clean.policy_state, "momentum or Gap statistics should be in play"


def test_bytes_that_do_not_parse(harness):
    h = harness()
    garbage = b"\xff\xff\xff"
    with grpc.insecure_channel(h.server.address) as channel:
        def method(kind: str, name: str):
            return getattr(channel, kind)(f"/{SERVICE_NAME}/{name}")

        for call in (lambda: list(method("stream_stream", "Push")(iter([garbage]), timeout=20)),
                     lambda: list(method("stream_stream", "Push")(iter([h.frames()[0].SerializeToString(), garbage]),
                                                                  timeout=20)),
                     lambda: list(method("unary_stream", "Pull")(garbage, timeout=20)),
                     lambda: method("unary_unary", "Join")(garbage, timeout=20),
                     lambda: method("unary_unary", "Status")(garbage, timeout=20)):
            h.refused(call, INVALID, "does not parse")
    assert len(h.state.live_workers()) == 2


def test_push_that_stalls_between_chunks(harness):
    h = harness(options=ServerOptions(chunk_timeout=0.3))
    release = threading.Event()

    def stalled(frames):
        yield from frames[:2]
        release.wait(timeout=20)

    try:
        h.refused(lambda: list(h.stub.Push(stalled(h.frames()), timeout=20)), grpc.StatusCode.DEADLINE_EXCEEDED,
                  "push stalled: no chunk for 0.3s")
    finally:
        release.set()
