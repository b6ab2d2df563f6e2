"""Many workers pushing and pulling at once through the real gRPC server, then replayed one event at
a time on a fresh state: every reply and the final parameters must be the replay's, bit for bit.

The server reuses spare model-sized tensors (``server/model_store.py``) for gradients, copies of θ
and snapshots; a tensor reused while a reply still reads it, or a snapshot overwritten before its
worker's push, would show up here as a reply or a final θ that differs from the sequential replay.
"""
import threading

import pytest
import torch

from gapaware import WorkerClient
from tests.inprocess import small_state

SMALL, LARGE = 3000, 600_000  # the large model's streamed replies take three 1 MiB chunks
WORKERS = 6
STEPS = 12


def _work(address: str, index: int, log: list, errors: list, transport: str, numel: int) -> None:
    """One worker: half of them push in small chunks (4 KiB, 64 KiB for the large model), half in the
    default 1 MiB. A gradient is logged as the server receives it (rounded to the transport dtype)."""
    streamed = dict(chunk_bytes=4096 if numel == SMALL else 1 << 16) if index % 2 else {}
    try:
        with WorkerClient(address, timeout=60, transport_dtype=transport, **streamed) as client:
            worker_id = client.join().worker_id
            version, theta = client.pull()
            log.append(("pull", worker_id, version, theta.clone(), None))
            for step in range(STEPS):
                grad = torch.randn(numel, generator=torch.Generator().manual_seed(index * 1000 + step))
                result, pulled, theta = client.push_pull(grad, version)
                log.append(("push", worker_id, version, grad.to(getattr(torch, transport)).float(), result.version))
                log.append(("pull", worker_id, pulled, theta.clone(), None))
                version = pulled
    except Exception as error:  # noqa: BLE001 - reported by the test
        errors.append(error)


@pytest.mark.parametrize("policy, transport, snapshots, numel", [
    ("gap-aware", "float32", "float32", SMALL), ("asgd", "float32", "float32", SMALL),
    ("gap-aware", "bfloat16", "bfloat16", SMALL),  # each θ⁽ⁱ⁾ is also the reply that sends it
    ("asgd", "bfloat16", "float32", SMALL),
    ("gap-aware", "float32", "float32", LARGE), ("asgd", "float32", "float32", LARGE),  # pushes land mid-reply
])
def test_concurrent_run_equals_its_sequential_replay(inprocess_servers, policy, transport, snapshots, numel):
    server = inprocess_servers(small_state(numel, policy=policy, snapshot_dtype=snapshots))
    log: list = []
    errors: list = []
    threads = [threading.Thread(target=_work, args=(server.address, i, log, errors, transport, numel))
               for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors

    # Replay: pushes in the order the server applied them (their resulting versions); a pull that
    # saw version p happened after push p and before push p + 1.
    replay = small_state(numel, policy=policy, snapshot_dtype=snapshots)
    ids = {worker_id: replay.join("h", "cpu", None).worker_id for worker_id in {entry[1] for entry in log}}
    pushes = sorted((e for e in log if e[0] == "push"), key=lambda e: e[4])
    pulls = [e for e in log if e[0] == "pull"]
    assert [e[4] for e in pushes] == list(range(1, len(pushes) + 1))

    def replay_pulls_at(version: int) -> None:
        for _, worker_id, pulled, theta, _ in pulls:
            if pulled == version:
                replayed_version, replayed = replay.pull(ids[worker_id], dtype=getattr(torch, transport))
                assert replayed_version == version
                assert torch.equal(theta, replayed.float()), f"a reply at version {version} differs from the replay"

    replay_pulls_at(0)
    for _, worker_id, base, grad, version in pushes:
        result = replay.push(replay.admit(ids[worker_id], grad, base_version=base))
        assert result.version == version
        replay_pulls_at(version)
    assert torch.equal(server.state.theta, replay.theta)
