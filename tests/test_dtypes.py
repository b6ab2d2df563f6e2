"""Models of any floating dtype train against the server's float32 master copy, and autocast works."""
from __future__ import annotations

import math

import pytest
import torch

from gapaware.common.config import RunConfig
from gapaware.common.evaluation import evaluate
from gapaware.common.tasks import load_task
from gapaware.export import model_state
from tests.group_tasks import OUTPUT_DTYPES
from tests.test_param_groups import train_in_process


def _train(task: str, **worker_options):
    config = RunConfig(task=task, policy="gap-aware", lr=0.1, momentum=0.9, schedule="constant", max_updates=150,
                       batch_size=32, eval_every=1000)
    state, _, server_task = train_in_process(config, **worker_options)
    assert state.version == 150 and state.theta.dtype == torch.float32, "the master copy is float32"
    model = load_task(task).model
    exported = model_state(state.checkpoint())
    model.load_state_dict(exported)
    _, accuracy = evaluate(model, server_task.loss, server_task.test)
    return exported, accuracy


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "float16"])
def test_a_model_of_another_dtype_trains_and_exports_in_it(dtype):
    exported, accuracy = _train(f"tests.group_tasks:{dtype}")
    assert {tensor.dtype for tensor in exported.values()} == {getattr(torch, dtype)}
    assert accuracy >= 0.9, accuracy


def test_a_worker_under_autocast_trains():
    OUTPUT_DTYPES.clear()
    exported, accuracy = _train("tests.group_tasks:plain", autocast="bfloat16")
    assert {tensor.dtype for tensor in exported.values()} == {torch.float32}
    assert accuracy >= 0.9 and math.isfinite(accuracy), accuracy
    assert torch.bfloat16 in OUTPUT_DTYPES, "the worker's forward pass ran under autocast"
