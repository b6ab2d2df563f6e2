"""gapaware/processes.py: a process is handed over once ready, and one that never gets there fails
with its own words and leaves nothing running."""
import sys
import uuid
from pathlib import Path

import pytest

from gapaware.processes import NotReady, ServerProcess, spawn_ready

# Writes argv[2] into the ready file argv[1] (when given), says argv[3] on stderr and exits with
# argv[4] (when given), else waits until killed.
SCRIPT = """
import sys, threading
ready_file, ready, message, code = (sys.argv[1:] + [""] * 4)[:4]
if ready:
    open(ready_file, "w").write(ready)
print(message, file=sys.stderr, flush=True)
if code:
    sys.exit(int(code))
threading.Event().wait()
"""


def run_script(tmp_path: Path, ready: str = "", message: str = "", code: str = "", timeout: float = 60.0):
    ready_file = tmp_path / "ready"
    argv = [sys.executable, "-c", SCRIPT, str(ready_file), ready, message, code]
    return spawn_ready(argv, ready_file, tmp_path / "log", timeout=timeout)


def running_with(marker: str) -> list[str]:
    """The processes whose command line holds ``marker``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:  # gone meanwhile
            pass
    return found


def test_a_ready_process_is_handed_over_running_with_what_it_wrote(tmp_path):
    proc, ready = run_script(tmp_path, ready='{"port": 7171}')
    try:
        assert ready == {"port": 7171} and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_process_that_exits_first_fails_with_its_exit_code_and_stderr(tmp_path):
    with pytest.raises(NotReady, match="exited with code 3 before it was ready") as failed:
        run_script(tmp_path, message="bad flag --frobnicate", code="3")
    assert str(failed.value).endswith("bad flag --frobnicate\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_process_never_ready_is_killed_at_the_timeout(tmp_path):
    marker = uuid.uuid4().hex
    with pytest.raises(NotReady, match="not ready after 1 s and was killed") as failed:
        run_script(tmp_path, ready='{"port": 71', message=marker, timeout=1.0)  # half-written JSON is not ready
    assert not running_with(marker), "the process is still running"
    assert f"the end of its log ({tmp_path / 'log'})" in str(failed.value)


def test_a_server_refusing_its_flags_fails_with_the_clis_message(tmp_path):
    with pytest.raises(NotReady, match="exited with code 2") as failed:
        ServerProcess(tmp_path, "--policy", "bogus")
    assert "Invalid value for '--policy'" in str(failed.value)
