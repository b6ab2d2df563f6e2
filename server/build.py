"""A run's starting point without a network: the task and the server state with its seeded initial
parameters, for the gRPC server (:mod:`gapaware.server.app`) and the simulator alike."""
from __future__ import annotations

import torch

from gapaware.common.buffers import model_buffers
from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout, flat_parameters, load_flat_parameters
from gapaware.common.registry import DEFAULTS
from gapaware.common.shards import Shard, shard_layout
from gapaware.common.tasks import Task, TaskError, load_task
from gapaware.server.limits import DEFAULT_MAX_WORKERS
from gapaware.server.policies import element_rates
from gapaware.server.state import ParameterServerState


def build_state(config: RunConfig, *, nonfinite: str = DEFAULTS.nonfinite,
                grad_norm_bound: float = 0.0,
                max_workers: int = DEFAULT_MAX_WORKERS, shard: Shard = Shard()) -> tuple[Task, ParameterServerState]:
    """The task (for layout and evaluation) and the server state with the seeded initial parameters;
    ``grad_norm_bound`` is the push bound's k (0, for the simulator: none). With a ``shard`` of more than
    one, the state holds that shard's slice of the parameters only (:mod:`gapaware.common.shards`)."""
    task = load_task(config.task, seed=config.seed, data_dir=config.data_dir)
    try:  # a model gapaware cannot train, or a parameter-group pattern that fits none of it
        model_layout = ParamLayout.from_module(task.model)
        layout = shard_layout(model_layout, shard)
        start, stop = shard.bounds(model_layout)
        theta = flat_parameters(task.model)
        state = ParameterServerState(config, layout, theta if shard.count == 1 else theta[start:stop].clone(),
                                     train_size=len(task.train), nonfinite=nonfinite, grad_norm_bound=grad_norm_bound,
                                     max_workers=max_workers, buffers=model_buffers(task.model, layout.buffers),
                                     shard=shard, rates=element_rates(model_layout, config).sliced(start, stop))
    except ValueError as error:
        raise TaskError(str(error)) from None
    if shard.count > 1:
        return task, state  # a shard cannot evaluate the model: it holds a slice of it
    # The model is kept for evaluation only, and each evaluation points it at a copy of θ; until
    # then its parameters are views of θ, so the server holds no second copy of the model.
    load_flat_parameters(task.model, state.theta)
    return task, state


def state_from_model(config: RunConfig, layout: ParamLayout, theta: torch.Tensor, buffers: bytes, *,
                     nonfinite: str = DEFAULTS.nonfinite, grad_norm_bound: float = 0.0,
                     max_workers: int = DEFAULT_MAX_WORKERS) -> ParameterServerState:
    """The state of a run whose model came from a worker (``server --init from-worker``), or from a
    checkpoint of such a run: ``layout``, the flat float32 ``theta`` and the packed ``buffers``. No task:
    the training set's size is not known, so the run ends at ``max_updates``."""
    try:
        return ParameterServerState(config, layout, theta, train_size=0, nonfinite=nonfinite,
                                    grad_norm_bound=grad_norm_bound, max_workers=max_workers, buffers=buffers,
                                    rates=element_rates(layout, config))
    except ValueError as error:  # a parameter-group pattern that fits none of the model
        raise TaskError(str(error)) from None
