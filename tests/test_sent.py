"""Reuse of the tensors pulls produce: only once neither a reply nor a worker's θ⁽ⁱ⁾ holds them."""
import gc

import pytest
import torch

from gapaware.server.sent import SentParameters
from tests.inprocess import small_state

NUMEL = 100


def test_a_lent_snapshot_is_reused_only_after_the_reply_and_the_update_let_go():
    sent = SentParameters(NUMEL)
    theta = torch.randn(NUMEL)
    sent.lend(theta)
    sent.keep(7, theta)
    sent.give_back(theta)
    assert sent.spare() is None, "still worker 7's θ⁽ⁱ⁾"
    snapshot = sent.take(7)
    sent.release(snapshot)
    assert sent.spare() is theta


def test_a_snapshot_pushed_while_its_reply_is_still_sent_waits_for_the_reply():
    sent = SentParameters(NUMEL)
    theta = torch.randn(NUMEL)
    sent.lend(theta)
    sent.keep(7, theta)
    sent.release(sent.take(7))
    assert sent.spare() is None, "the reply still reads it"
    sent.give_back(theta)
    assert sent.spare() is theta


def test_tensors_never_lent_are_never_reused():
    sent = SentParameters(NUMEL)
    theta = torch.randn(NUMEL)
    sent.keep(1, theta)
    sent.forget(1)
    assert sent.spare() is None
    sent.give_back(theta)
    assert sent.spare() is None


def test_a_reduced_precision_snapshot_is_reused_for_the_next_one_once_its_update_read_it():
    sent = SentParameters(NUMEL)
    theta = torch.randn(NUMEL)
    sent.lend(theta)
    snapshot = theta.to(torch.bfloat16)
    sent.adopt(snapshot)
    sent.keep(1, snapshot)
    sent.give_back(theta)
    assert sent.spare() is theta and sent.spare() is None, "the lent float32 view is a spare at once"
    assert sent.spare(torch.bfloat16) is None, "still worker 1's θ⁽ⁱ⁾"
    sent.release(sent.take(1))
    assert sent.spare(torch.float16) is None
    assert sent.spare(torch.bfloat16) is snapshot and sent.spare(torch.bfloat16) is None
    left = theta.to(torch.bfloat16)
    sent.adopt(left)
    sent.keep(2, left)
    sent.forget(2)  # a worker that left
    assert sent.spare(torch.bfloat16) is left


def test_a_reduced_precision_snapshot_that_is_also_the_reply_waits_for_both():
    sent = SentParameters(NUMEL)
    snapshot = torch.randn(NUMEL).to(torch.bfloat16)
    sent.lend(snapshot)
    sent.keep(3, snapshot)
    sent.release(sent.take(3))
    assert sent.spare(torch.bfloat16) is None, "the reply still reads it"
    sent.give_back(snapshot)
    assert sent.spare(torch.bfloat16) is snapshot


def test_tensors_the_server_did_not_make_are_never_reused_whatever_their_dtype():
    sent = SentParameters(NUMEL)
    handed_out = torch.randn(NUMEL).to(torch.bfloat16)  # e.g. a pull without lending: the caller keeps it
    sent.keep(1, handed_out)
    sent.forget(1)
    assert sent.spare(torch.bfloat16) is None


def test_spares_are_bounded_and_a_tensor_never_given_back_is_freed():
    sent = SentParameters(NUMEL, max_spares=1)
    first, second = torch.randn(NUMEL), torch.randn(NUMEL)
    for tensor in (first, second):
        sent.lend(tensor)
        sent.give_back(tensor)
    assert sent.spare() is first and sent.spare() is None
    forgotten = torch.randn(NUMEL)
    sent.lend(forgotten)  # a cancelled reply: never given back
    alive = forgotten.untyped_storage()._weak_ref()
    del forgotten
    gc.collect()
    assert torch.UntypedStorage._expired(alive), "the sent list must not keep a lent tensor alive"


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
        (version, view), (_, expected) = lending.pull(a, lend=True, dtype=dtype), fresh.pull(b)
        assert view.dtype == dtype and torch.equal(view, expected.to(dtype))
        sent[a] = version, view.clone()
        lending.give_back(view)
    distinct: list[torch.Tensor] = []  # held, so that no id or memory is reused behind our back
    for step in range(12):
        (a, b) = workers[step % 3]
        version, _ = sent[a]
        grad = torch.randn(lending.layout.numel, generator=torch.Generator().manual_seed(step))
        assert lending.push(a, grad, base_version=version).mean_gap == fresh.push(b, grad, base_version=version).mean_gap
        (version, view), (_, expected) = lending.pull(a, lend=True, dtype=dtype), fresh.pull(b)
        assert torch.equal(view, expected.to(dtype))
        if not any(seen is view for seen in distinct):
            distinct.append(view)
        sent[a] = version, view.clone()
        lending.give_back(view)
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
    _, view = state.pull(worker, lend=True, dtype=torch.bfloat16)
    assert torch.equal(view, state.theta.to(torch.bfloat16))
    assert state.snapshot_bytes() == (view.nbytes if state.policy.needs_snapshot else 0)
