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
    sent.keep(1, snapshot)
    sent.give_back(theta)
    assert sent.spare() is theta and sent.spare() is None, "the lent float32 view is a spare at once"
    assert sent.snapshot_spare(torch.bfloat16) is None, "still worker 1's θ⁽ⁱ⁾"
    sent.release(sent.take(1))
    assert sent.snapshot_spare(torch.float16) is None
    assert sent.snapshot_spare(torch.bfloat16) is snapshot and sent.snapshot_spare(torch.bfloat16) is None
    sent.keep(2, theta.to(torch.bfloat16))
    sent.forget(2)  # a worker that left
    assert sent.snapshot_spare(torch.bfloat16) is not None


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


@pytest.mark.parametrize("policy", ["gap-aware", "dana-ga", "asgd", "dana"])
def test_server_pulls_reuse_tensors_and_send_what_a_fresh_pull_would(policy):
    """Two servers take the same pushes; one lends its pulls (as the gRPC server does), the other
    does not. Every pull sends the same numbers, and the lending one reuses its tensors."""
    lending, fresh = small_state(policy=policy), small_state(policy=policy)
    workers = [(lending.join("h", "cpu", None).worker_id, fresh.join("h", "cpu", None).worker_id) for _ in range(3)]
    sent = {}
    for a, b in workers:
        (version, view), (_, expected) = lending.pull(a, lend=True), fresh.pull(b)
        assert torch.equal(view, expected)
        sent[a] = version, view.clone()
        lending.give_back(view)
    distinct: list[torch.Tensor] = []  # held, so that no id or memory is reused behind our back
    for step in range(12):
        (a, b) = workers[step % 3]
        version, _ = sent[a]
        grad = torch.randn(lending.layout.numel, generator=torch.Generator().manual_seed(step))
        lending.push(a, grad, base_version=version)
        fresh.push(b, grad, base_version=version)
        (version, view), (_, expected) = lending.pull(a, lend=True), fresh.pull(b)
        assert torch.equal(view, expected)
        if not any(seen is view for seen in distinct):
            distinct.append(view)
        sent[a] = version, view.clone()
        lending.give_back(view)
    assert torch.equal(lending.theta, fresh.theta)
    assert len(distinct) <= 3, f"12 pulls used {len(distinct)} tensors: they should be recycled (one per worker at most)"
