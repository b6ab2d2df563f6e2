"""GA's update in one pass: ``fused.c``, compiled on first use and called through ctypes.

Barkai, Hakimi and Schuster, "Gap Aware Mitigation of Gradient Staleness", ICLR 2020
(https://arxiv.org/abs/1909.10802). The torch functions are the reference implementation:
:func:`~.gap_aware.update_second_moment_`, :func:`~.gap_aware.gap_aware_direction`, then
:func:`~.sgd.sgd_step` (GA) or :func:`~.dana.dana_step` (DANA-GA), about eleven element-wise
operations, each a pass over its tensors. :func:`gap_aware_update_` is an accelerated
implementation of that same function: one loop that reads and writes each tensor once.

It rounds each operation to float32 as torch does, in the same order, with a fused multiply-add
exactly where PyTorch's CPU kernels use one (see ``fused.c``), so the two agree bit for bit but
for the square root in ``C``: the kernel's ``sqrtf`` is correctly rounded (IEEE 754), while
``torch.sqrt`` on the CPU calls MKL's vector math, accurate to 1 ulp (about a fifth of its
float32 results are off by one, and which depends on the code path MKL picks for the CPU). So
``C``, and with it the Gap, ``d`` and the update, can differ in their last bit (relative 1e-7);
given a correctly rounded square root the torch path gives the same bits (tests check both).
The sum of the Gaps differs in its last bits too: torch sums float32 slices pairwise, the
kernel in double.

The kernel is built with the system C compiler (``$CC``, else Python's, else ``cc``) into
``$XDG_CACHE_HOME/gapaware`` (default ``~/.cache/gapaware``), once per source, flags and CPU
(``-march=native``), and reused by every process after; what no process has loaded for
:data:`UNUSED_DAYS` days is deleted. The torch operations run instead when
there is no compiler, the build fails, ``GAPAWARE_FUSED=0`` is set, or the tensors are not
contiguous float32 CPU tensors (θ⁽ⁱ⁾ may be bfloat16); which path runs is logged once.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("gapaware.server.policies")

SOURCE = Path(__file__).with_name("fused.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp-simd", "-shared", "-fPIC")
"""``-ffp-contract=off``: no fused multiply-add beyond the ``fmaf`` calls written in the source;
``-fopenmp-simd``: the ``omp simd`` reduction that sums the Gaps, no OpenMP runtime."""
SWITCH = "GAPAWARE_FUSED"
"""Environment variable: ``0`` makes every update take the torch operations."""
UNUSED_DAYS = 30
"""A cached kernel no process has loaded for this long is deleted: one of an older gapaware or
compiler, or of a CPU that no longer shares this cache directory (a home on a network file system)."""

STEP_PLAIN, STEP_MOMENTUM, STEP_NESTEROV, STEP_DANA = range(4)  # enum step of fused.c


@dataclasses.dataclass(frozen=True)
class Step:
    """The step that follows GA's direction ``d``.

    The common SGD step of ALGORITHMS.md on the master's ``buffer`` (GA), or DANA-Zero's step on
    the pushing worker's ``buffer`` ``vⁱ`` when ``buffer_sum`` (``Σⱼ vʲ``) is given (DANA-GA).
    Buffers are ``None`` when ``momentum`` is 0: then ``θ ← θ − η·d`` either way.
    """

    momentum: float
    buffer: Tensor | None = None
    buffer_sum: Tensor | None = None
    nesterov: bool = False

    def kind(self) -> int:
        if self.momentum == 0:
            return STEP_PLAIN
        if self.buffer_sum is not None:
            return STEP_DANA
        return STEP_NESTEROV if self.nesterov else STEP_MOMENTUM

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.buffer, self.buffer_sum) if t is not None]


class _Arguments(ctypes.Structure):
    """``struct arguments`` of fused.c, field for field."""

    _fields_ = [
        ("numel", ctypes.c_int64),
        ("theta", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("stale_theta", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("buffer", ctypes.c_void_p),
        ("buffer_sum", ctypes.c_void_p),
        ("step", ctypes.c_int32),
        ("stale_bfloat16", ctypes.c_int32),
        ("weight_decayed", ctypes.c_int32),
        ("gap_is_one", ctypes.c_int32),
        ("old_theta_into_grad", ctypes.c_int32),
        ("beta", ctypes.c_float),
        ("one_minus_beta", ctypes.c_float),
        ("eps_root_bias", ctypes.c_float),
        ("gap_scale", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("momentum", ctypes.c_float),
        ("neg_lr", ctypes.c_float),
        ("neg_lr_momentum", ctypes.c_float),
    ]


def prepare() -> None:
    """Builds or loads the kernel now, unless switched off: a policy calls this when it is made, so
    the first build (about a second and a half) happens as the server starts, not at the first push,
    under the server's update lock."""
    if os.environ.get(SWITCH, "1") != "0":
        kernel()


def applicable(theta: Tensor, grad: Tensor, stale_theta: Tensor | None, v: Tensor, step: Step) -> bool:
    """True when :func:`gap_aware_update_` can run on these tensors: the kernel is built (or builds
    now), it is not switched off, and the tensors are distinct, contiguous float32 CPU tensors
    (``stale_theta`` float32 or bfloat16, or None: no θ⁽ⁱ⁾ to read). Logs once per reason when it cannot."""
    if os.environ.get(SWITCH, "1") == "0":
        _note(logging.INFO, f"{SWITCH}=0: Gap-Aware updates use torch operations")
        return False
    floats = [theta, grad, v, *step.tensors()]
    stale = [] if stale_theta is None else [stale_theta]
    if not (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in floats)
            and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and t.is_contiguous()
                    for t in stale)):
        _note(logging.INFO, f"Gap-Aware update on {theta.device.type} {theta.dtype} tensors "
                            f"(θ⁽ⁱ⁾ {stale[0].dtype if stale else None}): torch operations, the fused kernel "
                            "takes float32 CPU tensors")
        return False
    if len({t.data_ptr() for t in [*floats, *stale]}) < len(floats) + len(stale):  # fused.c's pointers are restrict
        _note(logging.INFO, "Gap-Aware update on tensors that share memory: torch operations")
        return False
    return kernel() is not None


def gap_aware_update_(theta: Tensor, grad: Tensor, stale_theta: Tensor | None, v: Tensor, step: Step, *,
                      scalars: tuple[float, float] | None, beta: float, weight_decay: float, lr: float,
                      old_theta_into_grad: bool) -> float:
    """One GA or DANA-GA push in place, in one pass; returns the sum of the Gaps.

    The same function as, on the whole vector, ``update_second_moment_(v, s, beta=β)``, then
    ``d, gap = gap_aware_direction(θ, g, θ⁽ⁱ⁾, v, ...)``, then the ``step`` (``sgd_step`` or
    ``dana_step``) with ``d`` at learning rate ``lr``, and ``gap.sum()``. ``scalars`` is what
    :func:`~.gap_aware.gap_scalars` returns for this update; None (``η_max = 0``), or a
    ``stale_theta`` of None (θ⁽ⁱ⁾ is θ itself), makes every Gap 1 and reads no θ⁽ⁱ⁾. Call only where
    :func:`applicable` is True. With ``old_theta_into_grad`` each element of θ as it was before
    the update is written into ``grad`` once read (:meth:`.base.Policy.apply`).
    """
    eps_root_bias, gap_scale = scalars or (0.0, 0.0)
    buffer, buffer_sum = step.buffer, step.buffer_sum
    arguments = _Arguments(
        numel=theta.numel(), theta=theta.data_ptr(), grad=grad.data_ptr(),
        stale_theta=None if stale_theta is None else stale_theta.data_ptr(),
        v=v.data_ptr(), buffer=None if buffer is None else buffer.data_ptr(),
        buffer_sum=None if buffer_sum is None else buffer_sum.data_ptr(), step=step.kind(),
        stale_bfloat16=stale_theta is not None and stale_theta.dtype == torch.bfloat16,
        weight_decayed=weight_decay != 0, gap_is_one=scalars is None or stale_theta is None,
        old_theta_into_grad=old_theta_into_grad, beta=beta,
        one_minus_beta=1 - beta, eps_root_bias=eps_root_bias, gap_scale=gap_scale, weight_decay=weight_decay,
        momentum=step.momentum, neg_lr=-lr, neg_lr_momentum=-lr * step.momentum)
    return kernel().gapaware_update(ctypes.byref(arguments))


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The loaded kernel (built first if the cache lacks it), or ``None`` when it cannot be built."""
    compiler = find_compiler()
    if compiler is None:
        _note(logging.WARNING, "No C compiler found (set CC): Gap-Aware updates use torch operations, "
                               "about 3x slower than the fused kernel")
        return None
    try:
        path = library(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        _note(logging.WARNING, f"Could not build the fused Gap-Aware kernel with {compiler}: {error}; "
                               "Gap-Aware updates use torch operations")
        return None
    lib.gapaware_update.argtypes = [ctypes.POINTER(_Arguments)]
    lib.gapaware_update.restype = ctypes.c_double
    _note(logging.INFO, f"Gap-Aware updates use the fused kernel {path}")
    return lib


def find_compiler() -> str | None:
    """The C compiler: ``$CC``, else the one Python was built with, else ``cc``; ``None`` if none is installed."""
    candidates = [os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc"]
    for candidate in filter(None, candidates):
        found = shutil.which(shlex.split(candidate)[0])
        if found:
            return found
    return None


def cache_dir() -> Path:
    """Where built kernels are kept: ``$XDG_CACHE_HOME/gapaware``, default ``~/.cache/gapaware``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gapaware"


def library(compiler: str) -> Path:
    """The kernel library built by ``compiler``: taken from the cache after checking its checksum,
    else built now. Safe when several processes build at once.

    A build writes ``fused-<key>-<digest>.so`` and then the pointer file ``fused-<key>.sha256``
    holding ``<digest>``, each through a temporary file and a rename, so a reader sees whole files
    only. A library whose SHA-256 is not the recorded digest (truncated, overwritten) is rebuilt.
    """
    directory = cache_dir()
    key = _build_key(compiler)
    pointer = directory / f"fused-{key}.sha256"
    cached = _cached(directory, key, pointer)
    if cached is not None:
        _mark_used(pointer)
        _prune(directory)
        return cached
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as build:
        built = Path(build) / "fused.so"
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True,
                                text=True, timeout=300, check=False)
        if result.returncode != 0:
            raise OSError(f"exit status {result.returncode}: {result.stderr.strip()[-2000:]}")
        digest = _sha256(built)
        path = directory / f"fused-{key}-{digest[:16]}.so"
        os.replace(built, path)
        (Path(build) / "pointer").write_text(digest + "\n")
        os.replace(Path(build) / "pointer", pointer)
    log.info("Built the fused Gap-Aware kernel %s", path)
    _prune(directory)
    return path


def _mark_used(pointer: Path) -> None:
    """Dates ``pointer``'s library as loaded now: a pointer file's time is when its library was last used."""
    try:
        os.utime(pointer)
    except OSError:  # a read-only cache: the kernel still loads
        pass


def _prune(directory: Path) -> None:
    """Deletes what the cache keeps for nobody, once it is :data:`UNUSED_DAYS` days old: libraries
    whose pointer file no process has used since (see :func:`_mark_used`), libraries no pointer
    names any more (replaced by a rebuild), and builds a crash left behind. A library in use
    elsewhere (another CPU sharing the directory) keeps its pointer fresh, so it stays."""
    cutoff = time.time() - UNUSED_DAYS * 86400
    try:
        entries = list(directory.iterdir())
        in_use = set()
        for pointer in directory.glob("fused-*.sha256"):
            if pointer.stat().st_mtime >= cutoff:
                digest = pointer.read_text(errors="replace").strip()
                in_use |= {pointer.name, f"{pointer.name.removesuffix('.sha256')}-{digest[:16]}.so"}
        for entry in entries:
            if entry.name in in_use or entry.stat().st_mtime >= cutoff:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            log.info("Deleted %s from the kernel cache: unused for %d days", entry, UNUSED_DAYS)
    except OSError as error:  # another process pruning at once, or a read-only cache: try next time
        log.debug("Could not prune the kernel cache %s: %s", directory, error)


def _cached(directory: Path, key: str, pointer: Path) -> Path | None:
    """The library the ``pointer`` file names, if its SHA-256 is the digest recorded there."""
    try:
        digest = pointer.read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    path = directory / f"fused-{key}-{digest[:16]}.so"
    if re.fullmatch(r"[0-9a-f]{64}", digest) and path.is_file() and _sha256(path) == digest:
        return path
    log.info("Cached Gap-Aware kernel %s does not match its checksum: rebuilding it", path)
    return None


def _build_key(compiler: str) -> str:
    """What a built library depends on: the source, the flags, the compiler and (``-march=native``) the CPU."""
    identity = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(), _cpu().encode()):
        identity.update(part + b"\0")
    return identity.hexdigest()[:16]


def _cpu() -> str:
    """The CPU's model and features as the kernel's ``-march=native`` sees them, as far as known."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = ("model name", "flags", "Features", "CPU part")  # x86, then Arm
    details = list(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in wanted))
    return "\n".join([platform.machine(), platform.processor(), *details])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def _note(level: int, message: str) -> None:
    """Log ``message`` the first time it comes."""
    log.log(level, message)
