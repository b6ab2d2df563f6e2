"""``gapaware export``: a run's model as a plain ``state_dict()`` in one safetensors file.

The checkpoint holds θ (flat float32) and the buffers; the task (the checkpoint's run config names it)
rebuilds the model, so the file holds the model's own names and dtypes, parameters and buffers alike,
and ``model.load_state_dict(safetensors.torch.load_file(path))`` restores it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from gapaware.common.buffers import load_buffers
from gapaware.common.layout import ParamLayout, load_flat_parameters
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


def model_state(checkpoint: Checkpoint, data_dir: str | None = None) -> dict[str, torch.Tensor]:
    """The model's ``state_dict()`` with the checkpoint's parameters and buffers, in the model's dtypes."""
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


def export_model(source: Path, out: Path, data_dir: str | None = None) -> Path:
    """Writes the model of the checkpoint ``source`` names to ``out``; returns the checkpoint's path."""
    checkpoint, path = find_checkpoint(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(model_state(checkpoint, data_dir), str(out),
              metadata={"task": checkpoint.config.task, "version": str(checkpoint.version)})
    return path
