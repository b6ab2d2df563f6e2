"""Checkpoints of the server's state: one safetensors file each, written atomically, the last K kept.

A checkpoint file holds the tensors ``theta``, ``policy/<key>`` (the policy's
``state_dict()``: momentum, GA's ``v``, ``k`` and ``η_max``, DANA's buffers; scalars as 0-d
tensors) and ``buffer/<name>`` (the model's buffers, BatchNorm's statistics, in their own dtypes) and two metadata strings: ``gapaware``, a JSON object (format, version, examples seen,
server incarnation, run config, the run's totals, the parameter layout), and ``sha256``, the digest of that JSON and
of every tensor's name, dtype, shape and bytes. safetensors cannot run code on load (unlike
pickle), and the digest catches what its own header check does not: a torn or corrupted file
is refused with a :class:`CorruptCheckpoint` that says why.

A write goes to a temporary file in the same directory, is fsynced, renamed over its final
name and the directory fsynced, so a crash leaves either the whole new file or none of it. A
write that fails (a full disk, a read-only directory) raises :class:`CheckpointWriteError` and
leaves no temporary file behind; a state holding NaN or Inf is not written at all.
Files are named ``checkpoint-i<incarnation>-v<version>.safetensors``; their order by
(incarnation, version) is the order in which they were written, since each restart of the
server is a new incarnation. A file whose name is out of range (incarnation above
:data:`MAX_INCARNATION`) is not one of ours and is ignored with a warning; one that does not
read, verify and hold finite, in-range values is skipped, so it can neither be resumed nor
move the next incarnation.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout
from gapaware.common.shards import Shard
from gapaware.common.transport import all_finite
from gapaware.server.push_bound import NORM_CEILING

log = logging.getLogger("gapaware.server.checkpoint")

FORMAT = 1
SUFFIX = ".safetensors"
NAME = re.compile(r"^checkpoint-i(\d+)-v(\d+)\.safetensors$")
POLICY_PREFIX = "policy/"
MAX_INCARNATION = 10**9
"""Restarts a run may have: a billion keeps every worker id (``incarnation × 1,000,000 + n``) far
inside the 64 bits of the wire."""
MAX_COUNT = 2**63 - 1
"""The largest version or number of examples a checkpoint may hold."""
BUFFER_PREFIX = "buffer/"


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is torn, corrupted or not one of ours: the message says which and why."""


class CheckpointWriteError(Exception):
    """A checkpoint that could not be written; nothing of it was left behind. ``reason`` says why
    without naming the file, the same for every write that fails for the same cause."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"could not write checkpoint {path}: {reason}")
        self.reason = reason


@dataclass
class CheckpointHealth:
    """How this server's checkpoint writes went, for status and metrics: ``failures`` so far, the
    ``last_error``'s message and the ``version`` of the newest checkpoint written (-1: none yet)."""

    failures: int = 0
    last_error: str = ""
    version: int = -1


@dataclass(frozen=True)
class Checkpoint:
    """Everything a restarted server needs to continue a run."""

    version: int
    samples: int
    incarnation: int                     # restarts of the server before the one that wrote this
    config: RunConfig
    theta: torch.Tensor
    policy_state: dict[str, torch.Tensor]
    totals: dict[str, float]             # sums over the run's pushes (the state's Window fields)
    push_norms: tuple[float, ...] = ()   # the push bound's recent gradient norms, oldest first
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # the model's buffers, by name
    shard: Shard = Shard()               # the slice of the model it holds (gapaware.common.shards)
    layout: ParamLayout | None = None    # what theta and the buffers are (None: a checkpoint of an older gapaware)


def checkpoint_name(incarnation: int, version: int) -> str:
    return f"checkpoint-i{incarnation:04d}-v{version:010d}{SUFFIX}"


def name_order(path: Path) -> tuple[int, int] | None:
    """(incarnation, version) that a checkpoint file's name gives, or None for another name or one
    out of range."""
    match = NAME.match(path.name)
    if match is None:
        return None
    incarnation, version = int(match.group(1)), int(match.group(2))
    return (incarnation, version) if incarnation <= MAX_INCARNATION and version <= MAX_COUNT else None


def nonfinite_tensors(checkpoint: Checkpoint) -> list[str]:
    """The tensors of ``checkpoint`` (``theta``, ``policy/<key>``) that hold NaN or Inf."""
    tensors = {"theta": checkpoint.theta, **{POLICY_PREFIX + k: v for k, v in checkpoint.policy_state.items()}}
    return [name for name, tensor in tensors.items() if tensor.is_floating_point() and not all_finite(tensor)]


def _digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Writes ``checkpoint`` into ``directory`` atomically and returns its path."""
    tensors = {"theta": checkpoint.theta.contiguous(),
               **{POLICY_PREFIX + key: value.contiguous() for key, value in checkpoint.policy_state.items()},
               **{BUFFER_PREFIX + name: value.contiguous() for name, value in checkpoint.buffers.items()}}
    meta_json = json.dumps({
        "format": FORMAT, "version": checkpoint.version, "samples": checkpoint.samples,
        "incarnation": checkpoint.incarnation, "config": json.loads(checkpoint.config.to_json()),
        "totals": checkpoint.totals, "push_norms": list(checkpoint.push_norms), "shard": str(checkpoint.shard),
        **({"layout": checkpoint.layout.to_json()} if checkpoint.layout is not None else {}),
    }, sort_keys=True)
    path = directory / checkpoint_name(checkpoint.incarnation, checkpoint.version)
    nonfinite = nonfinite_tensors(checkpoint)
    if nonfinite:
        raise CheckpointWriteError(path, f"{', '.join(nonfinite)} hold NaN or Inf: not written, so the newest "
                                         "finite checkpoint is kept")
    temporary = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(temporary), metadata={"gapaware": meta_json, "sha256": _digest(meta_json, tensors)})
        with temporary.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_directory(directory)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error type
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise CheckpointWriteError(path, _reason(error)) from None
    return path


def _reason(error: Exception) -> str:
    """What went wrong, without the file's name (an OSError's strerror)."""
    return getattr(error, "strerror", None) or str(error)


def read_checkpoint(path: Path) -> Checkpoint:
    """Loads and verifies one checkpoint file; raises :class:`CorruptCheckpoint` for anything amiss:
    a bad checksum, metadata out of range or that does not match the file's name, settings a run
    refuses, parameters or policy state holding NaN or Inf."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types, and OSError
        raise CorruptCheckpoint(f"{path}: not a readable safetensors file ({error})") from None
    meta_json, expected = metadata.get("gapaware"), metadata.get("sha256")
    if meta_json is None or expected is None:
        raise CorruptCheckpoint(f"{path}: no gapaware metadata or checksum: not a gapaware checkpoint")
    if _digest(meta_json, tensors) != expected:
        raise CorruptCheckpoint(f"{path}: checksum mismatch: the file was corrupted after it was written")
    try:
        meta = json.loads(meta_json)
        fmt = meta["format"]
        checkpoint = Checkpoint(
            version=int(meta["version"]), samples=int(meta["samples"]), incarnation=int(meta["incarnation"]),
            config=RunConfig.from_json(json.dumps(meta["config"])), theta=tensors.pop("theta"),
            policy_state={key.removeprefix(POLICY_PREFIX): value for key, value in tensors.items()
                          if key.startswith(POLICY_PREFIX)},
            totals=dict(meta["totals"]), push_norms=tuple(float(n) for n in meta.get("push_norms", ())),
            buffers={key.removeprefix(BUFFER_PREFIX): value for key, value in tensors.items()
                     if key.startswith(BUFFER_PREFIX)},
            shard=Shard.parse(meta.get("shard", "0/1")),
            layout=ParamLayout.from_json(meta["layout"]) if "layout" in meta else None,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptCheckpoint(f"{path}: invalid metadata ({error})") from None
    if fmt != FORMAT:
        raise CorruptCheckpoint(f"{path}: checkpoint format {fmt}, this gapaware reads format {FORMAT}")
    problem = _out_of_range(checkpoint, name_order(path))
    if problem:
        raise CorruptCheckpoint(f"{path}: {problem}: not resumable")
    return checkpoint


def _out_of_range(checkpoint: Checkpoint, named: tuple[int, int] | None) -> str:
    """Why ``checkpoint`` (from a file whose name gives ``named``) cannot be resumed; empty if it can."""
    if not 0 <= checkpoint.incarnation < MAX_INCARNATION:
        return f"incarnation {checkpoint.incarnation} is out of range (0 to {MAX_INCARNATION - 1})"
    if not (0 <= checkpoint.version <= MAX_COUNT and 0 <= checkpoint.samples <= MAX_COUNT):
        return f"version {checkpoint.version} or examples seen {checkpoint.samples} out of range"
    if named is not None and named != (checkpoint.incarnation, checkpoint.version):
        return (f"named for incarnation {named[0]}, version {named[1]} but holding incarnation "
                f"{checkpoint.incarnation}, version {checkpoint.version}")
    if checkpoint.theta.dim() != 1 or checkpoint.theta.dtype != torch.float32:
        return f"the parameters are a {checkpoint.theta.dtype} tensor of shape {tuple(checkpoint.theta.shape)}"
    if checkpoint.layout is not None and checkpoint.layout.numel != checkpoint.theta.numel():
        return f"its layout lists {checkpoint.layout.numel} parameters, it holds {checkpoint.theta.numel()}"
    nonfinite = nonfinite_tensors(checkpoint)
    if nonfinite:
        return f"{', '.join(nonfinite)} hold NaN or Inf"
    if not all(0 < n < NORM_CEILING and math.isfinite(n) for n in checkpoint.push_norms):
        return "the push bound's gradient norms are not all positive and finite"
    if not all(_finite_totals(v) for v in checkpoint.totals.values()):
        return f"the run's totals are not finite numbers: {checkpoint.totals}"
    return ""


def _finite_totals(value) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, int) and v >= 0 for v in value)
    return isinstance(value, (int, float)) and math.isfinite(value)


class CheckpointDirectory:
    """The checkpoints of one run in one directory: save (and prune to ``keep``), find the newest valid."""

    def __init__(self, path: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"Invalid number of checkpoints to keep: {keep} (at least 1)")
        self.path = path
        self.keep = keep

    def paths(self) -> list[Path]:
        """The checkpoint files present whose names are in range, oldest first."""
        if not self.path.is_dir():
            return []
        found = [(order, entry) for entry in self.path.iterdir() if (order := name_order(entry)) is not None]
        return [entry for _, entry in sorted(found)]

    def out_of_range(self) -> list[Path]:
        """Files named like checkpoints whose incarnation or version is out of range: not ours."""
        if not self.path.is_dir():
            return []
        return sorted(e for e in self.path.iterdir() if NAME.match(e.name) and name_order(e) is None)

    def last_incarnation(self) -> int:
        """The incarnation of the newest valid checkpoint here; -1 when there is none. Files that do
        not verify are not counted: a junk file cannot move the next incarnation."""
        checkpoint, _ = self.newest_valid()
        return -1 if checkpoint is None else checkpoint.incarnation

    def save(self, checkpoint: Checkpoint) -> Path:
        """Writes ``checkpoint``, then deletes all but the newest ``keep`` files up to it (files that
        sort after it are not this run's: they are left alone). Raises :class:`CheckpointWriteError`."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointWriteError(self.path, _reason(error)) from None
        written = write_checkpoint(self.path, checkpoint)
        up_to = name_order(written)
        for old in [p for p in self.paths() if name_order(p) <= up_to][:-self.keep]:
            try:
                old.unlink(missing_ok=True)
            except OSError as error:
                log.warning("could not delete the old checkpoint %s: %s", old, _reason(error))
        return written

    def remove_partial_writes(self) -> None:
        """Deletes temporary files a crash left behind mid-write (never a complete checkpoint)."""
        if self.path.is_dir():
            for entry in self.path.glob(f"checkpoint-*{SUFFIX}.tmp"):
                entry.unlink(missing_ok=True)

    def newest_valid(self) -> tuple[Checkpoint | None, Path | None]:
        """The newest checkpoint that reads and verifies, and its path; each newer file that does not
        is logged with the reason and skipped. ``(None, None)`` when no file is valid."""
        for path in self.out_of_range():
            log.warning("ignoring %s: its incarnation or version is out of range, not a checkpoint of gapaware's", path)
        for path in reversed(self.paths()):
            try:
                return read_checkpoint(path), path
            except CorruptCheckpoint as error:
                log.warning("skipping checkpoint %s", error)
        return None, None
