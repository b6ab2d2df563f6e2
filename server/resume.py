"""Starting a server on a checkpoint directory: resume the run it holds, or refuse to mix runs.

``gapaware server --resume DIR`` continues from the newest valid checkpoint in DIR (torn or
corrupt files are skipped with a message). The run config is the checkpoint's; flags given
explicitly on the command line override it (e.g. ``--max-updates`` to extend a run), except
``--task`` and ``--policy``, which must match: the saved parameters and policy state only fit
the model and policy that wrote them. A checkpoint never makes the server import code: one that
names a task other than a built-in one resumes only when ``--task`` names it too. A DIR with no
checkpoint file at all starts a new run, and so does a DIR that does not exist yet when it is also
the checkpoint directory, so a supervisor can restart the server with one unchanging command line
(``--checkpoint-dir D --resume D``) from the first start on.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from gapaware.common.config import RunConfig
from gapaware.common.registry import FROM_WORKER, TASK_NAMES
from gapaware.server.checkpoint import Checkpoint, CheckpointDirectory

log = logging.getLogger("gapaware.server")

MUST_MATCH = ("task", "policy")


class ResumeError(ValueError):
    """The server cannot start on this checkpoint directory; the message says what to do."""


def resolve_config(saved: RunConfig, given: RunConfig, explicit: frozenset[str]) -> RunConfig:
    """The config of a resumed run: ``saved`` with the ``explicit`` fields of ``given`` on top."""
    imports_code = saved.task not in (*TASK_NAMES, FROM_WORKER)
    if imports_code and not ("task" in explicit and given.task == saved.task):
        raise ResumeError(f"the checkpoint names the task {saved.task!r}, which is not built in, and a checkpoint "
                          f"cannot make the server import code: pass --task {saved.task} to resume it")
    for name in MUST_MATCH:
        if name in explicit and getattr(given, name) != getattr(saved, name):
            raise ResumeError(f"the checkpoint is of a run with {name} {getattr(saved, name)!r}, not "
                              f"{getattr(given, name)!r}: omit --{name} or resume another directory")
    overrides = {name: getattr(given, name) for name in explicit if getattr(given, name) != getattr(saved, name)}
    if overrides:
        log.info("resuming with the checkpoint's run config, overridden by the command line: %s", overrides)
    try:
        return dataclasses.replace(saved, **overrides)
    except ValueError as error:
        raise ResumeError(f"the command line's flags do not fit the resumed run: {error}") from None


def find_resume_point(directory: Path, *, checkpoint_dir: Path | None = None) -> Checkpoint | None:
    """The newest valid checkpoint in ``directory``, or None when it holds no checkpoint file, or
    does not exist and is ``checkpoint_dir`` too (a first start: the run's checkpoints go there)."""
    if not directory.is_dir():
        if directory.exists():
            raise ResumeError(f"--resume {directory}: not a directory")
        if checkpoint_dir is None or not _same(directory, checkpoint_dir):
            raise ResumeError(f"--resume {directory}: no such directory (a missing one starts a new run only "
                              "when it is also --checkpoint-dir)")
        log.info("--resume %s: no such directory yet, starting a new run that checkpoints there", directory)
        return None
    checkpoints = CheckpointDirectory(directory)
    if not checkpoints.paths():
        log.warning("--resume %s: no checkpoint there yet, starting a new run", directory)
        return None
    checkpoint, path = checkpoints.newest_valid()
    if checkpoint is None:
        raise ResumeError(f"--resume {directory}: none of its {len(checkpoints.paths())} checkpoint files is "
                          "valid (see the messages above); nothing was changed")
    log.info("resuming from %s: version %d, %d examples seen", path, checkpoint.version, checkpoint.samples)
    return checkpoint


def check_fresh_directory(directory: Path) -> None:
    """Refuses to start a new run whose checkpoints would mix with an earlier run's."""
    if CheckpointDirectory(directory).paths():
        raise ResumeError(f"--checkpoint-dir {directory} already holds checkpoints of a run: pass --resume "
                          f"{directory} to continue it, or choose an empty directory")


def next_incarnation(resumed: Checkpoint, resumed_from: Path, *directories: Path) -> int:
    """One more than the highest incarnation of ``resumed`` (the newest valid checkpoint in
    ``resumed_from``) and of the newest valid checkpoint in each other of ``directories``."""
    others = [d for d in directories if not _same(d, resumed_from)]
    return 1 + max([resumed.incarnation, *(CheckpointDirectory(d).last_incarnation() for d in others)])


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()
