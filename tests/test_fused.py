"""The fused Gap-Aware kernel (server/policies/fused.c) against the torch operations it replaces.

The torch path (``GAPAWARE_FUSED=0``) is the reference: with a correctly rounded square root in
it the two agree bit for bit; with torch's own (MKL, within 1 ulp) to float32 precision. Then the
fallbacks: no compiler, a failed build, the switch, tensors the kernel does not take; and the
cache: a library that does not match its checksum is rebuilt, and what no process used for a
month is deleted.
"""
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gapaware.server.policies import fused, make_policy

needs_compiler = pytest.mark.skipif(fused.find_compiler() is None, reason="no C compiler: the torch path only")


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def _fresh_kernel(_module_cache, monkeypatch):
    """Each test finds, builds and logs as a new process would, with a cache of this module's own
    (built once), and leaves the kernel to be found again after it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(_module_cache))
    fused.kernel.cache_clear()
    fused._note.cache_clear()
    yield
    fused.kernel.cache_clear()


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache directory of this test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gapaware"


def exact_sqrt(tensor, *, out=None):
    """``torch.sqrt`` correctly rounded (numpy's, as the kernel's ``sqrtf``)."""
    result = torch.from_numpy(np.sqrt(tensor.numpy()))
    return result if out is None else out.copy_(result)


def run(name, numel, *, fused_on, snapshot_dtype=torch.float32, lrs=(0.1, 0.05, 0.2, 0.1), seed=0, **hyper):
    """Pushes from two workers taking turns; the final parameters, the policy state and the mean Gaps."""
    generator = torch.Generator().manual_seed(seed)
    policy = make_policy(name, numel, **hyper)
    theta = torch.randn(numel, generator=generator)
    mean_gaps = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(fused.SWITCH, "1" if fused_on else "0")
        for step, lr in enumerate(lrs):
            worker = step % 2
            stale = policy.pull_view(theta, lr=lr, worker_id=worker)
            stale.add_(torch.randn(numel, generator=generator), alpha=0.01)  # as if others pushed since
            grad = torch.randn(numel, generator=generator)
            mean_gaps.append(policy.apply(theta, grad, lr=lr, staleness=3, stale_theta=stale.to(snapshot_dtype),
                                          worker_id=worker))
    return theta, policy.state_dict(), mean_gaps


SETTINGS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "weight_decay": 1e-2},
    {"weight_decay": 1e-1, "beta": 0.9, "eps": 1e-6},
]


@needs_compiler
@pytest.mark.parametrize("name", ["gap-aware", "dana-ga"])
@pytest.mark.parametrize("hyper", SETTINGS, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()) or "plain")
@pytest.mark.parametrize("snapshot_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("numel", [1, 13, 1021, 300_007])  # none a multiple of a vector; 300 007 spans two slices
def test_kernel_gives_the_bits_of_the_torch_operations(monkeypatch, name, hyper, snapshot_dtype, numel):
    monkeypatch.setattr(torch, "sqrt", exact_sqrt)
    calls = []
    kernel_update = fused.gap_aware_update_
    monkeypatch.setattr(fused, "gap_aware_update_", lambda *args, **kw: calls.append(1) or kernel_update(*args, **kw))
    theta, state, mean_gaps = run(name, numel, fused_on=True, snapshot_dtype=snapshot_dtype, **hyper)
    assert len(calls) == 4, "every push ran in the kernel"
    ref_theta, ref_state, ref_mean_gaps = run(name, numel, fused_on=False, snapshot_dtype=snapshot_dtype, **hyper)
    assert len(calls) == 4, "and none of the reference's"
    assert torch.equal(theta, ref_theta)
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    # The Gap sum: double in the kernel, pairwise float32 in torch.
    np.testing.assert_allclose(mean_gaps, ref_mean_gaps, rtol=1e-6)
    assert min(mean_gaps) >= 1 and max(mean_gaps) > 1


@needs_compiler
@pytest.mark.parametrize("name", ["gap-aware", "dana-ga"])
@pytest.mark.parametrize("hyper", SETTINGS[1:4], ids=["momentum", "nesterov", "weight_decay"])
def test_kernel_agrees_with_torch_sqrt_to_float32_precision(name, hyper):
    theta, state, mean_gaps = run(name, 100_003, fused_on=True, **hyper)
    ref_theta, ref_state, ref_mean_gaps = run(name, 100_003, fused_on=False, **hyper)
    torch.testing.assert_close(theta, ref_theta, rtol=1e-6, atol=1e-7)
    for key in state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mean_gaps, ref_mean_gaps, rtol=1e-6)


@needs_compiler
@pytest.mark.parametrize("name", ["gap-aware", "dana-ga"])
def test_kernel_guards_a_zero_lr_max_with_gap_one(monkeypatch, name):
    """A warm-up from learning rate 0: η_max = 0 on the first push, so C = 0 and the Gap is 1."""
    monkeypatch.setattr(torch, "sqrt", exact_sqrt)
    lrs = (0.0, 0.0, 0.1)
    theta, state, mean_gaps = run(name, 1021, fused_on=True, lrs=lrs, momentum=0.9)
    ref_theta, ref_state, ref_mean_gaps = run(name, 1021, fused_on=False, lrs=lrs, momentum=0.9)
    assert mean_gaps[:2] == [1.0, 1.0] == ref_mean_gaps[:2] and mean_gaps[2] > 1
    assert torch.equal(theta, ref_theta) and all(torch.equal(state[k], ref_state[k]) for k in state)
    assert torch.isfinite(theta).all()


def test_without_a_compiler_the_torch_operations_run(monkeypatch, caplog, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc, ... on it
    assert fused.find_compiler() is None
    with caplog.at_level(logging.INFO, logger="gapaware.server.policies"):
        theta, state, mean_gaps = run("gap-aware", 1021, fused_on=True, momentum=0.9)
    assert fused.kernel() is None
    assert "No C compiler found" in caplog.text and caplog.text.count("No C compiler") == 1, "logged once"
    ref_theta, ref_state, ref_mean_gaps = run("gap-aware", 1021, fused_on=False, momentum=0.9)
    assert torch.equal(theta, ref_theta) and mean_gaps == ref_mean_gaps


@needs_compiler
def test_a_failed_build_falls_back_with_a_warning(monkeypatch, caplog, own_cache, tmp_path):
    broken = tmp_path / "fused.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(fused, "SOURCE", broken)
    with caplog.at_level(logging.WARNING, logger="gapaware.server.policies"):
        assert fused.kernel() is None
    assert "Could not build the fused Gap-Aware kernel" in caplog.text
    assert not list(own_cache.glob("*.so")) and not list(own_cache.glob(".build-*")), "nothing half-built left"


def test_the_switch_and_unsupported_tensors_take_the_torch_path(monkeypatch, caplog):
    numel = 64
    theta, grad, v = torch.zeros(numel), torch.zeros(numel), torch.zeros(numel)
    step = fused.Step(0.9, torch.zeros(numel))
    with caplog.at_level(logging.INFO, logger="gapaware.server.policies"):
        monkeypatch.setenv(fused.SWITCH, "0")
        assert not fused.applicable(theta, grad, theta.clone(), v, step)
        monkeypatch.delenv(fused.SWITCH)
        assert not fused.applicable(theta, grad, torch.zeros(2 * numel)[::2], v, step)  # not contiguous
        assert not fused.applicable(theta.double(), grad, theta.clone(), v, step)
        assert not fused.applicable(theta, grad, theta.half(), v, step)
        assert not fused.applicable(theta, grad, theta, v, step)  # θ⁽ⁱ⁾ is θ itself
    assert "GAPAWARE_FUSED=0" in caplog.text and "torch operations" in caplog.text


def test_a_non_contiguous_snapshot_still_gives_the_same_update():
    """The torch path takes over for a strided θ⁽ⁱ⁾, and the result is the fused one to float32 precision."""
    results = []
    for stride in (1, 2):
        policy = make_policy("gap-aware", 1021, momentum=0.9)
        theta = torch.linspace(-1, 1, 1021)
        stale = torch.linspace(-1.1, 0.9, 1021).repeat_interleave(stride)[::stride]
        for _ in range(3):
            policy.apply(theta, torch.cos(theta), lr=0.1, staleness=2, stale_theta=stale)
        results.append(theta)
    torch.testing.assert_close(*results, rtol=1e-6, atol=1e-7)


@needs_compiler
def test_the_cache_builds_once_and_reuses_the_library(own_cache):
    compiler = fused.find_compiler()
    path = fused.library(compiler)
    assert path.parent == own_cache and path.is_file()
    built = path.stat()
    assert fused.library(compiler) == path
    assert path.stat().st_ino == built.st_ino and path.stat().st_mtime_ns == built.st_mtime_ns, "not rebuilt"
    assert fused.kernel() is not None


@needs_compiler
@pytest.mark.parametrize("damage", ["truncate", "overwrite", "pointer", "delete"])
def test_a_damaged_cache_entry_is_rebuilt_not_loaded(own_cache, damage):
    compiler = fused.find_compiler()
    path = fused.library(compiler)
    good, inode = path.read_bytes(), path.stat().st_ino
    pointer = next(own_cache.glob("*.sha256"))
    if damage == "truncate":  # a partial write
        path.write_bytes(good[: len(good) // 2])
    elif damage == "overwrite":  # same size, other bytes
        path.write_bytes(good[:100] + bytes(len(good) - 100))
    elif damage == "pointer":
        pointer.write_bytes(b"\xff not a digest /../\n")
    else:
        os.remove(path)
    rebuilt = fused.library(compiler)
    assert fused._sha256(rebuilt) == pointer.read_text().strip()
    if damage != "delete":
        assert rebuilt.stat().st_ino != inode, "a new file, not the damaged one"
    assert fused.kernel() is not None


@needs_compiler
def test_the_cache_deletes_what_no_process_used_for_a_month_and_keeps_the_rest(own_cache):
    compiler = fused.find_compiler()
    path = fused.library(compiler)
    pointer = next(own_cache.glob("*.sha256"))
    month_ago = time.time() - (fused.UNUSED_DAYS + 1) * 86400

    def entry(name: str, *, old: bool, text: str = "") -> Path:
        made = own_cache / name
        if name.startswith(".build-"):
            made.mkdir()
            (made / "fused.so").write_bytes(b"half a build")
        else:
            made.write_text(text)
        if old:
            os.utime(made, (month_ago, month_ago))
        return made

    digest = "ab" * 32
    unused = [entry("fused-1111111111111111.sha256", old=True, text=digest),  # an older gapaware's
              entry(f"fused-1111111111111111-{digest[:16]}.so", old=True),
              entry("fused-2222222222222222-0000000000000000.so", old=True),  # replaced by a rebuild
              entry(".build-crashed", old=True)]
    kept = [entry("fused-3333333333333333.sha256", old=False, text=digest),  # another CPU's, in use
            entry(f"fused-3333333333333333-{digest[:16]}.so", old=True),
            entry("fused-4444444444444444-0000000000000000.so", old=False),  # too young to judge
            entry(".build-running", old=False)]
    os.utime(pointer, (month_ago, month_ago))  # this kernel's own, last loaded a month ago
    os.utime(path, (month_ago, month_ago))
    assert fused.library(compiler) == path, "loading it from the cache makes it used again"
    assert path.is_file() and pointer.is_file() and pointer.stat().st_mtime > month_ago
    assert [p.name for p in unused if p.exists()] == []
    assert [p.name for p in kept if not p.exists()] == []
