"""Checkpoints of the server's state: one safetensors file each, written atomically, the last K kept.

A checkpoint file holds the tensors ``theta``, ``policy/<key>`` (the policy's
``state_dict()``: momentum, GA's ``v``, ``k`` and ``η_max``, DANA's buffers; scalars as 0-d
tensors) and ``buffer/<name>`` (the model's buffers, BatchNorm's statistics, in their own dtypes) and two metadata strings: ``gapaware``, a JSON object (format, version, examples seen,
server incarnation, run config, the run's totals), and ``sha256``, the digest of that JSON and
of every tensor's name, dtype, shape and bytes. safetensors cannot run code on load (unlike
pickle), and the digest catches what its own header check does not: a torn or corrupted file
is refused with a :class:`CorruptCheckpoint` that says why.

A write goes to a temporary file in the same directory, is fsynced, renamed over its final
name and the directory fsynced, so a crash leaves either the whole new file or none of it.
Files are named ``checkpoint-i<incarnation>-v<version>.safetensors``; their order by
(incarnation, version) is the order in which they were written, since each restart of the
server is a new incarnation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gapaware.common.config import RunConfig

log = logging.getLogger("gapaware.server.checkpoint")

FORMAT = 1
SUFFIX = ".safetensors"
NAME = re.compile(r"^checkpoint-i(\d+)-v(\d+)\.safetensors$")
POLICY_PREFIX = "policy/"
BUFFER_PREFIX = "buffer/"


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is torn, corrupted or not one of ours: the message says which and why."""


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
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # the model's buffers, by name


def checkpoint_name(incarnation: int, version: int) -> str:
    return f"checkpoint-i{incarnation:04d}-v{version:010d}{SUFFIX}"


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
        "totals": checkpoint.totals,
    }, sort_keys=True)
    path = directory / checkpoint_name(checkpoint.incarnation, checkpoint.version)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata={"gapaware": meta_json, "sha256": _digest(meta_json, tensors)})
    with temporary.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(directory)
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    """Loads and verifies one checkpoint file; raises :class:`CorruptCheckpoint` for anything amiss."""
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
            totals=dict(meta["totals"]),
            buffers={key.removeprefix(BUFFER_PREFIX): value for key, value in tensors.items()
                     if key.startswith(BUFFER_PREFIX)},
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptCheckpoint(f"{path}: invalid metadata ({error!r})") from None
    if fmt != FORMAT:
        raise CorruptCheckpoint(f"{path}: checkpoint format {fmt}, this gapaware reads format {FORMAT}")
    return checkpoint


class CheckpointDirectory:
    """The checkpoints of one run in one directory: save (and prune to ``keep``), find the newest valid."""

    def __init__(self, path: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"Invalid number of checkpoints to keep: {keep} (at least 1)")
        self.path = path
        self.keep = keep

    def paths(self) -> list[Path]:
        """The checkpoint files present, oldest first."""
        if not self.path.is_dir():
            return []
        found = [(tuple(int(g) for g in match.groups()), entry) for entry in self.path.iterdir()
                 if (match := NAME.match(entry.name))]
        return [entry for _, entry in sorted(found)]

    def last_incarnation(self) -> int:
        """The highest incarnation named by any file here, valid or not; -1 when there is none."""
        names = [NAME.match(p.name) for p in self.paths()]
        return max((int(m.group(1)) for m in names), default=-1)

    def save(self, checkpoint: Checkpoint) -> Path:
        """Writes ``checkpoint``, then deletes all but the newest ``keep`` files."""
        self.path.mkdir(parents=True, exist_ok=True)
        written = write_checkpoint(self.path, checkpoint)
        for old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
        return written

    def remove_partial_writes(self) -> None:
        """Deletes temporary files a crash left behind mid-write (never a complete checkpoint)."""
        if self.path.is_dir():
            for entry in self.path.glob(f"checkpoint-*{SUFFIX}.tmp"):
                entry.unlink(missing_ok=True)

    def newest_valid(self) -> tuple[Checkpoint | None, Path | None]:
        """The newest checkpoint that reads and verifies, and its path; each newer file that does not
        is logged with the reason and skipped. ``(None, None)`` when no file is valid."""
        for path in reversed(self.paths()):
            try:
                return read_checkpoint(path), path
            except CorruptCheckpoint as error:
                log.warning("skipping checkpoint %s", error)
        return None, None
