"""Elastic runs with real processes and real signals: scaling, crashes, restarts, corrupt checkpoints."""
import os
import re
import signal
import subprocess
import time

import grpc
import pytest

from gapaware import WorkerClient
from gapaware.command_line import gapaware_command
from gapaware.processes import ServerProcess, start_worker
from gapaware.server.checkpoint import CheckpointDirectory, read_checkpoint
from tests.netns import SERVER_ADDRESS, cannot_make_namespaces, veth_pair
from tests.waiting import wait_for

FAST_RETRY = ("--retry-initial-backoff", "0.2", "--retry-max-backoff", "1", "--retry-give-up-after", "120",
              "--rpc-timeout", "10")


def wait_status(address: str, until, timeout: float = 120.0, what: str = "condition"):
    """Polls Status, through refusals and a server not yet listening, until ``until(reply)`` holds;
    returns that reply."""
    with WorkerClient(address, timeout=5) as client:
        def reply_once_it_holds():
            try:
                reply = client.status()
            except grpc.RpcError:
                return None
            return reply if until(reply) else None
        return wait_for(reply_once_it_holds, timeout, what, interval=0.1)


def joined_ids(log_text: str) -> list[int]:
    """The ids a worker process had, in order: its first join and every re-join."""
    return [int(a or b) for a, b in re.findall(r"worker (\d+) joined|joined again as worker (\d+)", log_text)]


def server_push_counts(log_text: str) -> dict[int, int]:
    """Pushes per worker id, from the server's lines for workers that left or were forgotten."""
    counts = {int(w): int(n) for w, n in re.findall(r"worker (\d+) left after (\d+) pushes", log_text)}
    counts.update({int(w): int(n) for w, n in re.findall(r"worker (\d+) \S+ silent .*? after (\d+) pushes",
                                                          log_text)})
    return counts


def checkpoint_versions(directory) -> list[int]:
    """The versions of the checkpoints in ``directory``, oldest first."""
    return sorted(int(re.search(r"-v(\d+)", f.name).group(1)) for f in directory.glob("checkpoint-*.safetensors"))


def test_scale_up_then_sigterm_three_and_sigkill_one(servers, tmp_path):
    ckpt = tmp_path / "ckpt"
    server = servers("--task", "digits-mlp", "--max-updates", "20000", "--schedule", "constant", "--lr", "0.05",
                     "--lease-seconds", "3", "--eval-every", "200", "--checkpoint-dir", str(ckpt),
                     "--checkpoint-every", "0", "--checkpoint-seconds", "0")
    logs = lambda i: (tmp_path / f"worker-{i}.log").read_text()  # noqa: E731
    first = [start_worker(server.address, tmp_path, i, *FAST_RETRY) for i in range(2)]
    wait_status(server.address, lambda s: s.version >= 50, what="the first two workers to train")
    added = [start_worker(server.address, tmp_path, i, *FAST_RETRY) for i in range(2, 6)]
    six = wait_status(server.address, lambda s: sum(w.pushes > 0 for w in s.workers) == 6, timeout=180,
                      what="all six workers to push")
    assert six.held_snapshots <= 6

    stopped, killed = added[:3], added[3]
    for proc in stopped:
        proc.send_signal(signal.SIGTERM)
    killed.send_signal(signal.SIGKILL)
    assert [p.wait(timeout=60) for p in stopped] == [0, 0, 0], [logs(i) for i in range(2, 5)]
    assert killed.wait(timeout=10) == -signal.SIGKILL
    killed_id = joined_ids(logs(5))[-1]
    survivors = wait_status(server.address, lambda s: len(s.workers) == 2, timeout=30,
                            what="the killed worker's lease to expire")
    assert killed_id not in {w.worker_id for w in survivors.workers}
    assert survivors.held_snapshots <= 2, "no snapshot of a departed worker remains"
    assert f"worker {killed_id} (" in server.log() and "lease expired" in server.log()

    target = survivors.version + 300
    wait_status(server.address, lambda s: s.version >= target, what="300 more updates by the survivors")
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, server.log()
    assert [p.wait(timeout=60) for p in first] == [0, 0]

    final = server.records("final")[-1]
    assert final["version"] == final["pushes"] >= target
    assert final["held_snapshots"] == 0 and final["workers"] == 0
    assert final["accuracy"] >= 0.9, final
    start, last = CheckpointDirectory(ckpt).paths()
    assert read_checkpoint(start).version == 0
    assert read_checkpoint(last).version == final["version"], "SIGTERM wrote a final checkpoint"
    pushes = server_push_counts(server.log())
    assert set(pushes) == {worker_id for i in range(6) for worker_id in joined_ids(logs(i))}
    assert sum(pushes.values()) == final["pushes"], "every applied push is accounted to exactly one worker"
    for i in (0, 1, 2, 3, 4):
        applied = int(re.search(r"(\d+) pushes applied", logs(i)).group(1))
        server_side = sum(pushes[worker_id] for worker_id in joined_ids(logs(i)))
        assert applied == server_side, f"worker {i} and the server disagree on its pushes"


def test_server_killed_and_resumed_from_the_previous_checkpoint_when_the_newest_is_torn(servers, tmp_path):
    ckpt = tmp_path / "ckpt"
    # The resumed run is long enough (seconds) for both workers to rejoin it before it ends: a worker
    # that finds the server gone after the run would retry until --retry-give-up-after.
    flags = ("--task", "digits-mlp", "--max-updates", "2400", "--eval-every", "300", "--lease-seconds", "5",
             "--checkpoint-every", "100", "--keep-checkpoints", "4")
    first = servers(*flags, "--checkpoint-dir", str(ckpt), name="first")
    workers = [start_worker(first.address, tmp_path, i, *FAST_RETRY) for i in range(2)]
    wait_status(first.address, lambda s: s.version >= 320, what="version 320")
    # checkpoints are written in the background: the one at 300 may lag
    wait_for(lambda: max(checkpoint_versions(ckpt), default=-1) >= 300, 60,
             lambda: f"a checkpoint at version 300 or later: {checkpoint_versions(ckpt)}")
    first.proc.send_signal(signal.SIGKILL)
    first.wait(timeout=10)

    files = sorted(ckpt.glob("checkpoint-*.safetensors"))
    previous_version, newest_version = checkpoint_versions(ckpt)[-2:]
    assert newest_version >= 300 and 200 <= previous_version < newest_version, [f.name for f in files]
    os.truncate(files[-1], files[-1].stat().st_size // 2)

    second = servers(*flags, "--resume", str(ckpt), "--port", str(first.port), name="second")
    assert second.wait(timeout=240) == 0, second.log()
    assert [w.wait(timeout=60) for w in workers] == [0, 0], [(tmp_path / f"worker-{i}.log").read_text()
                                                            for i in range(2)]
    log = second.log()
    assert f"skipping checkpoint {files[-1]}" in log
    assert f"version {previous_version}, " in log, log
    final = second.records("final")[-1]
    assert final["version"] == final["pushes"] == 2400, "the version and the totals continue from the checkpoint"
    evals = [r["version"] for r in second.records("eval")]
    assert evals and min(evals) >= previous_version, "the resumed server evaluates from the restored version on"
    assert final["accuracy"] >= 0.9, final
    for i in range(2):
        text = (tmp_path / f"worker-{i}.log").read_text()
        assert "joined again as worker 1000" in text, text
    assert sorted(p.name for p in ckpt.glob("*"))[-1] == "checkpoint-i0001-v0000002400.safetensors"


def test_worker_procs_parent_forwards_sigterm_and_every_child_leaves(servers, tmp_path):
    server = servers("--task", "digits-mlp", "--max-updates", "20000", "--lease-seconds", "30")
    with (tmp_path / "procs.log").open("w") as log:
        parent = subprocess.Popen(gapaware_command("worker", "--server", server.address, "--procs", "2", *FAST_RETRY),
                                  stdout=log, stderr=subprocess.STDOUT)
    two = wait_status(server.address, lambda s: sum(w.pushes > 0 for w in s.workers) == 2, timeout=180,
                      what="both child workers to push")
    shown = subprocess.run(gapaware_command("status", "--server", server.address), capture_output=True, text=True,
                           timeout=60).stdout
    assert "2 live workers" in shown, shown
    rows = {int(line.split()[0]): line.split() for line in shown.splitlines() if line[:6].strip().isdigit()}
    assert set(rows) == {w.worker_id for w in two.workers}, shown
    assert all(row[-1] == "ago" and row[-2].endswith("s") and int(row[4]) > 0 for row in rows.values()), \
        "pushes and last seen shown"
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 0, (tmp_path / "procs.log").read_text()
    status = wait_status(server.address, lambda s: not s.workers, timeout=10, what="both children to leave")
    assert status.held_snapshots == 0
    assert (tmp_path / "procs.log").read_text().count("SIGTERM received") == 2


@pytest.mark.slow
def test_network_cut_longer_than_the_lease_then_the_run_recovers(tmp_path):
    reason = cannot_make_namespaces()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with veth_pair() as net:
        server = ServerProcess(tmp_path, "--task", "digits-mlp", "--max-updates", "1500", "--eval-every", "50",
                               "--lease-seconds", "2", "--host", SERVER_ADDRESS,
                               "--insecure",  # a private veth link this test made, nothing else on it
                               prefix=net.exec_in(net.server_ns))
        address = f"{SERVER_ADDRESS}:{server.port}"
        workers = [start_worker(address, tmp_path, i, *FAST_RETRY, "--rpc-timeout", "3",
                                prefix=net.exec_in(net.worker_ns)) for i in range(2)]
        try:
            wait_for(lambda: any(r["version"] >= 100 for r in server.records("eval")), 120, server.log,
                     alive=server.proc, interval=0.1)
            net.set_link(up=False)
            time.sleep(8)  # four leases
            cut_version = max(r["version"] for r in server.records("eval"))
            assert server.log().count("lease expired") == 2, "both workers are forgotten while cut off"
            net.set_link(up=True)
            assert server.wait(timeout=300) == 0, server.log()
            assert [w.wait(timeout=60) for w in workers] == [0, 0]
        finally:
            for proc in [*workers, server.proc]:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        final = server.records("final")[-1]
        assert cut_version < 1500 and final["version"] == final["pushes"] == 1500
        assert final["accuracy"] >= 0.9, final
        for i in range(2):
            assert "joined again" in (tmp_path / f"worker-{i}.log").read_text()
