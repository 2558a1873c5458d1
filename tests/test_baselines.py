"""Baselines for the score-function estimator: unbiasedness, variance reduction, errors.

Unbiasedness is checked on many independent replicas at once: a distribution with a batch of
R identical parameter elements and an f that returns one cost per element (the plate case),
so each replica has its own S samples and its own baseline. The replicas are a declared plate
(``plate=True``). The R replica means are independent, which gives an exact standard error; S
is kept small so that a baseline that used its own sample (bias of order 1/S) would be caught.
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
    gk.score_function(f, dist, S, baseline=ema, plate=True)
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
    estimates = gk.score_function(f, dist, S, baseline=b, plate=True)
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
    first = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    assert torch.equal(ema(first, {}), torch.zeros(2, 2))  # no history yet
    ema.update(first)  # average 0.5 * (2, 20), weight 0.5
    assert torch.allclose(ema(torch.zeros(2, 2), {}), torch.tensor([[2.0, 20.0], [2.0, 20.0]]))
    ema.update(torch.zeros(2, 2))  # average 0.25 * (2, 20), weight 1 - 0.25
    third = ema(torch.zeros(2, 2), {})
    assert torch.allclose(third, torch.tensor([[2.0, 20.0]]) * 0.25 / 0.75)
    with pytest.raises(ValueError, match="per_element=True needs the same batch elements"):
        ema(torch.zeros(2, 3), {})


def ema_by_hand(means, decay, *, zero_debias, early_training):
    """The baseline before each call: b_t = a_{t-1} / w_{t-1} (or a_{t-1}), a_0 = w_0 = 0.

    a_t = d_t a_{t-1} + (1 - d_t) m_t, w_t = d_t w_{t-1} + (1 - d_t) = 1 - prod_u d_u, with
    d_t = min(decay, (1 + t) / (10 + t)) for t = 0, 1, ... under early_training, else decay.
    """
    average = weight = 0.0
    out = []
    for t, m in enumerate(means):
        out.append(0.0 if t == 0 else (average / weight if zero_debias else average))
        d = min(decay, (1 + t) / (10 + t)) if early_training else decay
        average = d * average + (1 - d) * m
        weight = d * weight + (1 - d)
    return out


@pytest.mark.parametrize("early_training", [False, True])
@pytest.mark.parametrize("zero_debias", [True, False])
def test_ema_against_hand_computation(zero_debias, early_training):
    means = [4.0, -2.0, 7.0, 1.0, 3.0]
    ema = ExponentialMovingAverage(0.9, zero_debias=zero_debias, early_training=early_training)
    expected = ema_by_hand(means, 0.9, zero_debias=zero_debias, early_training=early_training)
    for t, (m, b) in enumerate(zip(means, expected, strict=True)):
        signal = m + torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)  # mean m
        value = ema(signal, {})
        assert value.shape == (3,) and value.dtype == torch.float64
        assert torch.allclose(value, torch.full((3,), b, dtype=torch.float64)), (t, value, b)
        ema.update(signal)
        assert ema.steps == t + 1
    # spot checks of the formula: the debiased first value is the first mean exactly, and the
    # early-training decays are 0.1, 2/11, 3/12, ...
    assert expected[1] == pytest.approx(
        4.0 if zero_debias else (0.9 if early_training else 0.1) * 4
    )
    if early_training and zero_debias:
        a2 = (2 / 11) * 0.9 * 4.0 + (9 / 11) * -2.0
        assert expected[2] == pytest.approx(a2 / ((2 / 11) * 0.9 + 9 / 11))
    # the comparison is tight enough to tell the other decay schedule apart
    wrong = ema_by_hand(means, 0.9, zero_debias=zero_debias, early_training=not early_training)
    assert abs(wrong[-1] - expected[-1]) > 1e-3


def test_baseline_value_is_pure_and_update_folds_state():
    ema = ExponentialMovingAverage(decay=0.5)
    ema.update(torch.full((4,), 2.0))
    before = (ema.average.clone(), ema.steps, ema.weight)
    signal = torch.tensor([10.0, 20.0, 30.0, 40.0])
    values = [ema.value(signal, {}), ema(signal, {}), ema.value(signal, {})]
    assert torch.equal(values[0], values[2]) and torch.equal(values[1], torch.full((4,), 2.0))
    assert torch.equal(ema.average, before[0]) and (ema.steps, ema.weight) == before[1:]
    ema.update(signal)  # average 0.5 * 1 + 0.5 * 25 = 13, weight 0.75
    assert ema.steps == 2 and float(ema.average) == pytest.approx(13.0)
    assert float(ema(signal, {})[0]) == pytest.approx(13.0 / 0.75)
    # stateless baselines: update is a no-op, value does not depend on earlier calls
    loo = LeaveOneOut()
    loo.update(signal)
    assert torch.equal(loo(torch.tensor([1.0, 2.0, 6.0]), {}), torch.tensor([4.0, 3.5, 1.5]))


class Recording(Baseline):
    """A constant baseline that records the order of value and update calls and their signals."""

    def __init__(self, constant=0.0):
        self.constant, self.log = constant, []

    def value(self, signal, scores):
        self.log.append(("value", signal.clone()))
        return torch.full_like(signal, self.constant)

    def update(self, signal):
        self.log.append(("update", signal.clone()))


def test_score_function_updates_once_per_call_after_using_the_value():
    dist = Normal(torch.tensor([0.5, -1.0]), torch.ones(2))
    b = Recording()
    seen = []

    def f(x):
        seen.append(x)
        return quadratic(x)

    gk.score_function(f, dist, 6, baseline=b, plate=True)
    assert [kind for kind, _ in b.log] == ["value", "update"]
    assert torch.equal(b.log[1][1], quadratic(seen[0]))  # the signal of this call, (S, 2)
    # with a control variate the estimator runs twice, but the baseline is updated once
    b.log.clear()
    cv = gk.control_variates.DeltaMethod()
    gk.score_function(quadratic, dist, 6, baseline=b, control_variate=cv, plate=True)
    assert [kind for kind, _ in b.log].count("update") == 1 and b.log[-1][0] == "update"


@pytest.mark.parametrize("estimator", ["score_function", "rao_blackwell"])
def test_expectation_updates_once_per_call_in_the_units_of_f(estimator):
    if estimator == "score_function":
        param = torch.tensor([0.5, -1.0], requires_grad=True)
        f = quadratic
    else:
        param = torch.tensor([0.2, -0.1, 0.4], requires_grad=True)
        f = lambda z: torch.tensor([1.0, -2.0, 4.0])[z]  # noqa: E731
    b = Recording()
    for step in range(1, 4):
        if estimator == "score_function":
            dist = Normal(param, torch.ones(2))
        else:
            dist = torch.distributions.Categorical(logits=param)
        value = gk.expectation(f, dist, 8, estimator=estimator, baseline=b, plate=True)
        assert [kind for kind, _ in b.log].count("update") == step  # in the forward pass
        (1e-3 * value.sum()).backward()  # a loss on another scale: the baseline never sees it
        kinds = [kind for kind, _ in b.log]
        assert kinds.count("update") == step and kinds[-1] == "update"
        assert float(b.log[-1][1].abs().min()) > 0.5  # f's own values, not 1e-3 f


def test_ema_through_expectation_and_score_function_counts_calls():
    loc = torch.zeros(3, requires_grad=True)
    dist = Normal(loc, torch.ones(3))
    ema = ExponentialMovingAverage(decay=0.5)
    for _ in range(4):
        value = gk.expectation(
            quadratic, dist, 16, estimator="score_function", baseline=ema, plate=True
        )
        value.sum().backward()
    assert ema.steps == 4
    gk.score_function(
        quadratic, Normal(torch.zeros(3), torch.ones(3)), 16, baseline=ema, plate=True
    )
    assert ema.steps == 5


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
    with_learned = gk.score_function(quadratic, big, S, baseline=prediction, plate=True)
    plain = gk.score_function(quadratic, big, S, plate=True)
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
    value = gk.expectation(
        quadratic, dist, 16, estimator="score_function", baseline=prediction, plate=True
    )
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

    needs_scores = True  # a dict baseline is checked against (and aligned with) the scores

    def __init__(self, values):
        self.values = values

    def value(self, signal, scores):
        return self.values


def same_draws(f, dist, num_samples, **options):
    """The samples an estimator call drew, and its estimates (f records its first input)."""
    seen = []

    def recorded(x):
        seen.append(x)
        return f(x)

    g = gk.score_function(recorded, dist, num_samples, **options)
    return seen[0], g


@pytest.mark.filterwarnings("ignore::gradkit.PlateHint")  # undeclared on purpose
def test_per_parameter_dict_baseline():
    dist = Normal(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0]))
    baseline = PerParameter({"loc": 1.0, "scale": 3.0})
    x, g = same_draws(quadratic, dist, 6, baseline=baseline, plate=True)
    s = gk.score(dist, x)
    assert torch.allclose(g["loc"], (quadratic(x) - 1.0) * s["loc"])
    assert torch.allclose(g["scale"], (quadratic(x) - 3.0) * s["scale"])
    # coupled: the summed signal less each parameter's constant
    x, g = same_draws(quadratic, dist, 6, baseline=baseline)
    s = gk.score(dist, x)
    assert torch.allclose(g["loc"], (quadratic(x).sum(-1, keepdim=True) - 1.0) * s["loc"])


@pytest.mark.filterwarnings("ignore::gradkit.PlateHint")  # undeclared on purpose
def test_plate_signal_versus_coupled_signal():
    dist = Normal(torch.tensor([0.5, -1.0, 2.0]), torch.ones(3))
    x, plate = same_draws(quadratic, dist, 5, baseline=1.0, plate=True)
    s = gk.score(dist, x)["loc"]
    # plate: element b is credited with its own cost only; coupled: with the summed cost
    assert torch.allclose(plate["loc"], (quadratic(x) - 1.0) * s)
    x, coupled = same_draws(lambda x: quadratic(x).sum(-1), dist, 5, baseline=1.0)
    s = gk.score(dist, x)["loc"]
    assert torch.allclose(coupled["loc"], (quadratic(x).sum(-1, keepdim=True) - 1.0) * s)
    # the same elementwise cost without a declared plate is coupled as well
    x, undeclared = same_draws(quadratic, dist, 5, baseline=1.0)
    s = gk.score(dist, x)["loc"]
    assert torch.allclose(undeclared["loc"], (quadratic(x).sum(-1, keepdim=True) - 1.0) * s)


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
        gk.score_function(quadratic, dist, 4, baseline=torch.zeros(3), plate=True)
    with pytest.raises(ValueError, match="does not broadcast"):  # one signal per sample
        gk.score_function(quadratic, dist, 4, baseline=torch.zeros(5))


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
        gk.score_function(quadratic, dist, 4, baseline=PerParameter({"loc": 1.0}), plate=True)
    bad = PerParameter({"loc": torch.zeros(3), "scale": 0.0})
    with pytest.raises(ValueError, match="for parameter 'loc'.*does not broadcast"):
        gk.score_function(quadratic, dist, 4, baseline=bad, plate=True)

    class NoScores(PerParameter):
        needs_scores = False

    with pytest.raises(TypeError, match="needs_scores = True"):
        gk.score_function(quadratic, dist, 4, baseline=NoScores({"loc": 1.0, "scale": 0.0}))
