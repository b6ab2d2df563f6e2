"""Staleness policies against ALGORITHMS.md, on small hand-built vectors.

Expected numbers are written out by hand or computed here with plain Python floats (float64)
from the formulas of ALGORITHMS.md (the ``Ref*`` classes below), never by the code under test.
"""
import math

import pytest
import torch
from safetensors.torch import load, save

from gapaware.server.policies import (POLICIES, fused, gap_aware_direction_, gap_scalars, make_policy, sgd_step,
                                      slices)

BETA, EPS = 0.999, 1e-8


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def f32(values) -> list[float]:
    """``values`` rounded to float32, as the policy sees them."""
    return torch.tensor(values, dtype=torch.float32).tolist()


def assert_numbers(actual, expected, rtol=2e-6, atol=1e-7):
    """``actual`` (float32 tensor or float) equals the float64 ``expected`` to float32 precision."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


# -- references written from ALGORITHMS.md in plain floats ---------------------------------

def ref_sgd(theta, d, buf, *, lr, momentum, nesterov):
    """The common SGD step; returns (θ, buf)."""
    if momentum > 0:
        buf = [momentum * b + x for b, x in zip(buf, d)]
        step = [x + momentum * b for x, b in zip(d, buf)] if nesterov else buf
    else:
        step = d
    return [t - lr * s for t, s in zip(theta, step)], buf


class RefGapStats:
    """v, k, η_max and the Gap of ALGORITHMS.md, "GA"."""

    def __init__(self, n, beta=BETA, eps=EPS):
        self.v, self.k, self.lr_max, self.beta, self.eps = [0.0] * n, 0, 0.0, beta, eps

    def gaps(self, theta, stale, s, lr):
        self.v = [self.beta * v + (1 - self.beta) * x * x for v, x in zip(self.v, s)]
        self.k += 1
        self.lr_max = max(self.lr_max, lr)
        gaps = []
        for v, t, st in zip(self.v, theta, stale):
            c = self.lr_max * (math.sqrt(v / (1 - self.beta ** self.k)) + self.eps)
            gaps.append(1.0 if c == 0 else 1 + abs(t - st) / c)
        return gaps


class RefGA:
    def __init__(self, n, *, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.buf, self.stats = [0.0] * n, RefGapStats(n)
        self.momentum, self.nesterov, self.wd = momentum, nesterov, weight_decay

    def push(self, theta, g, stale, lr):
        s = self.buf if self.momentum > 0 else g
        gaps = self.stats.gaps(theta, stale, s, lr)
        d = [(x + self.wd * t) / gap for x, t, gap in zip(g, theta, gaps)]
        theta, self.buf = ref_sgd(theta, d, self.buf, lr=lr, momentum=self.momentum, nesterov=self.nesterov)
        return theta, sum(gaps) / len(gaps)


class RefDana:
    """DANA-Zero, or DANA-GA with ``gap_aware=True``: GA's ``s`` is the step the previous update
    applied (the buffer that moved θ last, zeros at first), or ``g`` when μ = 0."""

    def __init__(self, n, *, momentum, weight_decay=0.0, gap_aware=False):
        self.n, self.momentum, self.wd = n, momentum, weight_decay
        self.v = {}
        self.last_step = [0.0] * n
        self.stats = RefGapStats(n) if gap_aware else None

    def pull(self, theta, lr):
        total = [sum(v[i] for v in self.v.values()) for i in range(self.n)]
        return [t - lr * self.momentum * s for t, s in zip(theta, total)]

    def push(self, theta, g, stale, lr, worker):
        v = self.v.get(worker, [0.0] * self.n)
        gaps = [1.0] * self.n
        if self.stats is not None:
            gaps = self.stats.gaps(theta, stale, self.last_step if self.momentum > 0 else g, lr)
        d = [(x + self.wd * t) / gap for x, t, gap in zip(g, theta, gaps)]
        self.v[worker] = self.last_step = [self.momentum * a + b for a, b in zip(v, d)]
        return [t - lr * a for t, a in zip(theta, self.v[worker])], sum(gaps) / self.n

    def forget(self, worker):
        self.v.pop(worker, None)


# -- the common SGD step -------------------------------------------------------------------

def test_sgd_step_without_momentum():
    theta = vec(1, -2)
    sgd_step(theta, vec(0.5, 0.25), None, lr=0.5, momentum=0.0, nesterov=False)
    assert_numbers(theta, [0.75, -2.125])


@pytest.mark.parametrize("nesterov, expected", [(False, [[-0.5, -1.0], [-1.0, -1.0]]),
                                                 (True, [[-0.75, -1.5], [-1.25, -1.0]])])
def test_sgd_step_momentum_and_nesterov_by_hand(nesterov, expected):
    # μ = 0.5, η = 0.5. Step 1: buf = [1, 2]; step 2: buf = 0.5·[1, 2] + [0.5, −1] = [1, 0].
    # Nesterov steps are d + μ·buf: [1.5, 3], then [1, −1].
    theta, buf = vec(0, 0), torch.zeros(2)
    for d, want in zip([vec(1, 2), vec(0.5, -1)], expected):
        sgd_step(theta, d, buf, lr=0.5, momentum=0.5, nesterov=nesterov)
        assert_numbers(theta, want)
    assert_numbers(buf, [1.0, 0.0])


# -- ASGD and SA -----------------------------------------------------------------------------

def test_asgd_weight_decay_by_hand():
    policy = make_policy("asgd", 2, weight_decay=0.5)
    theta = vec(2, -4)
    assert policy.apply(theta, vec(0, 1), lr=0.5, staleness=3) == 1.0
    assert_numbers(theta, [2 - 0.5 * 1, -4 - 0.5 * (1 - 2)])  # d = g + λθ = [1, −1]


@pytest.mark.parametrize("nesterov", [False, True])
def test_asgd_momentum_and_weight_decay_over_several_pushes(nesterov):
    policy = make_policy("asgd", 3, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    theta, ref_theta, ref_buf = vec(1, -0.5, 2), [1.0, -0.5, 2.0], [0.0] * 3
    for g, lr, staleness in [([0.5, 1, -2], 0.1, 0), ([0.25, -1, 4], 0.2, 5), ([-1, 0.5, 0.5], 0.05, 2)]:
        assert policy.apply(theta, vec(*g), lr=lr, staleness=staleness, stale_theta=theta - 1) == 1.0
        d = [x + 0.01 * t for x, t in zip(g, ref_theta)]
        ref_theta, ref_buf = ref_sgd(ref_theta, d, ref_buf, lr=lr, momentum=0.9, nesterov=nesterov)
        assert_numbers(theta, ref_theta)
    assert_numbers(policy.state_dict()["momentum_buffer"], ref_buf)


@pytest.mark.parametrize("staleness, divisor", [(0, 1), (1, 1), (2, 2), (4, 4), (7, 7)])
def test_staleness_aware_divides_the_learning_rate_by_the_staleness(staleness, divisor):
    policy = make_policy("staleness-aware", 2)
    theta = vec(1, 1)
    assert policy.apply(theta, vec(1, -2), lr=0.5, staleness=staleness) == 1.0
    assert_numbers(theta, [1 - 0.5 / divisor, 1 + 1.0 / divisor])


def test_staleness_aware_with_momentum_and_weight_decay():
    policy = make_policy("staleness-aware", 2, momentum=0.5, weight_decay=0.1)
    theta, ref_theta, ref_buf = vec(1, 2), [1.0, 2.0], [0.0, 0.0]
    for g, staleness in [([1, 1], 0), ([2, -1], 4), ([0.5, 0.5], 3)]:
        policy.apply(theta, vec(*g), lr=0.4, staleness=staleness)
        d = [x + 0.1 * t for x, t in zip(g, ref_theta)]
        ref_theta, ref_buf = ref_sgd(ref_theta, d, ref_buf, lr=0.4 / max(1, staleness), momentum=0.5,
                                     nesterov=False)
        assert_numbers(theta, ref_theta)


# -- GA ----------------------------------------------------------------------------------------

def test_gap_aware_first_push_by_hand_is_per_element():
    # μ = 0, k = 1: v = (1−β)·g², so v̂ = g² and C = η·(|g| + ε). Gaps: 1 + 0.5/0.5, 1, 1 + 2/1.
    policy = make_policy("gap-aware", 3)
    theta = vec(1, 1, 1)
    mean_gap = policy.apply(theta, vec(2, 2, -4), lr=0.25, staleness=3, stale_theta=vec(0.5, 1, 3))
    gaps = [1 + 0.5 / (0.25 * (2 + EPS)), 1.0, 1 + 2 / (0.25 * (4 + EPS))]
    assert_numbers(gaps, [2.0, 1.0, 3.0], rtol=1e-7)
    assert_numbers(mean_gap, sum(gaps) / 3)
    assert_numbers(theta, [1 - 0.25 * 2 / gaps[0], 1 - 0.25 * 2, 1 + 0.25 * 4 / gaps[2]])
    state = policy.state_dict()
    assert_numbers(state["ga.v"], [0.001 * 4, 0.001 * 4, 0.001 * 16])
    assert state["ga.k"].item() == 1


def test_gap_aware_direction_penalises_weight_decay_too():
    # s = 2, k = 1: v = 0.001·4 = 0.004, v̂ = 4, C = 0.5·(2 + ε) ≈ 1, Gap = 1 + |2 − 1|/C ≈ 2;
    # d = (0 + 0.5·2)/Gap.
    v = torch.zeros(1)
    eps_root_bias, gap_scale = gap_scalars(k=1, lr_max=0.5, beta=BETA, eps=EPS)
    direction, gap = gap_aware_direction_(vec(2), vec(0), vec(1), v, vec(2), beta=BETA, eps_root_bias=eps_root_bias,
                                          gap_scale=gap_scale, weight_decay=0.5)
    expected_gap = 1 + 1 / (0.5 * (2 + EPS))
    assert_numbers(v, [0.004])
    assert_numbers(gap, [expected_gap])
    assert_numbers(direction, [1.0 / expected_gap])


def test_gap_aware_bias_correction_over_several_steps():
    policy = make_policy("gap-aware", 2)
    ref = RefGA(2)
    theta, ref_theta = vec(1, -1), [1.0, -1.0]
    pushes = [([0.5, -1.0], [1.0, -1.0]), ([0.25, 2.0], [0.9, -0.8]), ([-1.0, 0.5], [1.2, -1.0]),
              ([2.0, 0.25], [0.5, -1.5]), ([0.125, -0.5], [0.8, -0.6])]
    for k, (g, stale) in enumerate(pushes, start=1):
        mean_gap = policy.apply(theta, vec(*g), lr=0.5, staleness=2, stale_theta=vec(*stale))
        ref_theta, ref_mean_gap = ref.push(ref_theta, g, stale, 0.5)
        assert_numbers(theta, ref_theta)
        assert_numbers(mean_gap, ref_mean_gap)
        state = policy.state_dict()
        assert state["ga.k"].item() == k
        assert_numbers(state["ga.v"], ref.stats.v)
    assert ref_mean_gap > 1.5  # the pushes were stale enough for the Gap to matter


@pytest.mark.parametrize("nesterov", [False, True])
def test_gap_aware_momentum_feeds_the_buffer_to_v(nesterov):
    policy = make_policy("gap-aware", 3, momentum=0.9, nesterov=nesterov, weight_decay=0.05)
    ref = RefGA(3, momentum=0.9, nesterov=nesterov, weight_decay=0.05)
    theta, ref_theta = vec(0.5, -1, 2), [0.5, -1.0, 2.0]
    pushes = [([1, -0.5, 0.25], 0), ([0.5, 0.5, -1], 0.1), ([-0.25, 1, 0.5], 0.3), ([1, 1, 1], 0.05)]
    for g, offset in pushes:
        stale = f32([t + offset * (i + 1) for i, t in enumerate(ref_theta)])
        mean_gap = policy.apply(theta, vec(*g), lr=0.1, staleness=1, stale_theta=vec(*stale))
        ref_theta, ref_mean_gap = ref.push(ref_theta, g, stale, 0.1)
        assert_numbers(theta, ref_theta)
        assert_numbers(mean_gap, ref_mean_gap)
    assert_numbers(policy.state_dict()["momentum_buffer"], ref.buf)


def test_gap_aware_c_uses_the_largest_learning_rate_so_far():
    policy = make_policy("gap-aware", 2, momentum=0.5)
    ref = RefGA(2, momentum=0.5)
    theta, ref_theta = vec(1, 2), [1.0, 2.0]
    for lr, g in [(0.0625, [1, -1]), (0.25, [0.5, 1]), (0.5, [-1, 0.5]), (0.125, [1, 1]), (0.0625, [0.5, -0.5])]:
        stale = f32([t + 0.25 for t in ref_theta])
        mean_gap = policy.apply(theta, vec(*g), lr=lr, staleness=1, stale_theta=vec(*stale))
        ref_theta, ref_mean_gap = ref.push(ref_theta, g, stale, lr)
        assert_numbers(theta, ref_theta)
        assert_numbers(mean_gap, ref_mean_gap)
        assert policy.state_dict()["ga.lr_max"].item() == ref.stats.lr_max
    assert ref.stats.lr_max == 0.5


def test_gap_aware_guard_when_c_is_zero():
    # A warm-up from learning rate 0: η_max = 0 makes C = 0, and the Gap must be 1, not 0/0.
    policy = make_policy("gap-aware", 2, momentum=0.9)
    ref = RefGA(2, momentum=0.9)
    theta, ref_theta = vec(1, 2), [1.0, 2.0]
    stale = [1.5, 2.0]  # one element differs, one does not: 1/0 and 0/0 without the guard
    assert policy.apply(theta, vec(1, -1), lr=0.0, staleness=3, stale_theta=vec(*stale)) == 1.0
    ref_theta, _ = ref.push(ref_theta, [1, -1], stale, 0.0)
    assert_numbers(theta, [1.0, 2.0])
    state = policy.state_dict()
    assert_numbers(state["momentum_buffer"], [1.0, -1.0])  # d = g / 1 entered the buffer
    assert state["ga.k"].item() == 1 and state["ga.lr_max"].item() == 0.0
    policy.apply(theta, vec(0.5, 0.5), lr=0.1, staleness=1, stale_theta=vec(*stale))
    ref_theta, _ = ref.push(ref_theta, [0.5, 0.5], stale, 0.1)
    assert torch.isfinite(theta).all()
    assert_numbers(theta, ref_theta)
    eps_root_bias, gap_scale = gap_scalars(k=5, lr_max=0.0, beta=BETA, eps=EPS)
    assert gap_scale == 0.0
    _, gap = gap_aware_direction_(vec(1, 2), vec(1, 1), vec(3, 2), torch.zeros(2), vec(0, 0), beta=BETA,
                                  eps_root_bias=eps_root_bias, gap_scale=gap_scale, weight_decay=0.0)
    assert torch.equal(gap, vec(1, 1))


@pytest.mark.parametrize("itself", [False, True], ids=["copy", "theta-itself"])
def test_gap_is_one_when_the_worker_is_up_to_date(itself):
    """τ = 0: GA is ASGD bit for bit, whether θ⁽ⁱ⁾ is a copy of θ or θ itself."""
    asgd = make_policy("asgd", 3, momentum=0.9, nesterov=True, weight_decay=0.1)
    ga = make_policy("gap-aware", 3, momentum=0.9, nesterov=True, weight_decay=0.1)
    theta_asgd, theta_ga = vec(1, -2, 3), vec(1, -2, 3)
    for g, lr in [([1, 2, -3], 0.1), ([0.5, -0.5, 0.25], 0.2), ([-1, 1, 1], 0.05)]:
        stale = theta_ga if itself else theta_ga.clone()
        assert ga.apply(theta_ga, vec(*g), lr=lr, staleness=0, stale_theta=stale) == 1.0
        asgd.apply(theta_asgd, vec(*g), lr=lr, staleness=0)
        assert torch.equal(theta_ga, theta_asgd)


def test_gap_aware_accepts_snapshots_kept_in_bfloat16():
    stale = vec(0.5, 1.25, 3.0)  # exact in bfloat16
    thetas = []
    for dtype in (torch.float32, torch.bfloat16):
        policy = make_policy("gap-aware", 3, momentum=0.9)
        theta = vec(1, 1, 1)
        policy.apply(theta, vec(2, 2, -4), lr=0.25, staleness=0, stale_theta=theta.clone().to(dtype))
        policy.apply(theta, vec(1, -1, 1), lr=0.25, staleness=1, stale_theta=stale.to(dtype))
        thetas.append(theta)
    assert torch.equal(*thetas)


# -- DANA ------------------------------------------------------------------------------------

def test_dana_look_ahead_with_two_workers_and_forget():
    # μ = 0.5, η = 0.5. w0: v0 = [1, 0], θ = [0.5, 2]; w1: v1 = [0, 2], θ = [0.5, 1];
    # w0: v0 = 0.5·[1, 0] + [1, 1] = [1.5, 1], θ = [−0.25, 0.5].
    policy = make_policy("dana", 2, momentum=0.5)
    theta = vec(1, 2)
    for g, worker in [(vec(1, 0), 0), (vec(0, 2), 1), (vec(1, 1), 0)]:
        assert policy.apply(theta, g, lr=0.5, staleness=1, worker_id=worker) == 1.0
    assert_numbers(theta, [-0.25, 0.5])
    view = policy.pull_view(theta, lr=0.5, worker_id=1)
    assert_numbers(view, [-0.25 - 0.25 * 1.5, 0.5 - 0.25 * 3])  # θ − ημ·(v0 + v1)
    assert_numbers(policy.pull_view(theta, lr=0.25, worker_id=0), [-0.25 - 0.125 * 1.5, 0.5 - 0.125 * 3])
    view.fill_(7)
    assert_numbers(theta, [-0.25, 0.5])  # the view is a new tensor
    policy.forget_worker(0)
    assert_numbers(policy.pull_view(theta, lr=0.5, worker_id=1), [-0.25, 0.5 - 0.25 * 2])
    assert set(policy.state_dict()) == {"dana.v.1", "dana.v_sum"}
    policy.forget_worker(1)
    policy.forget_worker(5)  # never pushed: nothing to drop
    assert torch.equal(policy.pull_view(theta, lr=0.5, worker_id=1), theta)


def test_dana_against_reference_with_weight_decay_and_ignores_nesterov():
    plain = make_policy("dana", 2, momentum=0.9, weight_decay=0.1)
    nesterov = make_policy("dana", 2, momentum=0.9, nesterov=True, weight_decay=0.1)
    ref = RefDana(2, momentum=0.9, weight_decay=0.1)
    theta, theta_nesterov, ref_theta = vec(1, -1), vec(1, -1), [1.0, -1.0]
    for g, worker, lr in [([1, 2], 0, 0.1), ([-1, 0.5], 1, 0.1), ([0.5, 0.5], 2, 0.2), ([2, -1], 0, 0.2)]:
        plain.apply(theta, vec(*g), lr=lr, staleness=1, worker_id=worker)
        nesterov.apply(theta_nesterov, vec(*g), lr=lr, staleness=1, worker_id=worker)
        ref_theta, _ = ref.push(ref_theta, g, None, lr, worker)
        assert_numbers(theta, ref_theta)
        assert_numbers(plain.pull_view(theta, lr=lr, worker_id=worker), ref.pull(ref_theta, lr))
    assert torch.equal(theta, theta_nesterov)


def test_dana_without_momentum_is_asgd():
    policy = make_policy("dana", 2, weight_decay=0.5)
    theta = vec(2, -4)
    policy.apply(theta, vec(0, 1), lr=0.5, staleness=3, worker_id=4)
    assert_numbers(theta, [1.5, -3.5])
    assert policy.state_dict() == {}
    assert torch.equal(policy.pull_view(theta, lr=0.5, worker_id=4), theta)


def test_dana_ga_first_two_pushes_by_hand_feed_v_with_the_step_applied_before():
    # μ = 0.5, η = 0.5; both workers were sent θ₀ = [1, −1] (no buffers yet: θ̂ = θ₀).
    # w0: s = zeros, so v = 0; θ⁽⁰⁾ = θ₀, Gap 1; v⁰ = g = [2, −1], θ₁ = [0, −0.5].
    # w1: s = v⁰ (the step that moved θ last): v = (1−β)·[4, 1], k = 2, v̂ = [4, 1]/(1+β),
    #     C = 0.5·([2, 1]/√(1+β) + ε), |θ₁ − θ₀| = [1, 0.5]: both Gaps 1 + 1/(1/√(1+β) + ε·[1/2, 1]),
    #     about 2.414 (the withdrawn rule, s = v¹ = 0, gave C = 0.5·ε and Gaps of 10⁸).
    policy = make_policy("dana-ga", 2, momentum=0.5)
    theta0 = vec(1, -1)
    theta = theta0.clone()
    assert policy.apply(theta, vec(2, -1), lr=0.5, staleness=0, stale_theta=theta0, worker_id=0) == 1.0
    assert_numbers(theta, [0.0, -0.5])
    assert_numbers(policy.state_dict()["ga.v"], [0.0, 0.0])
    mean_gap = policy.apply(theta, vec(1, 1), lr=0.5, staleness=1, stale_theta=theta0, worker_id=1)
    root = math.sqrt(1 + BETA)
    gaps = [1 + 1 / (1 / root + EPS / 2), 1 + 1 / (1 / root + EPS)]
    assert_numbers(gaps, [2.41386, 2.41386], rtol=1e-5)
    assert_numbers(mean_gap, sum(gaps) / 2)
    d = [1 / gaps[0], 1 / gaps[1]]
    assert_numbers(theta, [0.0 - 0.5 * d[0], -0.5 - 0.5 * d[1]])
    state = policy.state_dict()
    assert_numbers(state["ga.v"], [0.001 * 4, 0.001 * 1])
    assert_numbers(state["dana.v.1"], d)
    assert_numbers(state["dana.last_step"], d)

    # w1 leaves; its buffer moved θ last, so it is still s for w0's push: v = β·v + (1−β)·d².
    policy.forget_worker(1)
    assert policy.worker_ids() == [0]
    policy.apply(theta, vec(0.5, 0.5), lr=0.5, staleness=1, stale_theta=policy.pull_view(theta, lr=0.5, worker_id=0),
                 worker_id=0)
    assert_numbers(policy.state_dict()["ga.v"], [BETA * 0.004 + 0.001 * d[0] ** 2, BETA * 0.001 + 0.001 * d[1] ** 2])


def test_dana_ga_measures_the_gap_against_the_look_ahead():
    policy = make_policy("dana-ga", 2, momentum=0.5)
    ref = RefDana(2, momentum=0.5, gap_aware=True)
    theta, ref_theta = vec(1, -1), [1.0, -1.0]
    sent, ref_sent = {}, {}
    gaps_against_theta = []
    for g, worker, lr in [([1, -0.5], 0, 0.25), ([0.5, 1], 1, 0.25), ([1, 1], 0, 0.5), ([-0.5, 1], 1, 0.5),
                          ([0.25, 0.5], 1, 0.5), ([1, 0.25], 0, 0.5), ([0.5, -1], 0, 0.5)]:
        for w in (0, 1):  # a worker that never pulled was sent the initial parameters
            sent.setdefault(w, vec(1, -1))
            ref_sent.setdefault(w, [1.0, -1.0])
        mean_gap = policy.apply(theta, vec(*g), lr=lr, staleness=1, stale_theta=sent[worker], worker_id=worker)
        ref_theta, ref_mean_gap = ref.push(ref_theta, g, ref_sent[worker], lr, worker)
        assert_numbers(theta, ref_theta)
        assert_numbers(mean_gap, ref_mean_gap)
        sent[worker] = policy.pull_view(theta, lr=lr, worker_id=worker)
        ref_sent[worker] = ref.pull(ref_theta, lr)
        assert_numbers(sent[worker], ref_sent[worker])
        gaps_against_theta.append(abs(ref_sent[worker][0] - ref_theta[0]))
    assert max(gaps_against_theta) > 0.01  # θ̂ really differs from θ, so the test can tell them apart


def test_dana_ga_without_momentum_is_ga_without_momentum():
    dana_ga, ga = make_policy("dana-ga", 2, weight_decay=0.1), make_policy("gap-aware", 2, weight_decay=0.1)
    theta_dana, theta_ga = vec(1, -1), vec(1, -1)
    for step, (g, lr) in enumerate([([1, 2], 0.1), ([-1, 0.5], 0.2), ([0.5, 0.5], 0.1)]):
        stale = vec(1 + 0.1 * step, -1)
        assert dana_ga.apply(theta_dana, vec(*g), lr=lr, staleness=1, stale_theta=stale, worker_id=step % 2) == \
            ga.apply(theta_ga, vec(*g), lr=lr, staleness=1, stale_theta=stale)
        assert torch.equal(theta_dana, theta_ga)
    assert torch.equal(dana_ga.pull_view(theta_dana, lr=0.1, worker_id=0), theta_dana)
    assert set(dana_ga.state_dict()) == {"ga.v", "ga.k", "ga.lr_max"}


# -- state, registry, validation ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(POLICIES))
def test_state_dict_round_trip_reproduces_the_next_updates(name):
    hyper = {"momentum": 0.9, "weight_decay": 0.01, "ga_beta": 0.99}
    first = make_policy(name, 5, **hyper)
    theta = torch.linspace(-1, 1, 5)
    sent = {w: first.pull_view(theta, lr=0.1, worker_id=w) for w in (0, 1)}

    def push(policy, theta, sent, step):
        worker = step % 2
        g = torch.sin(torch.arange(5.0) + step)
        gap = policy.apply(theta, g, lr=0.1 * (1 + step % 3), staleness=step % 4, stale_theta=sent[worker],
                           worker_id=worker)
        sent[worker] = policy.pull_view(theta, lr=0.1, worker_id=worker)
        return gap

    for step in range(4):
        push(first, theta, sent, step)
    saved = save(first.state_dict())
    second = make_policy(name, 5, **hyper)
    loaded = load(saved)
    for key, value in loaded.items():
        expected = {"ga.k": torch.int64, "ga.lr_max": torch.float64}.get(key, torch.float32)
        assert value.dtype == expected and value.dim() == (0 if key in ("ga.k", "ga.lr_max") else 1), key
    second.load_state_dict(loaded)
    theta2, sent2 = theta.clone(), {w: t.clone() for w, t in sent.items()}
    for step in range(4, 8):
        assert push(first, theta, sent, step) == push(second, theta2, sent2, step)
        assert torch.equal(theta, theta2)
    assert all(torch.equal(sent[w], sent2[w]) for w in sent)
    state, state2 = first.state_dict(), second.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)


def test_state_dict_is_a_copy_and_dana_keys_name_the_worker():
    policy = make_policy("dana-ga", 2, momentum=0.5)
    theta = vec(1, 1)
    policy.apply(theta, vec(1, 2), lr=0.1, staleness=0, stale_theta=theta.clone(), worker_id=7)
    state = policy.state_dict()
    assert set(state) == {"dana.v.7", "dana.v_sum", "dana.last_step", "ga.v", "ga.k", "ga.lr_max"}
    state["dana.v.7"].fill_(100)
    state["dana.last_step"].fill_(100)
    assert_numbers(policy.state_dict()["dana.v.7"], [1.0, 2.0])
    assert_numbers(policy.state_dict()["dana.last_step"], [1.0, 2.0])


def test_a_dana_ga_state_of_the_withdrawn_rule_is_refused_with_the_reason():
    """States saved when DANA-GA fed v with the pushing worker's own buffer have no last step."""
    policy = make_policy("dana-ga", 2, momentum=0.5)
    old = {k: v for k, v in policy.state_dict().items() if k != "dana.last_step"}
    with pytest.raises(ValueError, match="Missing key in policy state: 'dana.last_step'.*own buffer"):
        make_policy("dana-ga", 2, momentum=0.5).load_state_dict(old)


def test_load_state_dict_refuses_what_does_not_fit():
    policy = make_policy("gap-aware", 3, momentum=0.9)
    good = policy.state_dict()
    with pytest.raises(ValueError, match="Missing key.*ga.v"):
        policy.load_state_dict({k: v for k, v in good.items() if k != "ga.v"})
    with pytest.raises(ValueError, match="Unexpected keys.*extra"):
        make_policy("gap-aware", 3, momentum=0.9).load_state_dict({**good, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="momentum_buffer.*shape"):
        make_policy("gap-aware", 3, momentum=0.9).load_state_dict({**good, "momentum_buffer": torch.zeros(4)})
    with pytest.raises(ValueError, match="ga.k.*dtype"):
        make_policy("gap-aware", 3, momentum=0.9).load_state_dict({**good, "ga.k": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="Invalid DANA buffer key"):
        make_policy("dana", 3, momentum=0.9).load_state_dict({"dana.v_sum": torch.zeros(3),
                                                               "dana.v.x": torch.zeros(3)})


def test_registry_names_classes_and_snapshots():
    assert list(POLICIES) == ["asgd", "staleness-aware", "gap-aware", "dana", "dana-ga"]
    for name, cls in POLICIES.items():
        policy = make_policy(name, 4, momentum=0.5)
        assert type(policy) is cls and policy.name == name and policy.numel == 4
        assert policy.needs_snapshot == (name in ("gap-aware", "dana-ga"))
    assert make_policy("gap-aware", 4, ga_beta=0.9, ga_eps=1e-6).hyperparameters() == {
        "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "ga_beta": 0.9, "ga_eps": 1e-6}
    assert make_policy("dana", 4, momentum=0.5, ga_beta=0.9).hyperparameters() == {
        "momentum": 0.5, "nesterov": False, "weight_decay": 0.0}


def test_registry_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="'sync'.*asgd, staleness-aware, gap-aware, dana, dana-ga"):
        make_policy("sync", 4)


@pytest.mark.parametrize("name, hyper, message", [
    ("asgd", {"momentum": -0.1}, "Invalid momentum value: -0.1"),
    ("asgd", {"momentum": 1.0}, "Invalid momentum value: 1.0"),
    ("dana", {"momentum": float("nan")}, "Invalid momentum value: nan"),
    ("staleness-aware", {"weight_decay": -1e-4}, "Invalid weight_decay value: -0.0001"),
    ("gap-aware", {"weight_decay": float("inf")}, "Invalid weight_decay value: inf"),
    ("asgd", {"nesterov": True}, "Nesterov momentum requires a momentum"),
    ("gap-aware", {"ga_beta": 1.0}, "Invalid GA beta value: 1.0"),
    ("dana-ga", {"ga_beta": -0.5}, "Invalid GA beta value: -0.5"),
    ("gap-aware", {"ga_eps": 0.0}, "Invalid GA epsilon value: 0.0"),
    ("dana-ga", {"ga_eps": -1e-8}, "Invalid GA epsilon value: -1e-08"),
    ("asgd", {"ga_eps": float("nan")}, "Invalid GA epsilon value: nan"),  # every setting is checked, used or not
])
def test_invalid_hyperparameters_are_refused(name, hyper, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, 4, **hyper)


@pytest.mark.parametrize("numel", [0, -3, 2.0])
def test_invalid_numel_is_refused(numel):
    with pytest.raises(ValueError, match="Invalid numel"):
        make_policy("asgd", numel)


def test_unknown_setting_is_refused():
    with pytest.raises(TypeError, match="beta"):
        make_policy("asgd", 4, beta=0.9)


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("hyper", [{}, {"momentum": 0.9, "weight_decay": 0.01}, {"momentum": 0.9, "nesterov": True}],
                         ids=["plain", "momentum+decay", "nesterov"])
def test_a_push_in_slices_is_the_push_in_one_piece(monkeypatch, name, hyper):
    """Eleven elements in slices of 4, 4 and 3 (server/policies/slices.py), against one slice: the
    same to float32 precision (a torch kernel's vector and scalar paths may round differently)."""
    if name.startswith("dana") and hyper.get("nesterov"):
        hyper = {"momentum": 0.9}
    monkeypatch.setenv(fused.SWITCH, "0")
    results = []
    for size in (4, 11):
        monkeypatch.setattr(slices, "SLICE", size)
        policy = make_policy(name, 11, **hyper)
        theta = torch.linspace(-1, 1, 11)
        gaps = []
        for step in range(4):
            stale = policy.pull_view(theta, lr=0.1, worker_id=step % 2) + 0.05 * torch.cos(torch.arange(11.0) * step)
            gaps.append(policy.apply(theta, torch.sin(torch.arange(11.0) + step), lr=0.1, staleness=2,
                                     stale_theta=stale, worker_id=step % 2))
        results.append((theta, policy.state_dict(), gaps))
    (theta, state, gaps), (ref_theta, ref_state, ref_gaps) = results
    assert_numbers(theta, ref_theta, rtol=1e-6)
    assert state.keys() == ref_state.keys()
    for key in state:
        assert_numbers(state[key], ref_state[key], rtol=1e-6)
    assert gaps == pytest.approx(ref_gaps, rel=1e-6)
    assert max(gaps) > 1.0 or not POLICIES[name].needs_snapshot


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("hyper", [{}, {"momentum": 0.9, "weight_decay": 0.01}, {"momentum": 0.9, "nesterov": True}],
                         ids=["plain", "momentum+decay", "nesterov"])
def test_apply_only_reads_the_gradient_and_the_snapshot(name, hyper):
    if name.startswith("dana") and hyper.get("nesterov"):
        hyper = {"momentum": 0.9}
    policy = make_policy(name, 5, **hyper)
    theta = torch.linspace(-1, 1, 5)
    for step in range(3):
        grad = torch.sin(torch.arange(5.0) + step)
        stale = policy.pull_view(theta, lr=0.1, worker_id=step % 2) + 0.01
        grad_before, stale_before, theta_before = grad.clone(), stale.clone(), theta.clone()
        policy.apply(theta, grad, lr=0.1, staleness=1, stale_theta=stale, worker_id=step % 2)
        assert torch.equal(grad, grad_before) and torch.equal(stale, stale_before)
        assert not torch.equal(theta, theta_before)
