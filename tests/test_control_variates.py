"""The delta-method control variate: unbiased, exact for quadratic costs, clear errors."""

import itertools
import math

import pytest
import torch
from torch.distributions import (
    Bernoulli,
    Categorical,
    Cauchy,
    Dirichlet,
    Independent,
    LogisticNormal,
    MultivariateNormal,
    Normal,
)

import gradkit as gk
from gradkit.control_variates import ControlVariate, DeltaMethod, QuadraticExpansion

MU, SIGMA = 0.5, 1.2
A = torch.tensor([0.7, -0.4])
L = torch.tensor([[1.0, 0.0], [0.5, 0.8]])


def bernoulli_exact(f, probs):
    """d/dprobs E[f(x)] for independent Bernoulli coordinates, by enumerating all states."""
    probs = probs.detach().clone().requires_grad_()
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=probs.numel())))
    weights = (states * probs + (1 - states) * (1 - probs)).prod(-1)
    (grad,) = torch.autograd.grad((weights * f(states)).sum(), probs)
    return grad


def cubic(x):
    return (x[..., 0] + 2 * x[..., 1]) ** 3


def gaussian_cases():
    """name -> (dist, non-quadratic f summed to (S,), exact gradients)."""
    e = math.exp(MU + SIGMA**2 / 2)
    loc = torch.tensor([0.5, -1.0, 2.0])
    damp = math.exp(-(0.6**2) / 2)
    mean_loc, std = torch.tensor([[0.1, -0.2], [0.3, 0.0]]), torch.full((2, 2), 0.5)
    weights = torch.tensor([0.6, -0.3])
    e_ind = torch.exp((weights * mean_loc).sum(-1) + 0.5 * (weights**2 * std**2).sum(-1))
    e_mvn = math.exp(float(A @ torch.tensor([0.2, -0.1]) + 0.5 * A @ L @ L.T @ A))
    return {
        "normal-exp": (
            Normal(torch.tensor(MU), torch.tensor(SIGMA)),
            torch.exp,
            {"loc": e, "scale": SIGMA * e},
        ),
        # E sin(x) = sin(mu) exp(-sigma^2 / 2), summed over a batch of 3 (coupled signal)
        "normal-batch-sin": (
            Normal(loc, torch.full((3,), 0.6)),
            lambda x: torch.sin(x).sum(-1),
            {"loc": torch.cos(loc) * damp, "scale": -0.6 * torch.sin(loc) * damp},
        ),
        # E exp(w . x) = exp(w . mu + |w sigma|^2 / 2) per row, two rows, a full Hessian
        "independent-exp": (
            Independent(Normal(mean_loc, std), 1),
            lambda x: torch.exp((x * weights).sum(-1)).sum(-1),
            {
                "loc": e_ind[:, None] * weights,
                "scale": e_ind[:, None] * weights**2 * std,
            },
        ),
        # E exp(a . x) = exp(a . m + a^T L L^T a / 2): d/dm = a E, d/dL = a a^T L E
        "mvn-exp": (
            MultivariateNormal(torch.tensor([0.2, -0.1]), scale_tril=L),
            lambda x: torch.exp(x @ A),
            {"loc": e_mvn * A, "scale_tril": torch.tril(e_mvn * torch.outer(A, A) @ L)},
        ),
    }


@pytest.mark.parametrize("coefficient", [None, 0.5])
@pytest.mark.parametrize("case", list(gaussian_cases()))
def test_delta_method_is_unbiased(case, coefficient):
    dist, f, exact = gaussian_cases()[case]
    summaries = gk.diagnostics.gradient_moments(
        gk.score_function,
        f,
        dist,
        2_000,
        repeats=2,
        exact=exact,
        baseline=DeltaMethod(coefficient),
    )
    for name, summary in summaries.items():
        z = summary.z_score
        if name == "scale_tril":  # only the lower triangle parameterises the distribution
            z = z[torch.tril(torch.ones_like(z)) > 0]
        assert bool((z.abs() < 4).all()), (name, summary.mean, summary.exact, z)


@pytest.mark.parametrize("parameterisation", ["probs", "logits"])
def test_delta_method_is_unbiased_for_bernoulli(parameterisation):
    probs = torch.tensor([0.3, 0.6])
    exact = bernoulli_exact(cubic, probs)  # a cubic: the expansion is not exact
    if parameterisation == "logits":
        dist = Bernoulli(logits=torch.log(probs / (1 - probs)))
        exact = exact * probs * (1 - probs)
    else:
        dist = Bernoulli(probs=probs)
    summaries = gk.diagnostics.gradient_moments(
        gk.score_function,
        cubic,
        dist,
        4_000,
        exact={parameterisation: exact},
        baseline=DeltaMethod(),
    )
    assert summaries[parameterisation].within(4), summaries[parameterisation].z_score


def quadratic_cases():
    """name -> (dist, quadratic f, exact gradients): the expansion is exact."""
    loc = torch.tensor([0.5, -1.0, 2.0])
    m = torch.tensor([0.2, -0.1])
    q = torch.tensor([[2.0, 0.3], [0.3, 1.0]])
    mvn_loc = (q + q.T) @ m + torch.tensor([1.0, 0.0])
    return {
        "normal": (
            Normal(torch.tensor(MU), torch.tensor(SIGMA)),
            lambda x: x**2 + 10.0,
            {"loc": 2 * MU, "scale": 2 * SIGMA},
        ),
        "normal-batch": (
            Normal(loc, torch.ones(3)),
            lambda x: (x**2 + 3 * x).sum(-1),
            {"loc": 2 * loc + 3, "scale": torch.full((3,), 2.0)},
        ),
        # E[x0 x1] = mu0 mu1 for independent coordinates
        "independent-cross": (
            Independent(Normal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])), 1),
            lambda x: x[..., 0] * x[..., 1],
            {"loc": torch.tensor([-2.0, 1.0]), "scale": torch.zeros(2)},
        ),
        "bernoulli": (
            Bernoulli(probs=torch.tensor([0.3, 0.6])),
            lambda x: (x[..., 0] - 2 * x[..., 1]) ** 2,
            {"probs": torch.tensor([1 - 4 * 0.6, 4 - 4 * 0.3])},
        ),
        # E[x^T Q x + x0] = m^T Q m + tr(Q L L^T) + m0
        "mvn": (
            MultivariateNormal(m, scale_tril=L),
            lambda x: ((x @ q) * x).sum(-1) + x[..., 0],
            {"loc": mvn_loc, "scale_tril": torch.tril((q + q.T) @ L)},
        ),
    }


@pytest.mark.parametrize("coefficient", [None, 1.0])
@pytest.mark.parametrize("case", list(quadratic_cases()))
def test_delta_method_is_exact_for_quadratic_costs(case, coefficient):
    dist, f, exact = quadratic_cases()[case]
    g = gk.score_function(f, dist, 200, baseline=DeltaMethod(coefficient))
    for name, value in exact.items():
        estimate = g[name]
        if name == "scale_tril":
            estimate = torch.tril(estimate)
        expected = torch.as_tensor(value).expand_as(estimate)
        # every single per-sample estimate is the exact gradient: zero variance
        assert torch.allclose(estimate, expected, atol=1e-4), (name, estimate[:3], expected[0])


def test_delta_method_lowers_variance_for_a_smooth_cost():
    dist = Normal(torch.tensor(MU), torch.tensor(0.5))
    plain = gk.score_function(torch.exp, dist, 20_000)
    delta = gk.score_function(torch.exp, dist, 20_000, baseline=DeltaMethod())
    for name in ("loc", "scale"):
        assert delta[name].var() < plain[name].var() / 20


def test_coefficient_is_leave_one_out():
    """beta_s must not depend on sample s (that is what keeps the estimator unbiased)."""
    from gradkit.control_variates import _loo_coefficient

    g, h = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    beta = _loo_coefficient(g, h)
    for s in range(6):
        others = [i for i in range(6) if i != s]
        go, ho = g[others], h[others]
        cov = ((go - go.mean(0)) * (ho - ho.mean(0))).sum(0)
        var = ((ho - ho.mean(0)) ** 2).sum(0)
        assert torch.allclose(beta[s], cov / var)
    moved_g, moved_h = g.clone(), h.clone()
    moved_g[2] += 5.0
    moved_h[2] -= 3.0
    moved = _loo_coefficient(moved_g, moved_h)
    assert torch.equal(moved[2], beta[2]) or torch.allclose(moved[2], beta[2], atol=1e-12)
    assert not torch.allclose(moved[0], beta[0])


def test_quadratic_expansion_and_its_expectation():
    dist = Normal(torch.tensor(MU, dtype=torch.float64), torch.tensor(SIGMA, dtype=torch.float64))
    q = DeltaMethod.expand(torch.exp, dist)
    assert isinstance(q, QuadraticExpansion)
    assert q.hessian.shape == (1, 1) and q.point.dtype == torch.float64
    # exp(mu) (1 + d + d^2/2) has mean exp(mu) (1 + sigma^2 / 2)
    assert float(q.expectation(dist)) == pytest.approx(math.exp(MU) * (1 + SIGMA**2 / 2))
    x = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    d = x - MU
    assert torch.allclose(q(x), math.exp(MU) * (1 + d + d**2 / 2))
    with pytest.raises(ValueError, match="expand around this distribution"):
        q.expectation(Normal(torch.zeros(2), torch.ones(2)))


def test_delta_method_through_expectation_and_dtype():
    loc = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    dist = Normal(loc, torch.ones(2, dtype=torch.float64))
    value = gk.expectation(
        lambda x: (x**2).sum(-1),
        dist,
        8,
        estimator="score_function",
        baseline=DeltaMethod(coefficient=1.0),
    )
    value.backward()
    assert loc.grad.dtype == torch.float64
    assert torch.allclose(loc.grad, 2 * loc.detach())


def test_fixed_coefficient_works_with_one_sample():
    dist = Normal(torch.tensor(MU), torch.tensor(SIGMA))
    g = gk.score_function(lambda x: x**2, dist, 1, baseline=DeltaMethod(coefficient=1.0))
    assert torch.allclose(g["loc"], torch.tensor([2 * MU]))


def test_control_variate_is_an_abstract_base():
    assert issubclass(DeltaMethod, ControlVariate)
    with pytest.raises(TypeError):
        ControlVariate()


def test_error_plate_signal():
    dist = Normal(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="one summed learning signal"):
        gk.score_function(lambda x: x**2, dist, 8, baseline=DeltaMethod())


def test_error_too_few_samples_to_estimate_coefficient():
    dist = Normal(torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="at least 3 samples"):
        gk.score_function(lambda x: x**2, dist, 2, baseline=DeltaMethod())


def test_error_integer_samples():
    dist = Categorical(probs=torch.tensor([0.3, 0.7]))
    with pytest.raises(TypeError, match="real-valued samples"):
        gk.score_function(lambda x: x.float(), dist, 8, baseline=DeltaMethod())


def test_error_f_not_differentiable_by_autograd():
    dist = Normal(torch.tensor(0.0), torch.tensor(1.0))

    def through_numpy(x):
        return torch.as_tensor(x.detach().numpy() ** 2)

    with pytest.raises(ValueError, match="twice differentiable in x by torch autograd"):
        gk.score_function(through_numpy, dist, 8, baseline=DeltaMethod())


def test_error_not_differentiable_at_the_mean():
    dist = Normal(torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="non-finite gradient, Hessian"):
        gk.score_function(lambda x: x.abs().sqrt(), dist, 8, baseline=DeltaMethod())


@pytest.mark.parametrize(
    ("dist", "message"),
    [
        (Cauchy(torch.tensor(0.0), torch.tensor(1.0)), "mean of Cauchy is not finite"),
        (Dirichlet(torch.ones(3)), "needs the covariance of Dirichlet"),
        (LogisticNormal(torch.zeros(2), torch.ones(2)), "torch does not implement"),
    ],
)
def test_error_distribution_without_usable_moments(dist, message):
    def f(x):
        return x.reshape(x.shape[0], -1).sum(-1)

    with pytest.raises(ValueError, match=message):
        gk.score_function(f, dist, 8, baseline=DeltaMethod())


@pytest.mark.parametrize("coefficient", ["1.0", True, math.nan, torch.tensor(1.0)])
def test_error_bad_coefficient(coefficient):
    with pytest.raises(TypeError, match="coefficient must be a finite real number or None"):
        DeltaMethod(coefficient)
