"""``gapaware export``: a run's model as a plain ``state_dict()`` in one safetensors file.

The checkpoint holds θ (flat float32) and the buffers; the task (the checkpoint's run config names it)
rebuilds the model, so the file holds the model's own names and dtypes, parameters and buffers alike,
and ``model.load_state_dict(safetensors.torch.load_file(path))`` restores it. A run whose model came
from a worker has no task: the layout in its checkpoint names and shapes the tensors. A sharded run's model is
assembled from every shard's checkpoint (:func:`assemble`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from gapaware.common.buffers import load_buffers
from gapaware.common.layout import ParamLayout, load_flat_parameters
from gapaware.common.registry import FROM_WORKER
from gapaware.common.shards import Shard, run_identity
from gapaware.common.tasks import load_task
from gapaware.server.checkpoint import Checkpoint, CheckpointDirectory, CorruptCheckpoint, read_checkpoint


class ExportError(ValueError):
    """Nothing to export at the path given, or a checkpoint that does not fit its task; says why."""


def find_checkpoint(source: Path) -> tuple[Checkpoint, Path]:
    """The checkpoint ``source`` names: a checkpoint file, or the newest valid one in a checkpoint
    directory (``--checkpoint-dir``) or in a run directory's ``checkpoints`` folder."""
    if source.is_file():
        try:
            return read_checkpoint(source), source
        except CorruptCheckpoint as error:
            raise ExportError(str(error)) from None
    for directory in (source, source / "checkpoints"):
        checkpoint, path = CheckpointDirectory(directory).newest_valid()
        if checkpoint is not None:
            return checkpoint, path
    raise ExportError(f"{source}: no valid checkpoint there (a checkpoint file, the server's --checkpoint-dir "
                      "or a run directory holding a 'checkpoints' folder)")


def assemble(checkpoints: Sequence[Checkpoint]) -> Checkpoint:
    """One checkpoint of the whole model from one checkpoint of each shard (any order): the shards' θ
    concatenated in shard order, shard 0's buffers, version and run. Refuses shards missing, repeated,
    of different shard counts or of different runs."""
    if len(checkpoints) == 1 and checkpoints[0].shard.count == 1:
        return checkpoints[0]
    ordered = sorted(checkpoints, key=lambda c: c.shard.index)
    count = ordered[0].shard.count
    found = [str(c.shard) for c in ordered]
    if [(c.shard.index, c.shard.count) for c in ordered] != [(i, count) for i in range(count)]:
        raise ExportError(f"the checkpoints are of shards {', '.join(found)}: give one checkpoint of every shard "
                          f"0/{count} to {count - 1}/{count} of the run")
    runs = {run_identity(c.config) for c in ordered}
    if len(runs) > 1:
        raise ExportError(f"the checkpoints of shards {', '.join(found)} are of different runs (their run configs "
                          "differ): give every shard's checkpoint of one run")
    return dataclasses.replace(ordered[0], theta=torch.cat([c.theta for c in ordered]), shard=Shard())


def model_state(checkpoint: Checkpoint, data_dir: str | None = None) -> dict[str, torch.Tensor]:
    """The model's ``state_dict()`` with the checkpoint's parameters and buffers, in the model's dtypes."""
    if checkpoint.config.task == FROM_WORKER:
        return layout_state(checkpoint)
    task = load_task(checkpoint.config.task, seed=checkpoint.config.seed, data_dir=data_dir or checkpoint.config.data_dir)
    model = task.model
    layout = ParamLayout.from_module(model)
    if checkpoint.theta.numel() != layout.numel:
        raise ExportError(f"the checkpoint holds {checkpoint.theta.numel()} parameters, the model of task "
                          f"{checkpoint.config.task!r} has {layout.numel}")
    missing = [b.name for b in layout.buffers if b.name not in checkpoint.buffers]
    if missing:
        raise ExportError(f"the checkpoint holds no buffers {missing}: it was written before gapaware kept buffers")
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    load_flat_parameters(model, checkpoint.theta)
    load_buffers(model, checkpoint.buffers)
    return {name: tensor.detach().to("cpu", dtypes[name]).clone().contiguous()
            for name, tensor in model.state_dict().items()}


def layout_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The ``state_dict()`` of a run without a task (``server --init from-worker``), from the layout its
    checkpoint holds: each parameter its slice of θ in its own dtype and shape, then the buffers."""
    layout = checkpoint.layout
    if layout is None:
        raise ExportError("the checkpoint holds no parameter layout (an older gapaware wrote it)")
    if layout.frozen:
        raise ExportError(f"the model has {len(layout.frozen)} frozen parameters, which a server taking its model "
                          "from a worker never receives: save the model where it is trained instead")
    state = {name: checkpoint.theta[start:stop].reshape(shape).to(getattr(torch, dtype)).clone()
             for (name, shape, start, stop), dtype in zip(layout.segments(), layout.dtypes)}
    return {**state, **{b.name: checkpoint.buffers[b.name].contiguous() for b in layout.buffers}}


def export_model(sources: Sequence[Path], out: Path, data_dir: str | None = None) -> list[Path]:
    """Writes the model of the checkpoints ``sources`` name (one, or one per shard) to ``out``; returns
    the checkpoints' paths."""
    found = [find_checkpoint(source) for source in sources]
    checkpoint = assemble([c for c, _ in found])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(model_state(checkpoint, data_dir), str(out),
              metadata={"task": checkpoint.config.task, "version": str(checkpoint.version)})
    return [path for _, path in found]
