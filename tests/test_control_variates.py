"""The delta-method control variate: unbiased, exact for quadratic costs, clear errors."""

import itertools
import math

import numpy as np
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
from gradkit.registry import loo_coefficient
from tests.stats import Z

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


# The estimators a control variate is tested with, and the distributions each one takes.
ESTIMATORS = ["score_function", "pathwise", "measure_valued"]


def supports(estimator, dist):
    if estimator == "pathwise":
        return dist.has_rsample
    if estimator == "measure_valued":  # no weak derivative of a MultivariateNormal
        return not isinstance(dist, MultivariateNormal)
    return True


def check_within(summaries):
    for name, summary in summaries.items():
        z = summary.z_score
        if name == "scale_tril":  # only the lower triangle parameterises the distribution
            z = z[torch.tril(torch.ones_like(z)) > 0]
        assert bool((z.abs() < Z).all()), (name, summary.mean, summary.exact, z)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("coefficient", [None, 0.5])
@pytest.mark.parametrize("case", list(gaussian_cases()))
def test_delta_method_is_unbiased(case, coefficient, estimator):
    dist, f, exact = gaussian_cases()[case]
    if not supports(estimator, dist):
        pytest.skip(f"{estimator} does not take {type(dist).__name__}")
    summaries = gk.diagnostics.gradient_moments(
        estimator,
        f,
        dist,
        2_000,
        repeats=2,
        exact=exact,
        control_variate=DeltaMethod(coefficient),
    )
    check_within(summaries)


@pytest.mark.parametrize("estimator", ["score_function", "measure_valued"])
@pytest.mark.parametrize("parameterisation", ["probs", "logits"])
def test_delta_method_is_unbiased_for_bernoulli(parameterisation, estimator):
    probs = torch.tensor([0.3, 0.6])
    exact = bernoulli_exact(cubic, probs)  # a cubic: the expansion is not exact
    if parameterisation == "logits":
        dist = Bernoulli(logits=torch.log(probs / (1 - probs)))
        exact = exact * probs * (1 - probs)
    else:
        dist = Bernoulli(probs=probs)
    summaries = gk.diagnostics.gradient_moments(
        estimator,
        cubic,
        dist,
        4_000,
        exact={parameterisation: exact},
        control_variate=DeltaMethod(),
    )
    assert summaries[parameterisation].within(Z), summaries[parameterisation].z_score


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


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("coefficient", [None, 1.0])
@pytest.mark.parametrize("case", list(quadratic_cases()))
def test_delta_method_is_exact_for_quadratic_costs(case, coefficient, estimator):
    dist, f, exact = quadratic_cases()[case]
    if not supports(estimator, dist):
        pytest.skip(f"{estimator} does not take {type(dist).__name__}")
    g = gk.ESTIMATORS[estimator](f, dist, 200, control_variate=DeltaMethod(coefficient))
    for name, value in exact.items():
        estimate = g[name]
        if name == "scale_tril":
            estimate = torch.tril(estimate)
        expected = torch.as_tensor(value).expand_as(estimate)
        # every single per-sample estimate is the exact gradient: zero variance
        assert torch.allclose(estimate, expected, atol=1e-4), (name, estimate[:3], expected[0])
    # without the control variate the rows are not all exact: the check above is not vacuous
    plain = gk.ESTIMATORS[estimator](f, dist, 200)
    assert not all(
        torch.allclose(plain[name], torch.as_tensor(value).expand_as(plain[name]), atol=1e-4)
        for name, value in exact.items()
    )


# How much the delta method at least divides the variance of exp(x), x ~ N(0.5, 0.5^2), by.
VARIANCE_FACTOR = {"score_function": 20, "pathwise": 4, "measure_valued": 4}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_delta_method_lowers_variance_for_a_smooth_cost(estimator):
    dist = Normal(torch.tensor(MU), torch.tensor(0.5))
    plain = gk.ESTIMATORS[estimator](torch.exp, dist, 20_000)
    delta = gk.ESTIMATORS[estimator](torch.exp, dist, 20_000, control_variate=DeltaMethod())
    for name in ("loc", "scale"):
        assert delta[name].var() < plain[name].var() / VARIANCE_FACTOR[estimator], name


def test_coefficient_is_leave_one_out():
    """beta_s must not depend on sample s (that is what keeps the estimator unbiased)."""
    g, h = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    beta = loo_coefficient(g, h)
    for s in range(6):
        others = [i for i in range(6) if i != s]
        go, ho = g[others], h[others]
        cov = ((go - go.mean(0)) * (ho - ho.mean(0))).sum(0)
        var = ((ho - ho.mean(0)) ** 2).sum(0)
        assert torch.allclose(beta[s], cov / var)
    moved_g, moved_h = g.clone(), h.clone()
    moved_g[2] += 5.0
    moved_h[2] -= 3.0
    moved = loo_coefficient(moved_g, moved_h)
    assert torch.equal(moved[2], beta[2]) or torch.allclose(moved[2], beta[2], atol=1e-12)
    assert not torch.allclose(moved[0], beta[0])
    assert DeltaMethod().coefficient_for(g, h) is not None
    assert torch.equal(DeltaMethod().coefficient_for(g, h), beta)
    assert DeltaMethod(coefficient=0.5).coefficient_for(g, h) == 0.5


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


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_delta_method_through_expectation_and_dtype(estimator):
    loc = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    scale = torch.ones(2, dtype=torch.float64, requires_grad=True)
    dist = Normal(loc, scale)
    value = gk.expectation(
        lambda x: (x**2).sum(-1),
        dist,
        8,
        estimator=estimator,
        control_variate=DeltaMethod(coefficient=1.0),
    )
    value.backward()
    assert loc.grad.dtype == torch.float64
    assert torch.allclose(loc.grad, 2 * loc.detach())  # exact: the cost is quadratic
    assert torch.allclose(scale.grad, 2 * scale.detach())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fixed_coefficient_works_with_one_sample(estimator):
    dist = Normal(torch.tensor(MU), torch.tensor(SIGMA))
    cv = DeltaMethod(coefficient=1.0)
    g = gk.ESTIMATORS[estimator](lambda x: x**2, dist, 1, control_variate=cv)
    assert torch.allclose(g["loc"], torch.tensor([2 * MU]))
    assert torch.allclose(g["scale"], torch.tensor([2 * SIGMA]))


# A plate of three Normals with one cost per element.
PLATE_LOC, PLATE_SCALE = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.6, 1.0, 0.8])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_control_variate_under_a_declared_plate(estimator):
    dist = Normal(PLATE_LOC, PLATE_SCALE)
    # a quadratic per element: each element's own expansion is exact, every row is exact
    g = gk.ESTIMATORS[estimator](
        lambda x: x**2 + 3 * x, dist, 50, plate=True, control_variate=DeltaMethod(1.0)
    )
    assert torch.allclose(g["loc"], (2 * PLATE_LOC + 3).expand(50, 3), atol=1e-4)
    assert torch.allclose(g["scale"], (2 * PLATE_SCALE).expand(50, 3), atol=1e-4)
    # E sin(x_b) = sin(mu_b) exp(-sigma_b^2 / 2): unbiased, estimated coefficient per element
    damp = torch.exp(-0.5 * PLATE_SCALE**2)
    exact = {
        "loc": torch.cos(PLATE_LOC) * damp,
        "scale": -PLATE_SCALE * torch.sin(PLATE_LOC) * damp,
    }
    summaries = gk.diagnostics.gradient_moments(
        estimator, torch.sin, dist, 4_000, exact=exact, plate=True, control_variate=DeltaMethod()
    )
    check_within(summaries)
    # and the plate's own expansions reduce the variance below the coupled signal's
    coupled = gk.ESTIMATORS[estimator](
        lambda x: torch.sin(x).sum(-1), dist, 4_000, control_variate=DeltaMethod()
    )
    if estimator != "pathwise":  # pathwise rows do not depend on the declaration
        assert all(summaries[n].variance.sum() < coupled[n].var(0).sum() for n in exact)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_control_variate_with_a_wrong_plate_shape(estimator):
    dist = Normal(PLATE_LOC, PLATE_SCALE)
    with pytest.raises(ValueError, match=r"\(S, 3\).*\(S,\)"):
        gk.ESTIMATORS[estimator](
            lambda x: x.sum(-1), dist, 8, plate=True, control_variate=DeltaMethod()
        )


def test_control_variate_is_an_abstract_base():
    assert issubclass(DeltaMethod, ControlVariate)
    with pytest.raises(TypeError):
        ControlVariate()


def test_error_too_few_samples_to_estimate_coefficient():
    dist = Normal(torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="at least 3 samples"):
        gk.score_function(lambda x: x**2, dist, 2, control_variate=DeltaMethod())


def test_error_integer_samples():
    dist = Categorical(probs=torch.tensor([0.3, 0.7]))
    with pytest.raises(TypeError, match="real-valued samples"):
        gk.score_function(lambda x: x.float(), dist, 8, control_variate=DeltaMethod())


def test_error_f_not_differentiable_by_autograd():
    dist = Normal(torch.tensor(0.0), torch.tensor(1.0))

    def through_numpy(x):
        return torch.as_tensor(x.detach().numpy() ** 2)

    with pytest.raises(ValueError, match="twice differentiable in x by torch autograd"):
        gk.score_function(through_numpy, dist, 8, control_variate=DeltaMethod())


def test_error_not_differentiable_at_the_mean():
    dist = Normal(torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="non-finite gradient, Hessian"):
        gk.score_function(lambda x: x.abs().sqrt(), dist, 8, control_variate=DeltaMethod())


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
        gk.score_function(f, dist, 8, control_variate=DeltaMethod())


@pytest.mark.parametrize("coefficient", ["1.0", True, math.nan, torch.tensor(1.0)])
def test_error_bad_coefficient(coefficient):
    with pytest.raises(TypeError, match="coefficient must be a finite real number or None"):
        DeltaMethod(coefficient)


def test_first_order_expansion_has_no_hessian_and_its_closed_form_mean():
    d = Normal(torch.tensor([1.0, -0.5]), torch.tensor([2.0, 0.3]))
    f = lambda x: torch.sin(x).sum(-1)  # noqa: E731
    linear = DeltaMethod.expand(f, d, order=1)
    assert linear.hessian is None
    quadratic = DeltaMethod.expand(f, d)
    torch.testing.assert_close(linear.gradient, torch.cos(d.mean))
    # f(mu) + grad (x - mu): the quadratic expansion without its second-order terms
    x = torch.tensor([[0.3, 0.2], [2.0, -1.0]])
    delta = x - d.mean
    torch.testing.assert_close(linear(x), torch.sin(d.mean).sum() + delta @ torch.cos(d.mean))
    assert not torch.allclose(quadratic(x), linear(x))
    torch.testing.assert_close(linear.expectation(d), torch.sin(d.mean).sum())


@pytest.mark.parametrize("estimator", ["score_function", "measure_valued"])
def test_first_order_delta_method_is_exact_for_linear_and_unbiased_otherwise(estimator):
    probs = torch.tensor([0.3, 0.6])
    dist = Bernoulli(probs=probs)
    # a linear cost of Bernoulli coordinates is its own first-order expansion: every row exact
    # (for the score function because of the control; measure-valued rows are exact anyway)
    linear = lambda x: 3 * x[..., 0] - 2 * x[..., 1] + 1  # noqa: E731
    g = gk.ESTIMATORS[estimator](linear, dist, 20, control_variate=DeltaMethod(1.0, order=1))[
        "probs"
    ]
    torch.testing.assert_close(g, torch.tensor([3.0, -2.0]).expand(20, 2))
    summaries = gk.diagnostics.gradient_moments(
        estimator,
        cubic,
        dist,
        4_000,
        exact={"probs": bernoulli_exact(cubic, probs)},
        control_variate=DeltaMethod(order=1),
    )
    assert summaries["probs"].within(Z), summaries["probs"].z_score


def test_first_order_delta_method_under_a_plate_lowers_the_variance():
    # one Bernoulli vector per plate element, f smooth in z: the linear control variate (MuProp)
    # removes the signal's first-order part; it scales to many coordinates (no Hessian)
    logits = torch.linspace(-2.0, 2.0, 60).reshape(20, 3)
    dist = Independent(Bernoulli(logits=logits), 1)
    weights = torch.tensor([1.0, -2.0, 0.5])
    f = lambda z: 50 + torch.exp(0.3 * (z * weights).sum(-1))  # noqa: E731
    loo = gk.score_function(f, dist, 2_000, plate=True, baseline=gk.baselines.LeaveOneOut())
    with_cv = gk.score_function(f, dist, 2_000, plate=True, control_variate=DeltaMethod(order=1))
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))  # (8, 3)
    leaf = logits.clone().requires_grad_()
    q = torch.sigmoid(leaf)[:, None]  # (20, 1, 3)
    weights_q = (states * q + (1 - states) * (1 - q)).prod(-1)  # (20, 8)
    (exact,) = torch.autograd.grad((weights_q * f(states)).sum(), leaf)
    assert gk.diagnostics.z_score(with_cv["logits"], exact).abs().max() < Z
    # better than the best constant-in-z baseline: it removes what moves with z to first order
    assert with_cv["logits"].var(0).sum() < 0.1 * loo["logits"].var(0).sum()


def test_error_bad_order():
    assert DeltaMethod(order=np.int64(1)).order == 1
    for order in (0, 3, True, 1.0):
        with pytest.raises(ValueError, match="order must be 1"):
            DeltaMethod(order=order)
