"""Emulated stragglers (worker/delay.py): the SPEC syntax, the same delays for the same rank
everywhere, the slow workers it names, the distribution's mean, and a worker that still stops
promptly on SIGTERM while it waits."""
import re
import signal
import statistics
import subprocess
import threading

import pytest
from click.testing import CliRunner

from gapaware import WorkerClient
from gapaware.cli import main
from gapaware.worker.delay import DelaySpec
from tests.invocations import parse_invocation
from tests.waiting import wait_for
from gapaware.command_line import gapaware_command as gapaware_cmd
from gapaware.processes import start_worker

FULL = "gamma:mean=0.05,shape=4;hiccup:p=0.02,length=1;slow:fraction=0.25,factor=3;seed=7"


def draws(spec: str, rank: int, count: int) -> list[float]:
    sampler = DelaySpec.parse(spec).sampler(rank)
    return [sampler.next() for _ in range(count)]


def test_a_full_spec_sets_every_part_in_any_order():
    expected = DelaySpec(gamma_mean=0.05, gamma_shape=4, hiccup_p=0.02, hiccup_length=1, slow_fraction=0.25,
                         slow_factor=3, seed=7)
    assert DelaySpec.parse(FULL) == expected
    assert DelaySpec.parse(" seed=7 ; slow:factor=3, fraction=0.25;hiccup:length=1,p=0.02;gamma:shape=4,mean=0.05;") \
        == expected


@pytest.mark.parametrize("text", ["", "none", "None", " none "])
def test_none_is_no_delay(text):
    spec = DelaySpec.parse(text)
    assert spec == DelaySpec()
    assert draws(text, rank=3, count=5) == [0.0] * 5


def test_gamma_shape_defaults_to_4_as_simulate_does():
    assert DelaySpec.parse("gamma:mean=0.1") == DelaySpec(gamma_mean=0.1, gamma_shape=4.0)


@pytest.mark.parametrize("text", [FULL, "none", "seed=3", "gamma:mean=0.05", "hiccup:p=0.5,length=0.2;seed=1"])
def test_the_canonical_text_parses_back_to_the_same_spec(text):
    spec = DelaySpec.parse(text)
    assert DelaySpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text, names", [
    ("gama:mean=1", "'gama'"),
    ("gamma:mean=x", "mean='x'"),
    ("gamma:mean=-0.1", "mean=-0.1"),
    ("gamma:mean=inf", "mean=inf"),
    ("gamma:shape=2", "needs mean"),
    ("gamma:mean=1,shape=0", "shape=0"),
    ("gamma:mean=1,speed=2", "'speed'"),
    ("gamma:mean", "'mean' is not KEY=VALUE"),
    ("gamma:mean=1,mean=2", "mean is given twice"),
    ("gamma:mean=1;gamma:mean=2", "gamma is given twice"),
    ("hiccup:p=1.5,length=1", "p=1.5"),
    ("hiccup:p=0.1", "needs length"),
    ("slow:fraction=2,factor=3", "fraction=2"),
    ("slow:fraction=0.25,factor=0", "factor=0"),
    ("seed=1.5", "seed='1.5'"),
    ("seed:3", "seed=N"),
    ("seed=1;seed=2", "seed is given twice"),
])
def test_a_bad_spec_says_which_part_is_wrong(text, names):
    with pytest.raises(ValueError, match=re.escape(names)):
        DelaySpec.parse(text)


def test_the_cli_refuses_a_bad_spec_naming_the_flag_and_the_part():
    for command in (["worker", "--server", "127.0.0.1:1"], ["train"]):
        result = CliRunner().invoke(main, [*command, "--delay", "gamma:mean=0.05;hiccup:p=2,length=1"])
        assert result.exit_code == 2
        assert "Invalid value for '--delay'" in result.output and "hiccup p=2" in result.output


def test_the_spec_comes_from_the_flag_or_gapaware_delay():
    worker = ["worker", "--server", "head:7070"]
    assert parse_invocation([*worker, "--delay", FULL])[1]["delay"] == DelaySpec.parse(FULL)
    assert parse_invocation(["train"], {"GAPAWARE_DELAY": "gamma:mean=0.2"})[1]["delay"] == DelaySpec(gamma_mean=0.2)
    assert parse_invocation(worker, {})[1]["delay"] is None


def test_the_same_spec_and_rank_draw_the_same_sequence_and_other_ranks_or_seeds_do_not():
    first = draws(FULL, rank=5, count=500)
    assert first == draws(FULL, rank=5, count=500)
    assert first != draws(FULL, rank=6, count=500)
    assert first != draws(FULL.replace("seed=7", "seed=8"), rank=5, count=500)
    assert len(set(first)) == 500 and min(first) > 0


@pytest.mark.parametrize("fraction, workers, slow", [
    (0.25, 16, [3, 7, 11, 15]), (0.25, 8, [3, 7]), (0.25, 4, [3]), (0.5, 6, [1, 3, 5]), (0.0, 8, []),
    (1.0, 3, [0, 1, 2]),
])
def test_the_slow_fraction_picks_floor_n_times_fraction_workers_spread_evenly(fraction, workers, slow):
    spec = DelaySpec.parse(f"slow:fraction={fraction},factor=3")
    assert [rank for rank in range(workers) if spec.is_slow(rank)] == slow


def test_a_slow_worker_waits_factor_times_longer_and_the_others_as_stated():
    spec = "gamma:mean=0.05,shape=4;slow:fraction=0.25,factor=3"
    assert statistics.fmean(draws(spec, rank=3, count=20000)) == pytest.approx(0.15, rel=0.03)
    assert statistics.fmean(draws(spec, rank=2, count=20000)) == pytest.approx(0.05, rel=0.03)


def test_many_gamma_draws_have_the_stated_mean_and_spread_and_hiccups_their_rate():
    gamma = draws("gamma:mean=0.05,shape=4;seed=1", rank=0, count=20000)
    assert statistics.fmean(gamma) == pytest.approx(0.05, rel=0.02)
    assert statistics.stdev(gamma) / statistics.fmean(gamma) == pytest.approx(0.5, rel=0.05)  # 1/sqrt(shape)
    hiccups = draws("hiccup:p=0.02,length=1;seed=1", rank=0, count=20000)
    assert set(hiccups) == {0.0, 1.0}
    assert hiccups.count(1.0) / len(hiccups) == pytest.approx(0.02, rel=0.15)


def test_waiting_ends_as_soon_as_stop_is_set():
    sampler = DelaySpec.parse("hiccup:p=1,length=1000").sampler(0)
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    assert sampler.wait(stop) is True
    assert DelaySpec().sampler(0).wait(threading.Event()) is False


def test_a_waiting_worker_stops_on_sigterm_after_its_one_step(servers, tmp_path):
    server = servers("--task", "digits-mlp", "--max-updates", "1000")
    worker = start_worker(server.address, tmp_path, 0, "--delay", "hiccup:p=1,length=1000")
    with WorkerClient(server.address, timeout=10) as client:
        wait_for(lambda: client.status().version >= 1, 120, (tmp_path / "worker-0.log").read_text, alive=worker)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    assert "done after 1 steps, 1 pushes applied" in (tmp_path / "worker-0.log").read_text()


@pytest.mark.slow
def test_train_hands_the_spec_to_every_worker(tmp_path):
    # Half a second after every step: the run outlasts both workers' start, however busy the machine
    # (a worker that starts after the run ended would retry the gone server).
    done = subprocess.run(gapaware_cmd("train", "--task", "digits-mlp", "--workers", "2", "--max-updates", "30",
                                       "--out", str(tmp_path), "--delay", "hiccup:p=1,length=0.5;seed=4"),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    logs = [(tmp_path / f"worker-{i}.log").read_text() for i in range(2)]
    assert all("emulating a straggler: hiccup:p=1.0,length=0.5;seed=4" in log for log in logs), logs
