"""The tensors pulls send and keep: θ itself until it changes, then one copy for all who read it;
other tensors reused only once neither a reply nor a worker's θ⁽ⁱ⁾ holds them."""
import asyncio
import concurrent.futures
import gc
import math
import threading

import pytest
import torch

from gapaware.common.codec import TensorAssembler, tensor_bytes
from gapaware.common.wire import frame_parser
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.server.policies import fused
from gapaware.server.sent import Loan, SentParameters
from gapaware.server.servicer import ParameterServerServicer
from tests.inprocess import small_state

NUMEL = 100


def lent(loan: Loan) -> torch.Tensor:
    """The tensor ``loan`` reads now (for identity checks)."""
    return loan.read(lambda tensor: tensor)


def test_a_lent_snapshot_is_reused_only_after_the_reply_and_the_update_let_go():
    sent = SentParameters(torch.randn(NUMEL))
    pulled = torch.randn(NUMEL)
    loan = sent.lend(pulled)
    sent.keep(7, pulled)
    sent.give_back(loan)
    assert sent.spare() is None, "still worker 7's θ⁽ⁱ⁾"
    snapshot = sent.take(7)
    sent.release(snapshot)
    assert sent.spare() is pulled


def test_a_snapshot_pushed_while_its_reply_is_still_sent_waits_for_the_reply():
    sent = SentParameters(torch.randn(NUMEL))
    pulled = torch.randn(NUMEL)
    loan = sent.lend(pulled)
    sent.keep(7, pulled)
    sent.release(sent.take(7))
    assert sent.spare() is None, "the reply still reads it"
    sent.give_back(loan)
    assert sent.spare() is pulled


def test_tensors_never_lent_are_never_reused():
    sent = SentParameters(torch.randn(NUMEL))
    handed_out = torch.randn(NUMEL)
    sent.keep(1, handed_out)
    sent.forget(1)
    assert sent.spare() is None


def test_a_reduced_precision_snapshot_is_reused_for_the_next_one_once_its_update_read_it():
    sent = SentParameters(torch.randn(NUMEL))
    pulled = torch.randn(NUMEL)
    loan = sent.lend(pulled)
    snapshot = pulled.to(torch.bfloat16)
    sent.adopt(snapshot)
    sent.keep(1, snapshot)
    sent.give_back(loan)
    assert sent.spare() is pulled and sent.spare() is None, "the lent float32 tensor is a spare at once"
    assert sent.spare(torch.bfloat16) is None, "still worker 1's θ⁽ⁱ⁾"
    sent.release(sent.take(1))
    assert sent.spare(torch.float16) is None
    assert sent.spare(torch.bfloat16) is snapshot and sent.spare(torch.bfloat16) is None
    left = pulled.to(torch.bfloat16)
    sent.adopt(left)
    sent.keep(2, left)
    sent.forget(2)  # a worker that left
    assert sent.spare(torch.bfloat16) is left


def test_a_reduced_precision_snapshot_that_is_also_the_reply_waits_for_both():
    sent = SentParameters(torch.randn(NUMEL))
    snapshot = torch.randn(NUMEL).to(torch.bfloat16)
    loan = sent.lend(snapshot)
    sent.keep(3, snapshot)
    sent.release(sent.take(3))
    assert sent.spare(torch.bfloat16) is None, "the reply still reads it"
    sent.give_back(loan)
    assert sent.spare(torch.bfloat16) is snapshot


def test_tensors_the_server_did_not_make_are_never_reused_whatever_their_dtype():
    sent = SentParameters(torch.randn(NUMEL))
    handed_out = torch.randn(NUMEL).to(torch.bfloat16)  # e.g. a pull without lending: the caller keeps it
    sent.keep(1, handed_out)
    sent.forget(1)
    assert sent.spare(torch.bfloat16) is None


def test_spares_are_bounded_and_a_tensor_never_given_back_is_freed():
    sent = SentParameters(torch.randn(NUMEL), max_spares=1)
    first, second = torch.randn(NUMEL), torch.randn(NUMEL)
    for tensor in (first, second):
        sent.give_back(sent.lend(tensor))
    assert sent.spare() is first and sent.spare() is None
    forgotten = torch.randn(NUMEL)
    sent.lend(forgotten)  # a cancelled reply: its loan is never given back
    alive = forgotten.untyped_storage()._weak_ref()
    del forgotten
    gc.collect()
    assert torch.UntypedStorage._expired(alive), "the sent list must not keep a lent tensor alive"


def test_theta_is_lent_and_kept_as_itself_until_it_changes_then_one_copy_serves_every_reader():
    theta = torch.randn(NUMEL)
    sent = SentParameters(theta)
    loan = sent.lend(theta)
    sent.keep(1, theta)
    sent.keep(2, theta)
    assert lent(loan) is theta and sent.held_bytes() == 0, "no copy while θ is as it was sent"
    before = theta.clone()
    sent.detach()
    theta.add_(1.0)  # the update the detach came before
    copy = lent(loan)
    assert copy is not theta and torch.equal(copy, before)
    assert sent.held_bytes() == copy.nbytes, "one copy, shared by the reply and both θ⁽ⁱ⁾"
    first, second = sent.take(1), sent.take(2)
    assert first is copy and second is copy
    sent.release(first)
    sent.release(second)
    assert sent.spare() is None, "the reply still reads it"
    sent.give_back(loan)
    assert sent.spare() is copy and sent.spare() is None


def test_theta_is_never_a_spare_and_a_detach_with_no_reader_copies_nothing():
    theta = torch.randn(NUMEL)
    sent = SentParameters(theta)
    sent.keep(1, theta)
    sent.release(sent.take(1))  # the worker pushed on θ as it was sent
    sent.give_back(sent.lend(theta))
    sent.detach()
    assert sent.spare() is None, "neither θ nor a useless copy of it may become a spare"


def test_a_gradient_buffer_once_applied_becomes_the_next_copy_of_theta_and_back():
    """Gradients are received into the same spares as copies of θ: a buffer left idle by an applied
    push is where the next detach copies θ, and a copy nobody reads any more receives a gradient."""
    state = small_state(policy="gap-aware")
    first, second = (state.join("h", "cpu", None).worker_id for _ in range(2))
    version, _ = state.pull(first)
    buffer = state.gradient_buffer()
    buffer.copy_(torch.randn(state.layout.numel))
    state.push(first, buffer, base_version=version)
    state.recycle(buffer)
    version, _ = state.pull(first, lend=False)
    state.pull(second, lend=True)  # a reply on θ, never given back before the next push
    before = state.theta.clone()
    state.push(first, torch.randn(state.layout.numel), base_version=version)
    kept = state._sent.take(second)
    assert kept is buffer and torch.equal(kept, before), "θ was copied into the idle gradient buffer"
    assert state.gradient_buffer() is not buffer, "it is read: not a spare"


def test_a_detach_into_the_gradient_switches_every_reader_to_it_and_replies_wait_until_it_is_filled():
    """``detach(into=...)``: no copy; the reply and both θ⁽ⁱ⁾ read the gradient's buffer at once, and
    a reply reading it waits, in a thread or on an event loop, until the update has filled it."""
    theta = torch.randn(NUMEL)
    sent = SentParameters(theta)
    loan = sent.lend(theta)
    sent.keep(1, theta)
    sent.keep(2, theta)
    grad = torch.randn(NUMEL)
    before = theta.clone()
    assert sent.detach(into=grad) is True
    assert sent.spare() is None, "no copy was made"
    assert sent.take(1) is grad and sent.take(2) is grad

    read_in_thread = concurrent.futures.ThreadPoolExecutor(1).submit(lent, loan)

    async def on_loop() -> bool:
        waiting = asyncio.ensure_future(loan.readable())
        await asyncio.sleep(0.2)
        assert not waiting.done() and not read_in_thread.done(), "the buffer still holds the gradient"
        await asyncio.get_running_loop().run_in_executor(None, fill)
        await asyncio.wait_for(waiting, 5)
        return True

    def fill() -> None:  # what the update does, then the server's call once it is done
        grad.copy_(theta)
        theta.add_(1.0)
        sent.filled()

    assert asyncio.run(on_loop())
    assert read_in_thread.result(timeout=5) is grad and torch.equal(grad, before)


def test_an_update_ends_normally_when_a_reply_waiting_for_it_has_lost_its_event_loop():
    theta = torch.randn(NUMEL)
    sent = SentParameters(theta)
    loan = sent.lend(theta)
    assert sent.detach(into=torch.randn(NUMEL))
    loop = asyncio.new_event_loop()
    waiting = loop.create_task(loan.readable())
    loop.run_until_complete(asyncio.sleep(0.01))  # the reply now awaits the update
    assert not waiting.done()
    waiting.cancel()
    loop.run_until_complete(asyncio.gather(waiting, return_exceptions=True))
    loop.close()  # the server stopped
    sent.filled()
    assert lent(loan) is not theta


def test_a_detach_with_no_reader_leaves_the_gradient_alone():
    theta = torch.randn(NUMEL)
    sent = SentParameters(theta)
    sent.keep(1, theta)
    sent.release(sent.take(1))
    assert sent.detach(into=torch.randn(NUMEL)) is False


def test_a_gradient_applied_while_others_read_theta_becomes_their_copy_of_the_old_theta():
    """A push of a gradient received into the server's own buffer (``spare_grad``) while a reply and
    another worker's θ⁽ⁱ⁾ read θ: they read that buffer afterwards, holding θ as it was, and no other
    model-sized tensor was taken; it becomes a spare once nobody reads it."""
    state = small_state(policy="gap-aware")
    first, second = (state.join("h", "cpu", None).worker_id for _ in range(2))
    version, _ = state.pull(first)
    _, loan = state.pull(second, lend=True)
    before = state.theta.clone()
    buffer = state.gradient_buffer()
    buffer.copy_(torch.randn(state.layout.numel))
    state.push(first, buffer, base_version=version, spare_grad=True)
    state.recycle(buffer)
    assert lent(loan) is buffer and torch.equal(buffer, before)
    assert state._sent.spare() is None, "the gradient's buffer is the copy: nothing else was taken"
    state.give_back(loan)
    kept = state._sent.take(second)
    assert kept is buffer
    state._sent.release(kept)
    assert state.gradient_buffer() is buffer, "read by nobody: the next push receives into it"


def test_an_update_refused_after_the_switch_leaves_the_readers_the_unchanged_theta(monkeypatch):
    state = small_state(policy="gap-aware")
    first, second = (state.join("h", "cpu", None).worker_id for _ in range(2))
    version, _ = state.pull(first)
    _, loan = state.pull(second, lend=True)
    before = state.theta.clone()
    buffer = state.gradient_buffer().copy_(torch.randn(state.layout.numel))
    monkeypatch.setattr(state, "lr", lambda: math.nan)
    with pytest.raises(ValueError, match="learning rate"):
        state.push(first, buffer, base_version=version, spare_grad=True)
    assert lent(loan) is buffer and torch.equal(buffer, before) and torch.equal(state.theta, before)


@pytest.mark.parametrize("policy, dtype, snapshot_dtype", [
    ("gap-aware", torch.float32, "float32"), ("dana-ga", torch.float32, "float32"), ("asgd", torch.float32, "float32"),
    ("dana", torch.float32, "float32"), ("gap-aware", torch.bfloat16, "float32"), ("gap-aware", torch.bfloat16, "bfloat16"),
    ("gap-aware", torch.float16, "bfloat16"), ("gap-aware", torch.float32, "bfloat16"), ("asgd", torch.bfloat16, "float32"),
    ("dana-ga", torch.bfloat16, "bfloat16"), ("dana", torch.float16, "float32"),
])
def test_server_pulls_reuse_tensors_and_send_what_a_fresh_pull_would(policy, dtype, snapshot_dtype):
    """Two servers take the same pushes; one lends its pulls in the transport ``dtype`` (as the gRPC
    server does), the other pulls fresh float32 tensors. Every pull sends the same numbers (the
    fresh one cast to ``dtype``), the Gaps, measured against each worker's θ⁽ⁱ⁾, agree, and the
    lending one reuses its tensors."""
    lending, fresh = (small_state(policy=policy, snapshot_dtype=snapshot_dtype) for _ in range(2))
    workers = [(lending.join("h", "cpu", None).worker_id, fresh.join("h", "cpu", None).worker_id) for _ in range(3)]
    sent = {}
    for a, b in workers:
        (version, loan), (_, expected) = lending.pull(a, lend=True, dtype=dtype), fresh.pull(b)
        view = lent(loan)
        assert view.dtype == dtype and torch.equal(view, expected.to(dtype))
        sent[a] = version, view.clone()
        lending.give_back(loan)
    distinct: list[torch.Tensor] = []  # held, so that no id or memory is reused behind our back
    for step in range(12):
        (a, b) = workers[step % 3]
        version, _ = sent[a]
        grad = torch.randn(lending.layout.numel, generator=torch.Generator().manual_seed(step))
        assert lending.push(a, grad, base_version=version).mean_gap == fresh.push(b, grad, base_version=version).mean_gap
        (version, loan), (_, expected) = lending.pull(a, lend=True, dtype=dtype), fresh.pull(b)
        view = lent(loan)
        assert torch.equal(view, expected.to(dtype))
        if not any(seen is view for seen in distinct):
            distinct.append(view)
        sent[a] = version, view.clone()
        lending.give_back(loan)
    assert torch.equal(lending.theta, fresh.theta)
    assert len(distinct) <= 3, f"12 pulls used {len(distinct)} tensors: they should be recycled (one per worker at most)"


@pytest.mark.parametrize("policy, snapshot_dtype", [("asgd", "float32"), ("gap-aware", "bfloat16")])
def test_a_reduced_precision_pull_casts_theta_straight_into_what_it_sends(policy, snapshot_dtype, monkeypatch):
    """No θ⁽ⁱ⁾ kept, or one kept in the transport dtype: the pull is one cast of θ, with no
    float32 copy (``pull_view``) on the way; the tensor sent is the θ⁽ⁱ⁾ itself."""
    state = small_state(policy=policy, snapshot_dtype=snapshot_dtype)
    worker = state.join("h", "cpu", None).worker_id

    def no_float32_copy(*args, **kwargs):
        raise AssertionError("a float32 copy of θ was made")

    monkeypatch.setattr(state.policy, "pull_view", no_float32_copy)
    _, loan = state.pull(worker, lend=True, dtype=torch.bfloat16)
    view = lent(loan)
    assert torch.equal(view, state.theta.to(torch.bfloat16))
    assert state.snapshot_bytes() == (view.nbytes if state.policy.needs_snapshot else 0)


@pytest.mark.parametrize("policy, snapshot_dtype, fused_switch", [
    ("gap-aware", "float32", "1"), ("gap-aware", "float32", "0"), ("asgd", "float32", "1"),
    ("gap-aware", "bfloat16", "1"),
])
def test_a_worker_alone_is_sent_theta_itself_and_its_pushes_give_what_copies_would(policy, snapshot_dtype,
                                                                                   fused_switch, monkeypatch):
    """One worker: its reply is sent before it pushes, and its θ⁽ⁱ⁾ is θ as it is (Gap 1). No float32
    copy of θ is made, and θ, the Gaps and the policy state come out bitwise as with fresh copies,
    in the torch operations and in the fused kernel (told that there is no θ⁽ⁱ⁾ to read)."""
    monkeypatch.setenv(fused.SWITCH, fused_switch)
    stale_passed = []
    kernel_update = fused.gap_aware_update_
    monkeypatch.setattr(fused, "gap_aware_update_",
                        lambda *args, **kw: stale_passed.append(args[2]) or kernel_update(*args, **kw))
    lending, fresh = (small_state(policy=policy, snapshot_dtype=snapshot_dtype) for _ in range(2))
    a, b = lending.join("h", "cpu", None).worker_id, fresh.join("h", "cpu", None).worker_id
    for step in range(5):
        (version, loan), (_, expected) = lending.pull(a, lend=True), fresh.pull(b)
        assert lent(loan) is lending.theta and torch.equal(expected, lending.theta)
        lending.give_back(loan)
        if snapshot_dtype == "float32":
            assert lending.snapshot_bytes() == 0, "a θ⁽ⁱ⁾ that is θ takes no memory"
        grad = torch.randn(lending.layout.numel, generator=torch.Generator().manual_seed(step))
        ours, theirs = lending.push(a, grad, base_version=version), fresh.push(b, grad, base_version=version)
        assert ours.mean_gap == theirs.mean_gap
    assert torch.equal(lending.theta, fresh.theta)
    for key, value in fresh.policy.state_dict().items():
        assert torch.equal(lending.policy.state_dict()[key], value), key
    assert lending._sent.spare() is None, "no copy of θ was ever made"
    if policy == "gap-aware" and snapshot_dtype == "float32" and fused_switch == "1" and fused.kernel() is not None:
        assert [stale is None for stale in stale_passed] == [True, False] * 5


@pytest.mark.parametrize("policy", ["gap-aware", "asgd", "dana-ga"])
@pytest.mark.parametrize("spare_grad", [False, True], ids=["copied", "into-gradient"])
def test_a_reply_being_sent_when_another_worker_pushes_sends_the_parameters_it_began_with(policy, spare_grad):
    """Worker A's reply is framed chunk by chunk by the real servicer; halfway, worker B pushes and
    θ changes. A still receives, checksum and all, exactly what it was pulled, and the Gap of its
    next push is measured against that: whether θ was copied for A, or the update left the old θ in
    the buffer B's gradient arrived in."""
    state, reference = (small_state(5 << 18, policy=policy) for _ in range(2))  # 5 MiB: five chunks
    servicer = ParameterServerServicer(state)
    (a, b), (ref_a, ref_b) = ([s.join("h", "cpu", None).worker_id for _ in range(2)] for s in (state, reference))
    version_b, loan_b = state.pull(b, lend=True)
    state.give_back(loan_b)
    reference.pull(ref_b)
    version_a, encoded, loan_a = servicer._pull_encoded(a, pb.FLOAT32)
    _, expected = reference.pull(ref_a)
    grad = torch.randn(state.layout.numel, generator=torch.Generator().manual_seed(1))

    async def receive() -> torch.Tensor:
        frames = servicer._send_parameters(version_a, encoded, loan_a)
        header = (await anext(frames)).header
        assembler = TensorAssembler(header.tensor, expected_numel=state.layout.numel)
        parse = frame_parser(pb.PullFrame)
        async for index, raw in _enumerate(frames):
            if index == 2:  # two chunks sent: B's push lands
                pushed = state.gradient_buffer().copy_(grad) if spare_grad else grad
                state.push(b, pushed, base_version=version_b, spare_grad=spare_grad)
                assert (lent(loan_a) is pushed) == (spare_grad and policy != "dana-ga")
                assert not torch.equal(state.theta, expected)
            frame = parse(raw)
            if isinstance(frame, pb.TensorTrailer):
                assembler.add_trailer(frame)
            else:
                assembler.add(frame)
        return assembler.finish()

    assert encoded.header.chunk_count == 5
    assert torch.equal(asyncio.run(receive()), expected)
    reference.push(ref_b, grad, base_version=version_b)
    later = torch.randn(state.layout.numel, generator=torch.Generator().manual_seed(2))
    gap = state.push(a, later, base_version=version_a).mean_gap
    assert gap == reference.push(ref_a, later, base_version=version_a).mean_gap
    assert gap > 1 or not state.policy.needs_snapshot, "A's push was stale: its Gap must exceed 1"
    assert torch.equal(state.theta, reference.theta)


def test_a_reply_waiting_for_an_update_to_fill_its_copy_leaves_the_event_loop_running():
    """While an update writes the old θ into the buffer a reply is switched to, the reply's next
    chunk waits without blocking the event loop, then carries θ as it was when pulled."""
    state = small_state(5 << 18)
    servicer = ParameterServerServicer(state)
    worker = state.join("h", "cpu", None).worker_id
    version, encoded, loan = servicer._pull_encoded(worker, pb.FLOAT32)
    before = state.theta.clone()
    buffer = state.gradient_buffer()

    async def send() -> None:
        frames = servicer._send_parameters(version, encoded, loan)
        await anext(frames)  # the header
        assert state._sent.detach(into=buffer), "the reply reads θ: it is switched to the buffer"
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        def update() -> None:  # what the update writes while it changes θ, then its call when done
            buffer.copy_(state.theta)
            state.theta.add_(1.0)
            state._sent.filled()

        ticker = asyncio.create_task(tick())
        threading.Timer(0.5, update).start()
        raw = await asyncio.wait_for(anext(frames), 5)
        ticker.cancel()
        assert ticks >= 10, "the event loop ran on while the reply waited for the update"
        data = pb.PullFrame.FromString(raw).chunk.data
        assert data == tensor_bytes(before)[:len(data)]

    asyncio.run(send())


async def _enumerate(frames):
    index = 0
    async for frame in frames:
        yield index, frame
        index += 1
