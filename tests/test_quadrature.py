"""Exact Gaussian references (gradkit.quadrature) against closed forms and against Monte Carlo.

For f(x) = (x - k)^2 every per-sample variance has a closed form in a = mu - k and sigma
(derived from Gaussian, Rayleigh, Maxwell and uniform moments); for cos(kx) and exp(-k x^2)
the expectations and their gradients are closed form. The Monte Carlo tests compare the
library's estimators with the references within a few standard errors of the sample variance.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradkit as gk
from gradkit import quadrature as q
from tests.stats import Z

R = math.sqrt(math.pi / 2)  # E[Rayleigh(1)]


def quadratic_variances(a: float, s: float) -> dict[tuple, float]:
    """Closed-form per-sample variances for f = (x - k)^2, a = mu - k, s = sigma."""
    return {
        ("score_function", "loc", None, True): (a**4 + 18 * a**2 * s**2 + 15 * s**4) / s**2
        - 4 * a**2,
        ("score_function", "scale", None, True): (2 * a**4 + 60 * a**2 * s**2 + 78 * s**4) / s**2
        - 4 * s**2,
        ("score_function", "loc", "optimal", True): 8 * a**2 + 6 * s**2,
        ("score_function", "scale", "optimal", True): 40 * a**2 + 24 * s**2,
        ("pathwise", "loc", None, True): 4 * s**2,
        ("pathwise", "scale", None, True): 4 * a**2 + 8 * s**2,
        ("measure_valued", "loc", None, True): 4 * a**2 * (4 / math.pi - 1),
        ("measure_valued", "scale", None, True): 4 * a**2 + 4 * s**2,
        ("measure_valued", "loc", None, False): 8 * a**2 / math.pi + 4 * s**2 / math.pi - 2 * a**2,
        ("measure_valued", "scale", None, False): 16 * a**2 + 8 * s**2,
    }


@pytest.mark.parametrize(
    ("mu", "sigma", "k"), [(1.0, 1.0, -2.0), (1.0, 1.3, 1.0), (-0.5, 0.4, 2.5)]
)
def test_quadratic_cost_all_variances_closed_form(mu, sigma, k):
    f = lambda x: (x - k) ** 2  # noqa: E731
    for (estimator, param, baseline, coupling), exact in quadratic_variances(mu - k, sigma).items():
        got = q.gaussian_gradient_variance(
            f, mu, sigma, estimator=estimator, param=param, baseline=baseline, coupling=coupling
        )
        assert got == pytest.approx(exact, rel=1e-9, abs=1e-10), (estimator, param, baseline)


def test_constant_baseline_and_gradient_of_quadratic():
    mu, sigma, k, b = 0.3, 1.5, 1.0, 2.0
    a = mu - k
    f = lambda x: (x - k) ** 2  # noqa: E731
    assert q.gaussian_gradient(f, mu, sigma, param="loc") == pytest.approx(2 * a)
    assert q.gaussian_gradient(f, mu, sigma, param="scale") == pytest.approx(2 * sigma)
    # E[(f - b)^2 s^2] - g^2 = E[f^2 s^2] - 2 b E[f s^2] + b^2 E[s^2] - g^2, s = z / sigma
    plain = (a**4 + 18 * a**2 * sigma**2 + 15 * sigma**4) / sigma**2 - 4 * a**2
    cross = (a**2 + 3 * sigma**2) / sigma**2
    exact = plain - 2 * b * cross + b**2 / sigma**2
    got = q.gaussian_gradient_variance(
        f, mu, sigma, estimator="score_function", param="loc", baseline=b
    )
    assert got == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("k", [0.5, 3.0, 12.0])
def test_cosine_gradient_and_pathwise_variance(k):
    mu, sigma = 1.0, 1.0
    damp = math.exp(-0.5 * k**2 * sigma**2)
    f = lambda x: torch.cos(k * x)  # noqa: E731
    g_loc = -k * math.sin(k * mu) * damp
    assert q.gaussian_gradient(f, mu, sigma, param="loc") == pytest.approx(g_loc, abs=1e-12)
    g_scale = -(k**2) * sigma * math.cos(k * mu) * damp
    assert q.gaussian_gradient(f, mu, sigma, param="scale") == pytest.approx(g_scale, abs=1e-12)
    # pathwise loc: E[k^2 sin^2(kx)] - g^2, sin^2 = (1 - cos 2kx)/2
    sin2 = 0.5 * (1 - math.cos(2 * k * mu) * math.exp(-2 * k**2 * sigma**2))
    exact = k**2 * sin2 - g_loc**2
    got = q.gaussian_gradient_variance(f, mu, sigma, estimator="pathwise", param="loc")
    assert got == pytest.approx(exact, rel=1e-9)


def test_gaussian_expectation_is_differentiable_and_exact():
    mu = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    k = 0.8
    value = q.gaussian_expectation(lambda x: torch.exp(-k * x**2), mu, sigma)
    closed = torch.exp(-k * mu**2 / (1 + 2 * k * sigma**2)) / torch.sqrt(1 + 2 * k * sigma**2)
    torch.testing.assert_close(value, closed, rtol=1e-12, atol=0)
    got = torch.autograd.grad(value, [mu, sigma])
    want = torch.autograd.grad(closed, [mu, sigma])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # the score-form gradient agrees with autograd through the quadrature
    f = lambda x: torch.exp(-k * x**2)  # noqa: E731
    assert q.gaussian_gradient(f, 0.7, 0.9, param="scale") == pytest.approx(float(want[1]))


def test_gaussian_expectation_vector_and_dtype():
    loc = torch.tensor([0.2, -0.4])
    scale = torch.tensor([0.5, 1.1])
    a = torch.tensor([0.3, -0.6], dtype=torch.float64)
    value = q.gaussian_expectation(lambda x: torch.exp(x @ a), loc, scale, num_nodes=128)
    assert value.dtype == torch.float32
    closed = math.exp(float(a @ loc.double()) + 0.5 * float((a**2 * scale.double() ** 2).sum()))
    assert float(value) == pytest.approx(closed, rel=1e-6)
    many = q.gaussian_expectation(lambda x: torch.stack([x, x**2], -1), 1.0, 2.0)  # (M, 2)
    torch.testing.assert_close(many, torch.tensor([1.0, 5.0], dtype=torch.float64))


def test_normal_rule_moments():
    z, w = q.normal_rule(64, dtype=torch.float32)
    assert z.dtype == torch.float32 and w.shape == (64,)
    z, w = q.normal_rule(128)
    for n, moment in [(0, 1.0), (2, 1.0), (4, 3.0), (6, 15.0), (8, 105.0)]:
        assert float((w * z**n).sum()) == pytest.approx(moment, rel=1e-12)


def _mc_variance(values: torch.Tensor) -> tuple[float, float]:
    """Sample variance and its standard error, sqrt((m4 - v^2) / n)."""
    centred = values.double() - values.double().mean()
    v = float(centred.pow(2).mean())
    m4 = float(centred.pow(4).mean())
    return v, math.sqrt(max(m4 - v**2, 0.0) / len(values))


@pytest.mark.parametrize(
    ("estimator", "options", "ref"),
    [
        ("score_function", {}, {}),
        ("score_function", {"baseline": gk.baselines.OptimalConstant()}, {"baseline": "optimal"}),
        ("pathwise", {}, {}),
        ("measure_valued", {}, {}),
        ("measure_valued", {"coupling": False}, {"coupling": False}),
    ],
)
def test_library_estimators_match_exact_variances(estimator, options, ref):
    mu, sigma, k = 1.0, 1.0, 0.7
    n = 200_000
    f = lambda x: torch.exp(-k * x**2)  # noqa: E731
    dist = torch.distributions.Normal(
        torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    )
    estimates = gk.ESTIMATORS[estimator](f, dist, n, **options)
    for param in ("loc", "scale"):
        exact = q.gaussian_gradient_variance(f, mu, sigma, estimator=estimator, param=param, **ref)
        mean_exact = q.gaussian_gradient(f, mu, sigma, param=param)
        v, se = _mc_variance(estimates[param])
        assert abs(v - exact) < Z * se, (param, v, exact, se)
        g = estimates[param]
        assert abs(float(g.mean()) - mean_exact) < Z * float(g.std()) / math.sqrt(n)


def test_discontinuous_cost_gradient():
    # f = 1[x > 0]: d/dmu P(x > 0) = phi(mu/sigma)/sigma, though f has no useful derivative
    mu, sigma = 0.4, 1.2
    exact = math.exp(-0.5 * (mu / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    got = q.gaussian_gradient(lambda x: (x > 0).double(), mu, sigma, param="loc")
    assert got == pytest.approx(exact, rel=0.03)  # a jump costs accuracy of order the spacing
    with pytest.raises(ValueError, match="differentiable"):
        q.gaussian_gradient_variance(
            lambda x: (x > 0).double(), mu, sigma, estimator="pathwise", param="loc"
        )


def test_errors():
    f = lambda x: x**2  # noqa: E731
    with pytest.raises(ValueError, match="unknown estimator"):
        q.gaussian_gradient_variance(f, 0.0, 1.0, estimator="reinforce", param="loc")
    with pytest.raises(ValueError, match="param must be 'loc' or 'scale'"):
        q.gaussian_gradient_variance(f, 0.0, 1.0, estimator="pathwise", param="mu")
    with pytest.raises(ValueError, match="baseline applies to estimator='score_function'"):
        q.gaussian_gradient_variance(
            f, 0.0, 1.0, estimator="pathwise", param="loc", baseline="optimal"
        )
    with pytest.raises(ValueError, match="coupling applies to estimator='measure_valued'"):
        q.gaussian_gradient_variance(
            f, 0.0, 1.0, estimator="score_function", param="loc", coupling=False
        )
    with pytest.raises(ValueError, match="baseline must be None, 'optimal' or a number"):
        q.gaussian_gradient_variance(
            f, 0.0, 1.0, estimator="score_function", param="loc", baseline="best"
        )
    with pytest.raises(ValueError, match="scale must be positive"):
        q.gaussian_gradient(f, 0.0, 0.0, param="loc")
    with pytest.raises(ValueError, match="loc must be a scalar"):
        q.gaussian_gradient(f, torch.zeros(2), 1.0, param="loc")
    with pytest.raises(ValueError, match="finite number"):
        q.gaussian_gradient(f, float("nan"), 1.0, param="loc")
    with pytest.raises(ValueError, match="elementwise"):
        q.gaussian_gradient(lambda x: x.sum(), 0.0, 1.0, param="loc")
    with pytest.raises(ValueError, match="NaN or inf"):
        q.gaussian_gradient(lambda x: 1 / (x - x), 0.0, 1.0, param="loc")
    with pytest.raises(TypeError, match="callable"):
        q.gaussian_gradient(3.0, 0.0, 1.0, param="loc")
    with pytest.raises(ValueError, match="num_nodes must be an int >= 2"):
        q.normal_rule(1)
    with pytest.raises(ValueError, match="same shape"):
        q.gaussian_expectation(f, torch.zeros(2), torch.ones(3))
    with pytest.raises(ValueError, match="too large"):
        q.gaussian_expectation(lambda x: x.sum(-1), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="positive everywhere"):
        q.gaussian_expectation(f, torch.zeros(2), torch.tensor([1.0, -1.0]), num_nodes=8)
    with pytest.raises(ValueError, match="one value"):
        q.gaussian_expectation(lambda x: x.sum(), 0.0, 1.0)
    with pytest.raises(TypeError, match="callable"):
        q.gaussian_expectation(None, 0.0, 1.0)


@pytest.mark.parametrize("vary", ["loc", "scale"])
def test_parameter_sweep_exact_curves_match_the_closed_form(vary):
    # along mu (sigma = 1.3) or sigma (mu = 0.4) for f = (x - 1)^2: every point against the
    # closed-form variances of quadratic_variances
    values = [-1.0, 0.5, 2.0] if vary == "loc" else [0.3, 1.0, 2.5]
    rows = q.parameter_sweep({"quad": lambda x: (x - 1.0) ** 2}, vary, values, loc=0.4, scale=1.3)
    assert len(rows) == len(values) * len(q.STUDY_METHODS) * 2
    for row in rows:
        assert row[vary] == row["value"] and row["value"] in values
        assert row["scale" if vary == "loc" else "loc"] == (1.3 if vary == "loc" else 0.4)
        estimator, options = q.STUDY_METHODS[row["method"]]
        key = (estimator, row["param"], options.get("baseline"), options.get("coupling", True))
        closed = quadratic_variances(row["loc"] - 1.0, row["scale"])[key]
        assert row["exact"] == pytest.approx(closed, rel=1e-9, abs=1e-10), row
        gradient = 2 * (row["loc"] - 1.0) if row["param"] == "loc" else 2 * row["scale"]
        assert row["gradient"] == pytest.approx(gradient, rel=1e-9, abs=1e-12)
        assert "mc" not in row


def test_parameter_sweep_samples_every_point_on_its_own():
    # the sampled variances and means against the exact ones, point by point: a batch that
    # mixed the points' noise (no plate) would inflate the variances far beyond the error bars
    methods = {"score function": ("score_function", {}), "pathwise": ("pathwise", {})}
    rows = q.parameter_sweep(
        {"bump": lambda x: torch.exp(-(x**2))},
        "scale",
        [0.2, 1.0, 3.0],
        loc=0.5,
        num_samples=100_000,
        methods=methods,
    )
    assert len(rows) == 3 * 2 * 2
    for row in rows:
        assert abs(row["mc"] - row["exact"]) < Z * row["mc_se"], row
        assert abs(row["z"]) < Z, row
        assert row["z"] == pytest.approx(
            (row["mean"] - row["gradient"]) / math.sqrt(row["mc"] / 100_000), rel=1e-3
        )


def test_parameter_sweep_errors():
    f = {"x": lambda x: x}
    with pytest.raises(ValueError, match="vary must be 'loc' or 'scale'"):
        q.parameter_sweep(f, "mu", [0.0])
    with pytest.raises(ValueError, match="values is empty"):
        q.parameter_sweep(f, "loc", [])
    with pytest.raises(ValueError, match="scale must be positive"):
        q.parameter_sweep(f, "scale", [1.0, 0.0])
    with pytest.raises(ValueError, match="scale must be positive"):
        q.parameter_sweep(f, "loc", [1.0], scale=-1.0)
