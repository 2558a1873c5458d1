"""Baselines for the score-function estimator: unbiasedness, variance reduction, errors.

Unbiasedness is checked on many independent replicas at once: a distribution with a batch of
R identical parameter elements and an f that returns one cost per element (the plate case),
so each replica has its own S samples and its own baseline. The R replica means are
independent, which gives an exact standard error; S is kept small so that a baseline that
used its own sample (bias of order 1/S) would be caught.
"""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal

import gradkit as gk
from gradkit.baselines import (
    Baseline,
    Constant,
    ExponentialMovingAverage,
    LearnedBaseline,
    LeaveOneOut,
    OptimalConstant,
)

MU, SIGMA, P = 0.5, 1.2, 0.3
R, S = 20_000, 4  # replicas, samples per replica


def quadratic(x):
    return x**2 + 10.0


def exponential(x):
    return torch.exp(x)


def shifted_square(x):
    return (x - 0.3) ** 2 + 5.0


E_EXP = math.exp(MU + SIGMA**2 / 2)
# name -> (distribution factory with R replicas, f, exact gradients, E[f])
CASES = {
    "normal-quadratic": (
        lambda: Normal(torch.full((R,), MU), torch.full((R,), SIGMA)),
        quadratic,
        {"loc": 2 * MU, "scale": 2 * SIGMA},
        MU**2 + SIGMA**2 + 10.0,
    ),
    "normal-exp": (
        lambda: Normal(torch.full((R,), MU), torch.full((R,), SIGMA)),
        exponential,
        {"loc": E_EXP, "scale": SIGMA * E_EXP},
        E_EXP,
    ),
    # E f = p (0.7^2) + (1 - p) 0.3^2 + 5, so d/dp = 0.4 and d/dlogit = 0.4 p (1 - p)
    "bernoulli-probs": (
        lambda: Bernoulli(probs=torch.full((R,), P)),
        shifted_square,
        {"probs": 0.4},
        P * 0.49 + (1 - P) * 0.09 + 5.0,
    ),
    "bernoulli-logits": (
        lambda: Bernoulli(logits=torch.full((R,), math.log(P / (1 - P)))),
        shifted_square,
        {"logits": 0.4 * P * (1 - P)},
        P * 0.49 + (1 - P) * 0.09 + 5.0,
    ),
}


def warmed_ema(f, dist):
    """An EMA baseline that has seen one earlier, independent batch of signals."""
    ema = ExponentialMovingAverage(decay=0.9)
    gk.score_function(f, dist, S, baseline=ema)
    return ema


BASELINES = {
    "none": lambda f, dist, mean_f: None,
    "constant": lambda f, dist, mean_f: Constant(mean_f),
    "constant-tensor": lambda f, dist, mean_f: torch.full((R,), mean_f + 1.0),
    "ema": lambda f, dist, mean_f: warmed_ema(f, dist),
    "leave-one-out": lambda f, dist, mean_f: LeaveOneOut(),
    "optimal-constant": lambda f, dist, mean_f: OptimalConstant(),
}


def replica_summary(estimates, exact):
    """Summaries over the R independent replica means of (S, R) per-sample estimates."""
    means = {name: g.mean(0) for name, g in estimates.items()}
    return gk.diagnostics.summarize(means, exact)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("baseline", list(BASELINES))
def test_baseline_keeps_estimator_unbiased(case, baseline):
    make_dist, f, exact, mean_f = CASES[case]
    dist = make_dist()
    b = BASELINES[baseline](f, dist, mean_f)
    estimates = gk.score_function(f, dist, S, baseline=b)
    for name, summary in replica_summary(estimates, exact).items():
        assert summary.within(4), (name, summary.mean, summary.exact, summary.z_score)


@pytest.mark.parametrize("baseline", ["constant", "ema", "leave-one-out", "optimal-constant"])
def test_baseline_unbiased_when_signal_is_coupled(baseline):
    # f sums over a batch of 3: one learning signal per sample, shared by every element.
    loc = torch.tensor([0.5, -1.0, 2.0])
    dist = Normal(loc, torch.full((3,), SIGMA))

    def f(x):
        return quadratic(x).sum(-1)

    mean_f = float((loc**2 + SIGMA**2 + 10.0).sum())
    b = {
        "constant": Constant(mean_f),
        "ema": ExponentialMovingAverage(decay=0.5),  # zero on the first of the 3 runs
        "leave-one-out": LeaveOneOut(),
        "optimal-constant": OptimalConstant(),
    }[baseline]
    exact = {"loc": 2 * loc, "scale": torch.full((3,), 2 * SIGMA)}
    summaries = gk.diagnostics.gradient_moments(
        gk.score_function, f, dist, 5_000, repeats=3, exact=exact, baseline=b
    )
    for name, summary in summaries.items():
        assert summary.within(4), (name, summary.z_score)


def quadrature_moments(baseline: dict[str, float] | float) -> dict[str, tuple[float, float]]:
    """Variance and 4th central moment of (f - b) * score, Normal(MU, SIGMA), f = x^2 + 10.

    Gauss-Hermite quadrature with 60 nodes is exact for these polynomial integrands.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    x = MU + SIGMA * nodes
    scores = {"loc": (x - MU) / SIGMA**2, "scale": ((x - MU) ** 2 - SIGMA**2) / SIGMA**3}
    exact = {"loc": 2 * MU, "scale": 2 * SIGMA}
    out = {}
    for name, s in scores.items():
        b = baseline[name] if isinstance(baseline, dict) else baseline
        centred = (x**2 + 10.0 - b) * s - exact[name]
        out[name] = (float((weights * centred**2).sum()), float((weights * centred**4).sum()))
    return out


def optimal_baseline() -> dict[str, float]:
    """b* = E[s^2 f] / E[s^2] per parameter, by quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    x = MU + SIGMA * nodes
    scores = {"loc": (x - MU) / SIGMA**2, "scale": ((x - MU) ** 2 - SIGMA**2) / SIGMA**3}
    f = x**2 + 10.0
    return {
        n: float((weights * s**2 * f).sum() / (weights * s**2).sum()) for n, s in scores.items()
    }


def test_variance_matches_quadrature_and_drops_as_theory_says():
    dist = Normal(torch.tensor(MU, dtype=torch.float64), torch.tensor(SIGMA, dtype=torch.float64))
    mean_f = MU**2 + SIGMA**2 + 10.0
    n = 40_000
    baselines = {
        "none": (None, 0.0),
        "constant": (Constant(mean_f), mean_f),
        # RLOO's baseline is the mean of f up to O(1/n) noise, the optimal one b* likewise
        "leave-one-out": (LeaveOneOut(), mean_f),
        "optimal-constant": (OptimalConstant(), optimal_baseline()),
    }
    measured, expected = {}, {}
    for label, (baseline, b) in baselines.items():
        g = gk.score_function(quadratic, dist, n, baseline=baseline)
        measured[label] = {name: float(v.var()) for name, v in g.items()}
        expected[label] = quadrature_moments(b)
        for name, (variance, fourth) in expected[label].items():
            # standard error of a sample variance: sqrt((mu_4 - sigma^4) / n)
            se = math.sqrt((fourth - variance**2) / n)
            assert abs(measured[label][name] - variance) < 4 * se, (label, name)
    for name in ("loc", "scale"):
        assert expected["none"][name][0] > 4 * expected["constant"][name][0]
        assert expected["optimal-constant"][name][0] < expected["constant"][name][0]
        assert measured["optimal-constant"][name] < measured["constant"][name]
        assert measured["leave-one-out"][name] < measured["none"][name] / 4


def test_leave_one_out_lowers_bernoulli_variance():
    dist = Bernoulli(probs=torch.tensor(P))
    plain = gk.score_function(shifted_square, dist, 10_000)["probs"].var()
    rloo = gk.score_function(shifted_square, dist, 10_000, baseline=LeaveOneOut())["probs"].var()
    # with f = c + a x the centred signal is a (x - p): variance drops from ~E[f^2 s^2] to ~a^2
    assert rloo < plain / 20


def test_ema_tracks_the_mean_signal_and_lowers_variance():
    dist = Normal(torch.tensor(MU), torch.tensor(SIGMA))
    ema = ExponentialMovingAverage(decay=0.8)
    for _ in range(30):
        gk.score_function(quadratic, dist, 1_000, baseline=ema)
    b = ema(torch.zeros(2), {})
    assert float(b[0]) == pytest.approx(MU**2 + SIGMA**2 + 10.0, rel=0.05)
    with_ema = gk.score_function(quadratic, dist, 20_000, baseline=ema)["loc"].var()
    plain = gk.score_function(quadratic, dist, 20_000)["loc"].var()
    assert with_ema < plain / 4


def test_ema_bias_correction_and_per_element_state():
    ema = ExponentialMovingAverage(decay=0.5, per_element=True)
    first = ema(torch.tensor([[1.0, 10.0], [3.0, 30.0]]), {})
    assert torch.equal(first, torch.zeros(2, 2))
    second = ema(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), {})
    assert torch.allclose(second, torch.tensor([[2.0, 20.0], [2.0, 20.0]]))
    # third step: average = 0.5 * (0.5 * m1) + 0, bias-corrected by 1 - 0.25
    third = ema(torch.zeros(2, 2), {})
    assert torch.allclose(third, torch.tensor([[2.0, 20.0]]) * 0.25 / 0.75)


def test_leave_one_out_and_optimal_constant_values():
    signal = torch.tensor([1.0, 2.0, 6.0])
    assert torch.allclose(LeaveOneOut()(signal, {}), torch.tensor([4.0, 3.5, 1.5]))
    scores = {"loc": torch.tensor([1.0, -2.0, 1.0])}
    b = OptimalConstant()(signal, scores)["loc"]
    # sample 0 uses (4*2 + 1*6)/(4 + 1) from samples 1 and 2, and so on
    assert torch.allclose(b, torch.tensor([14 / 5, 7 / 2, 9 / 5]))


def test_learned_baseline_prediction_used_as_constant():
    # Replicas with different means u_r: E f = u^2 + sigma^2 + 10 depends on the input u.
    u = torch.linspace(-1.0, 1.0, 512)
    features = torch.stack([u, 3 * u**2 - 1], -1)  # centred features: a well-conditioned fit
    learned = LearnedBaseline(torch.nn.Linear(2, 1))
    optimiser = torch.optim.Adam(learned.parameters(), lr=0.2)
    dist = Normal(u, torch.full_like(u, SIGMA))
    for _ in range(200):
        optimiser.zero_grad()
        signal = quadratic(dist.sample((8,)))
        learned.loss(learned(features), signal.mean(0)).backward()
        optimiser.step()
    target = u**2 + SIGMA**2 + 10.0
    assert torch.allclose(learned(features), target, atol=0.25)

    big = Normal(u.repeat(40), torch.full((512 * 40,), SIGMA))
    prediction = learned(features.repeat(40, 1))
    with_learned = gk.score_function(quadratic, big, S, baseline=prediction)
    plain = gk.score_function(quadratic, big, S)
    exact = {"loc": 2 * u.repeat(40), "scale": torch.full((512 * 40,), 2 * SIGMA)}
    # each replica's mean, centred by its exact gradient, should average to zero
    for name in ("loc", "scale"):
        centred = {name: (with_learned[name].mean(0) - exact[name])[:, None]}
        assert gk.diagnostics.summarize(centred, {name: 0.0})[name].within(4)
        assert with_learned[name].var() < plain[name].var() / 4


def test_learned_baseline_gets_no_gradient_from_the_estimator():
    learned = LearnedBaseline(torch.nn.Linear(1, 1))
    loc = torch.zeros(5, requires_grad=True)
    dist = Normal(loc, torch.ones(5))
    prediction = learned(torch.ones(5, 1))
    value = gk.expectation(quadratic, dist, 16, estimator="score_function", baseline=prediction)
    value.sum().backward()
    assert loc.grad is not None and loc.grad.shape == (5,)
    assert all(p.grad is None for p in learned.parameters())


def test_learned_baseline_shapes():
    learned = LearnedBaseline(torch.nn.Linear(3, 1))
    assert learned(torch.zeros(4, 3)).shape == (4,)
    assert LearnedBaseline(torch.nn.Linear(3, 2))(torch.zeros(4, 3)).shape == (4, 2)
    assert learned.loss(torch.zeros(3), torch.ones(3)).item() == 1.0


class PerParameter(Baseline):
    """A per-parameter dict baseline: a different constant for each parameter."""

    def __init__(self, values):
        self.values = values

    def value(self, signal, scores):
        return self.values


def same_draws(f, dist, num_samples, **options):
    """Samples and estimates from the same random draws (score_function samples first)."""
    torch.manual_seed(1)
    x = dist.sample((num_samples,))
    torch.manual_seed(1)
    return x, gk.score_function(f, dist, num_samples, **options)


def test_per_parameter_dict_baseline():
    dist = Normal(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0]))
    x, g = same_draws(quadratic, dist, 6, baseline=PerParameter({"loc": 1.0, "scale": 3.0}))
    s = gk.score(dist, x)
    assert torch.allclose(g["loc"], (quadratic(x) - 1.0) * s["loc"])
    assert torch.allclose(g["scale"], (quadratic(x) - 3.0) * s["scale"])


def test_plate_signal_versus_coupled_signal():
    dist = Normal(torch.tensor([0.5, -1.0, 2.0]), torch.ones(3))
    x, plate = same_draws(quadratic, dist, 5, baseline=1.0)
    _, coupled = same_draws(lambda x: quadratic(x).sum(-1), dist, 5, baseline=1.0)
    s = gk.score(dist, x)["loc"]
    # plate: element b is credited with its own cost only; coupled: with the summed cost
    assert torch.allclose(plate["loc"], (quadratic(x) - 1.0) * s)
    assert torch.allclose(coupled["loc"], (quadratic(x).sum(-1, keepdim=True) - 1.0) * s)


def test_baselines_keep_dtype():
    dist = Normal(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    for b in (Constant(1.0), ExponentialMovingAverage(), LeaveOneOut(), OptimalConstant()):
        g = gk.score_function(quadratic, dist, 4, baseline=b)
        assert all(v.dtype == torch.float64 for v in g.values())


@pytest.mark.parametrize("baseline", [LeaveOneOut(), OptimalConstant()])
def test_leave_one_out_baselines_need_two_samples(baseline):
    dist = Normal(torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="at least 2 samples"):
        gk.score_function(quadratic, dist, 1, baseline=baseline)


def test_wrong_shaped_baseline_tensor():
    dist = Normal(torch.zeros(5), torch.ones(5))
    with pytest.raises(ValueError, match="does not broadcast"):
        gk.score_function(quadratic, dist, 4, baseline=torch.zeros(3))


@pytest.mark.parametrize("decay", [1.0, -0.1, "0.9", True, None])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\)"):
        ExponentialMovingAverage(decay=decay)


@pytest.mark.parametrize("value", ["mean", [1.0], True, LearnedBaseline(torch.nn.Linear(1, 1))])
def test_constant_must_be_a_number_or_tensor(value):
    dist = Normal(torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(TypeError, match="must be a number or a tensor"):
        gk.score_function(quadratic, dist, 4, baseline=value)


def test_dict_baseline_errors():
    dist = Normal(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match=r"without \['scale'\]"):
        gk.score_function(quadratic, dist, 4, baseline=PerParameter({"loc": 1.0}))
    bad = PerParameter({"loc": torch.zeros(3), "scale": 0.0})
    with pytest.raises(ValueError, match="for parameter 'loc'.*does not broadcast"):
        gk.score_function(quadratic, dist, 4, baseline=bad)
