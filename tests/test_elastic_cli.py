"""Command-line refusals of the elastic flags: each bad value gets a clear message and starts nothing."""
from click.testing import CliRunner

from gapaware.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_device_template_accepts_only_the_process_index():
    result = invoke("worker", "--server", "127.0.0.1:1", "--procs", "2", "--device", "cuda:{j}")
    assert result.exit_code == 2 and "the only placeholder allowed is {i}" in result.output


def test_inverted_backoff_bounds_are_a_usage_error():
    result = invoke("worker", "--server", "127.0.0.1:1", "--retry-initial-backoff", "5", "--retry-max-backoff", "1")
    assert result.exit_code == 2 and "need 0 < initial <= max" in result.output


def test_resume_from_a_missing_directory_other_than_the_checkpoint_directory_is_refused(tmp_path):
    result = invoke("server", "--task", "digits-mlp", "--resume", str(tmp_path / "nope"),
                    "--checkpoint-dir", str(tmp_path / "elsewhere"))
    assert result.exit_code == 4 and "no such directory" in result.output


def test_a_new_run_refuses_a_directory_with_checkpoints(tmp_path):
    (tmp_path / "checkpoint-i0000-v0000000000.safetensors").write_bytes(b"x")
    result = invoke("server", "--task", "digits-mlp", "--checkpoint-dir", str(tmp_path))
    assert result.exit_code == 4 and f"pass --resume {tmp_path}" in result.output
