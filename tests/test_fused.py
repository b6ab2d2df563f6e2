"""GA's and DANA-GA's pushes compiled by torch.compile (server/policies/fused.py) against the plain
torch reference they are compiled from, and the choices around it: when it compiles and what a
failed compile does.

Compiled and reference code round differently (the generated kernel's own square root, operations
reordered), so they are compared push by push from the same state, to float32 precision:
``|a − b| ≤ 1e-6·|b| + 1e-6·max|b|`` per tensor, i.e. relative 1e-6 or about eight float32 ulps
of the tensor's largest element (what rounding ``μ·buf + d`` can leave where the two cancel).
Each compiled variant costs a compile of a few seconds, once per test process.
"""
import logging

import pytest
import torch

from gapaware.server.policies import fused, make_policy


def assert_float32_close(actual, expected):
    expected = torch.as_tensor(expected)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(torch.as_tensor(actual), expected, rtol=1e-6, atol=1e-6 * scale)


def clone_of(policy, name, numel, hyper):
    twin = make_policy(name, numel, **hyper)
    twin.load_state_dict(policy.state_dict())
    return twin


def pushes(name, numel, hyper, *, workers=(0, 1, 0, 1, 0), snapshot_dtype=torch.float32, theta_itself_at=None):
    """Yields, push by push, what a push compiled and the same push run by the reference (on a copy
    of the state before it) made of θ, the policy state and the mean Gap. θ⁽ⁱ⁾ is the worker's pull
    moved a little, as if others pushed since; at push ``theta_itself_at`` it is θ itself."""
    generator = torch.Generator().manual_seed(0)
    policy = make_policy(name, numel, **hyper)
    theta = torch.randn(numel, generator=generator)
    for step, worker in enumerate(workers):
        lr = (0.1, 0.05, 0.2)[step % 3]
        stale = policy.pull_view(theta, lr=lr, worker_id=worker)
        stale = stale.add_(torch.randn(numel, generator=generator), alpha=0.01).to(snapshot_dtype)
        grad = torch.randn(numel, generator=generator)
        reference, ref_theta = clone_of(policy, name, numel, hyper), theta.clone()
        itself = step == theta_itself_at
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(fused.SWITCH, "1")
            gap = policy.apply(theta, grad, lr=lr, staleness=3, stale_theta=theta if itself else stale,
                               worker_id=worker)
            patch.setenv(fused.SWITCH, "0")
            ref_gap = reference.apply(ref_theta, grad, lr=lr, staleness=3,
                                      stale_theta=ref_theta if itself else stale, worker_id=worker)
        yield (theta, policy.state_dict(), gap), (ref_theta, reference.state_dict(), ref_gap)


@pytest.fixture
def no_failures(monkeypatch):
    """A record of failed compiles of this test's own; skips the test where torch.compile cannot work."""
    failed = set()
    monkeypatch.setattr(fused, "_failed", failed)
    yield
    if failed:
        pytest.skip(f"torch.compile does not work here ({', '.join(f.__name__ for f in failed)} failed: see the log)")


@pytest.mark.parametrize("name, hyper, options", [
    ("gap-aware", {"momentum": 0.9, "weight_decay": 0.01}, {"theta_itself_at": 2}),
    ("gap-aware", {"momentum": 0.9, "nesterov": True}, {"snapshot_dtype": torch.bfloat16}),
    ("gap-aware", {"ga_beta": 0.9, "ga_eps": 1e-6}, {}),
    ("dana-ga", {"momentum": 0.9, "weight_decay": 0.01}, {"workers": (0, 1, 1, 0, 2, 2)}),
], ids=["ga-momentum-decay-theta-itself", "ga-nesterov-bfloat16", "ga-no-momentum", "dana-ga-same-worker-twice"])
def test_a_compiled_push_is_the_reference_push_to_float32_precision(no_failures, name, hyper, options):
    """Covers θ⁽ⁱ⁾ being θ itself (GA) and DANA-GA's ``s`` being the pushing worker's own buffer
    (a worker pushing twice in a row): inputs that alias each other."""
    for (theta, state, gap), (ref_theta, ref_state, ref_gap) in pushes(name, 100_003, hyper, **options):
        assert_float32_close(theta, ref_theta)
        assert state.keys() == ref_state.keys()
        for key in state:
            assert_float32_close(state[key], ref_state[key])
        assert gap == pytest.approx(ref_gap, rel=1e-6)
    assert gap > 1.0


def test_compiled_code_takes_the_settings_of_each_policy(no_failures):
    """Two GA policies in one process, compiled once: the second's β, ε, μ and λ are its own, not
    constants of the first compile (torch compiles a Python float given as ``value=`` in as one)."""
    for hyper in ({"momentum": 0.9, "weight_decay": 0.01}, {"momentum": 0.5, "weight_decay": 0.03, "ga_beta": 0.9,
                                                            "ga_eps": 1e-6}):
        for (theta, state, gap), (ref_theta, ref_state, ref_gap) in pushes("gap-aware", 4099, hyper):
            assert_float32_close(theta, ref_theta)
            assert_float32_close(state["ga.v"], ref_state["ga.v"])
            assert gap == pytest.approx(ref_gap, rel=1e-6)


def test_a_failed_compile_warns_once_and_the_reference_runs(monkeypatch, caplog):
    attempts = []

    def broken(push):
        def compiled(*args, **kwargs):
            attempts.append(push.__name__)
            raise RuntimeError("no working C++ compiler")
        return compiled

    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setattr(fused, "_failed", set())
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(fused.SWITCH, switch)
        policy = make_policy("gap-aware", 1021, momentum=0.9)
        theta = torch.linspace(-1, 1, 1021)
        with caplog.at_level(logging.WARNING, logger="gapaware.server.policies"):
            gaps = [policy.apply(theta, torch.cos(theta * step), lr=0.1, staleness=2, stale_theta=theta + 0.01)
                    for step in range(3)]
        results[switch] = theta, gaps
    assert attempts == ["gap_aware_push_"], "one attempt, then the reference only"
    assert torch.equal(results["1"][0], results["0"][0]) and results["1"][1] == results["0"][1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "torch.compile of gap_aware_push_ failed (RuntimeError: no working C++ compiler)" \
        in warnings[0]


def test_unset_the_switch_compiles_large_models_only(monkeypatch):
    monkeypatch.delenv(fused.SWITCH, raising=False)
    assert not fused.compiles(fused.COMPILE_MIN_NUMEL - 1) and fused.compiles(fused.COMPILE_MIN_NUMEL)
    monkeypatch.setenv(fused.SWITCH, "0")
    assert not fused.compiles(10**9)
    monkeypatch.setenv(fused.SWITCH, "1")
    assert fused.compiles(3)

    monkeypatch.delenv(fused.SWITCH)
    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 1000)
    compiled = []
    monkeypatch.setattr(fused, "_compiled", lambda push: compiled.append(push.__name__) or push)
    for numel in (999, 1000):
        policy = make_policy("dana-ga", numel, momentum=0.9)
        policy.apply(torch.zeros(numel), torch.ones(numel), lr=0.1, staleness=0, stale_theta=torch.zeros(numel))
    assert compiled == ["dana_gap_aware_push_"], "only the model of 1000 elements"
