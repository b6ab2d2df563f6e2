"""The peer baseline: a parameter server built the way PyTorch's official tutorial builds one.

"Implementing a Parameter Server Using Distributed RPC Framework" (Rohan Varma,
https://pytorch.org/tutorials/intermediate/rpc_param_server_tutorial.html): rank 0 hosts a
``ParameterServer`` object created through ``rpc.remote(..., get_parameter_server)`` under a
global lock, trainers hold an ``RRef`` to it and call its methods with ``call_method`` /
``remote_method`` over ``rpc_sync``. As in the issue's comparison, the model is one flat float32
vector and a trainer's step is one call that pushes a gradient and returns the parameters after
the update: the same SGD step with momentum that gapaware's ASGD applies, under a lock.

``transport="tcp"`` forces TensorPipe onto its multi-host transport (``_transports=["uv"]``,
``_channels=["basic"]``); ``"default"`` lets it pick (shared memory on one host).
"""
from __future__ import annotations

import os
import threading
import warnings

import torch
import torch.distributed.rpc as rpc

from gapaware.server.policies import sgd_step

# torch 2.13's RPC init warns about its own use of a Gloo process group, once per process.
warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)

PS_NAME = "parameter_server"
RPC_TIMEOUT = 120.0

param_server = None
global_lock = threading.Lock()


class ParameterServer:
    def __init__(self, numel: int, lr: float = 0.05, momentum: float = 0.9) -> None:
        self.theta = torch.zeros(numel)
        self.momentum_buffer = torch.zeros(numel)
        self.lr, self.momentum = lr, momentum
        self.lock = threading.Lock()

    def push_pull(self, grad: torch.Tensor) -> torch.Tensor:
        with self.lock:
            sgd_step(self.theta, grad, self.momentum_buffer, lr=self.lr, momentum=self.momentum, nesterov=False)
            return self.theta.clone()

    def pull(self) -> torch.Tensor:
        with self.lock:
            return self.theta.clone()


def get_parameter_server(numel: int) -> ParameterServer:
    """The tutorial's singleton, created on the first trainer's request."""
    global param_server
    with global_lock:
        if param_server is None:
            param_server = ParameterServer(numel)
        return param_server


def call_method(method, rref, *args, **kwargs):
    return method(rref.local_value(), *args, **kwargs)


def remote_method(method, rref, *args, **kwargs):
    return rpc.rpc_sync(rref.owner(), call_method, args=[method, rref] + list(args), kwargs=kwargs)


def backend_options(transport: str) -> rpc.TensorPipeRpcBackendOptions:
    if transport == "tcp":
        return rpc.TensorPipeRpcBackendOptions(num_worker_threads=16, rpc_timeout=RPC_TIMEOUT,
                                               _transports=["uv"], _channels=["basic"])
    if transport == "default":
        return rpc.TensorPipeRpcBackendOptions(num_worker_threads=16, rpc_timeout=RPC_TIMEOUT)
    raise ValueError(f"Invalid transport: {transport!r} (default or tcp)")


def init(rank: int, world_size: int, port: int, transport: str, address: str = "127.0.0.1") -> None:
    """Joins the RPC world: rank 0 is the parameter server (at ``address``), the others are trainers."""
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)
    name = PS_NAME if rank == 0 else f"trainer_{rank}"
    rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=backend_options(transport))
