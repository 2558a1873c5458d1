"""Score-function and pathwise estimators, gk.expectation, and their error paths.

Statistical tests compare the Monte Carlo mean with the exact gradient, obtained by autograd
through a closed-form expectation, within a tolerance of a few standard errors of the estimate.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import distributions as D

import gradkit as gk
from tests.stats import Z, assert_unbiased

# Several tests run plate-shaped costs with the default plate=False on purpose (it is unbiased
# for them too); the one-time hint is tested in test_an_undeclared_plate_shaped_output_hints_once.
pytestmark = pytest.mark.filterwarnings("ignore::gradkit.PlateHint")


def exact_grad(expect_fn, **params):
    """Gradient of a closed-form expectation w.r.t. each named parameter."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    value = expect_fn(**leaves).sum()
    grads = torch.autograd.grad(value, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


# (distribution factory, cost, closed-form E[cost] as a function of the parameters)
CASES = {
    "normal_x2": (
        lambda p: D.Normal(**p),
        lambda x: x**2,
        lambda loc, scale: loc**2 + scale**2,
        {"loc": torch.tensor([0.5, -1.0]), "scale": torch.tensor([1.0, 0.7])},
    ),
    "bernoulli_probs": (
        lambda p: D.Bernoulli(**p),
        lambda x: (x - 0.45) ** 2,
        lambda probs: probs * 0.55**2 + (1 - probs) * 0.45**2,
        {"probs": torch.tensor([0.2, 0.7])},
    ),
    "bernoulli_logits": (
        lambda p: D.Bernoulli(**p),
        lambda x: 3.0 * x,
        lambda logits: 3.0 * torch.sigmoid(logits),
        {"logits": torch.tensor([-1.0, 0.5])},
    ),
    "categorical_logits": (
        lambda p: D.Categorical(**p),
        lambda x: torch.tensor([1.0, -2.0, 4.0])[x],
        lambda logits: (torch.softmax(logits, -1) * torch.tensor([1.0, -2.0, 4.0])).sum(-1),
        {"logits": torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])},
    ),
    "categorical_probs": (
        lambda p: D.Categorical(**p),
        lambda x: torch.tensor([1.0, -2.0, 4.0])[x],
        lambda probs: (probs / probs.sum(-1, keepdim=True) * torch.tensor([1.0, -2.0, 4.0])).sum(
            -1
        ),
        {"probs": torch.tensor([0.2, 0.5, 0.3])},
    ),
    "poisson": (
        lambda p: D.Poisson(**p),
        lambda x: x**2,
        lambda rate: rate + rate**2,
        {"rate": torch.tensor([0.5, 3.0])},
    ),
    "exponential": (
        lambda p: D.Exponential(**p),
        lambda x: x,
        lambda rate: 1 / rate,
        {"rate": torch.tensor([0.5, 2.0])},
    ),
    "gamma": (
        lambda p: D.Gamma(**p),
        lambda x: x,
        lambda concentration, rate: concentration / rate,
        {"concentration": torch.tensor([2.0, 5.0]), "rate": torch.tensor([1.0, 3.0])},
    ),
    "beta": (
        lambda p: D.Beta(**p),
        lambda x: x,
        lambda concentration1, concentration0: concentration1 / (concentration1 + concentration0),
        {"concentration1": torch.tensor([2.0]), "concentration0": torch.tensor([3.0])},
    ),
}


@pytest.mark.parametrize("plate", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_score_function_is_unbiased(case, plate):
    """The costs are elementwise: a true plate, so both declarations are unbiased."""
    make, f, expect, params = CASES[case]
    g = gk.score_function(f, make(params), 40_000, plate=plate)
    assert set(g) == set(params)
    for name, p in params.items():
        assert g[name].shape == (40_000, *make(params).__getattribute__(name).shape) or g[
            name
        ].shape[1:] == torch.broadcast_shapes(p.shape)
    assert_unbiased(g, exact_grad(expect, **params))


@pytest.mark.parametrize("plate", [False, True])
@pytest.mark.parametrize("case", ["normal_x2", "exponential", "gamma", "beta"])
def test_pathwise_is_unbiased(case, plate):
    make, f, expect, params = CASES[case]
    g = gk.pathwise(f, make(params), 40_000, plate=plate)
    assert_unbiased(g, exact_grad(expect, **params))


def test_a_wrong_estimator_fails_the_test():
    """The tolerance is tight enough to catch a sign error in the score (checked on purpose)."""
    make, f, expect, params = CASES["normal_x2"]
    g = gk.score_function(f, make(params), 40_000)
    broken = {k: -v for k, v in g.items()}
    with pytest.raises(AssertionError):
        assert_unbiased(broken, exact_grad(expect, **params))


def test_pathwise_is_exact_for_linear_cost():
    d = D.Normal(torch.tensor(1.0), torch.tensor(2.0))
    g = gk.pathwise(lambda x: 3 * x, d, 7)
    assert torch.equal(g["loc"], torch.full((7,), 3.0))


def test_score_function_matches_closed_form_variance():
    # f(x) = x under N(mu, 1): per-sample estimate x (x - mu); Var = E[x^2 (x-mu)^2] - 1 = mu^2 + 2
    mu = 1.5
    g = gk.score_function(lambda x: x, D.Normal(torch.tensor(mu), torch.tensor(1.0)), 200_000)
    var = g["loc"].var()
    se_var = var * math.sqrt(2 / 200_000) * 3  # heavy tails: generous standard error of a variance
    assert abs(var - (mu**2 + 2)) < Z * se_var


def test_score_examples_match_closed_form():
    d = D.Normal(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]))
    x = torch.tensor([[1.0, 3.0], [-1.0, 1.0]])
    s = gk.score(d, x)
    assert torch.allclose(s["loc"], (x - d.loc) / d.scale**2)
    assert torch.allclose(s["scale"], ((x - d.loc) ** 2 - d.scale**2) / d.scale**3)


def test_plate_and_coupled_costs_share_the_mean():
    """Per-element credit (plate) and the summed cost (coupled) estimate the same gradient."""
    loc = torch.tensor([0.3, -0.4, 1.0])
    d = D.Normal(loc, torch.ones(3))
    plate = gk.score_function(lambda x: x**2, d, 60_000, plate=True)["loc"]
    coupled = gk.score_function(lambda x: (x**2).sum(-1), d, 60_000)["loc"]
    exact = 2 * loc
    for g in (plate, coupled):
        assert_unbiased({"loc": g}, {"loc": exact})
    assert torch.all(plate.var(0) < coupled.var(0))  # crediting each element its own cost helps


def test_coupled_cost_across_batch_elements():
    # f = x0 * x1 couples the two elements: d/dmu0 E = mu1, d/dmu1 E = mu0
    loc = torch.tensor([0.5, 2.0])
    d = D.Normal(loc, torch.ones(2))
    f = lambda x: x[..., 0] * x[..., 1]  # noqa: E731
    assert_unbiased(gk.score_function(f, d, 80_000), {"loc": loc.flip(0), "scale": torch.zeros(2)})
    assert_unbiased(gk.pathwise(f, d, 20_000), {"loc": loc.flip(0), "scale": torch.zeros(2)})


def test_independent_event_shapes():
    loc = torch.randn(4, 3)
    d = D.Independent(D.Normal(loc, torch.ones(4, 3)), 1)
    f = lambda x: (x**2).sum(-1)  # noqa: E731  one value per batch element
    for est in (gk.score_function, gk.pathwise):
        g = est(f, d, 30_000)
        assert g["loc"].shape == (30_000, 4, 3)
        assert_unbiased(g, {"loc": 2 * loc, "scale": 2 * torch.ones(4, 3)})


def test_multivariate_normal_pathwise_and_score():
    loc = torch.tensor([0.5, -1.0])
    tril = torch.tensor([[1.0, 0.0], [0.5, 0.8]])
    d = D.MultivariateNormal(loc, scale_tril=tril)
    f = lambda x: (x**2).sum(-1)  # noqa: E731
    # E f = |loc|^2 + tr(L L^T): d/dloc = 2 loc, d/dL = 2 L (lower triangle)
    exact = {"loc": 2 * loc, "scale_tril": 2 * tril}
    assert_unbiased(gk.pathwise(f, d, 20_000), exact)
    g = gk.score_function(f, d, 100_000)
    assert_unbiased(g["loc"], exact["loc"])


def test_keeps_dtype():
    d = D.Normal(torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    for est in (gk.score_function, gk.pathwise):
        assert est(lambda x: x**2, d, 5)["loc"].dtype == torch.float64


@settings(max_examples=15, deadline=None)
@given(
    mu=st.floats(-3.0, 3.0),
    sigma=st.floats(0.2, 3.0),
)
def test_property_gaussian_quadratic(mu, sigma):
    """For any N(mu, sigma^2), d/dmu E[x^2] = 2 mu and d/dsigma E[x^2] = 2 sigma."""
    torch.manual_seed(0)
    d = D.Normal(torch.tensor(mu), torch.tensor(sigma))
    exact = {"loc": torch.tensor(2 * mu), "scale": torch.tensor(2 * sigma)}
    assert_unbiased(gk.pathwise(lambda x: x**2, d, 4_000), exact)
    assert_unbiased(gk.score_function(lambda x: x**2, d, 20_000), exact)


# ------------------------------------------------------------------ gk.expectation


def test_expectation_score_function_trains_an_encoder_and_a_decoder():
    """Encoder weights get the estimator's gradient; tensors inside f get their own gradient."""
    torch.manual_seed(1)
    enc = torch.nn.Linear(2, 3)
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)  # a "decoder" weight inside f
    inputs = torch.randn(5, 2)

    def f(z):
        return (w * z).sum(-1)  # one value per sample and batch element: (S, 5)

    def grads(value):
        enc.zero_grad()
        w.grad = None
        value.sum().backward()
        return torch.cat([enc.weight.grad.flatten(), enc.bias.grad]), w.grad.clone()

    logits = enc(inputs)
    q = D.Independent(D.Bernoulli(logits=logits), 1)
    # E f = sum_j w_j sigmoid(logit_j): exact gradients by autograd
    exact_enc, exact_w = grads((w * torch.sigmoid(enc(inputs))).sum(-1))
    n = 20_000
    est_enc, est_w = grads(gk.expectation(f, q, n, estimator="score_function"))
    p = torch.sigmoid(logits.detach())
    assert torch.allclose(est_w, p.sum(0), atol=0.05)  # decoder: ordinary gradient E[z]
    assert torch.allclose(est_enc, exact_enc, atol=0.15)
    assert torch.allclose(exact_w, p.sum(0))


def test_expectation_value_and_gradient_with_baseline():
    mu = torch.tensor([0.5, 1.0], requires_grad=True)
    d = D.Normal(mu, 1.0)
    loo = gk.baselines.LeaveOneOut()
    value = gk.expectation(lambda x: x**2, d, 50_000, estimator="score_function", baseline=loo)
    assert value.shape == (2,)
    assert torch.allclose(value.detach(), mu.detach() ** 2 + 1, atol=0.05)
    value.sum().backward()
    assert torch.allclose(mu.grad, 2 * mu.detach(), atol=0.1)


def test_expectation_pathwise_general_output_shape():
    mu = torch.tensor(0.5, requires_grad=True)
    d = D.Normal(mu, 1.0)
    value = gk.expectation(lambda x: torch.stack([x, x**2], -1), d, 10)
    assert value.shape == (2,)
    value[0].backward()
    assert torch.allclose(mu.grad, torch.tensor(1.0))


def test_expectation_weighted_plate_outputs_get_their_own_gradient():
    """Upstream weights differ per batch element: each output differentiates only its own θ_b."""
    mu = torch.tensor([0.5, -1.0], requires_grad=True)
    d = D.Normal(mu, torch.ones(2))
    n, weights = 100_000, torch.tensor([1.0, 10.0])
    value = gk.expectation(lambda x: x**2, d, n, estimator="score_function", plate=True)
    (value * weights).sum().backward()
    se = gk.score_function(lambda x: x**2, d, n, plate=True)["loc"].std(0) / math.sqrt(n)
    assert torch.all((mu.grad - weights * 2 * mu.detach()).abs() < Z * weights * se)


def test_expectation_errors():
    d = D.Normal(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="unknown estimator"):
        gk.expectation(lambda x: x, d, 3, estimator="reinforce")
    with pytest.raises(
        TypeError, match=r"\['baseline'\]; it takes \['control_variate', 'plate', 'generator'\]"
    ):
        gk.expectation(lambda x: x, d, 3, estimator="pathwise", baseline=1.0)


# ------------------------------------------------------------------ bad input


def test_pathwise_needs_rsample():
    with pytest.raises(ValueError, match="has no rsample"):
        gk.pathwise(lambda x: x, D.Bernoulli(probs=torch.tensor(0.3)), 10)
    with pytest.raises(ValueError, match="has no rsample"):
        gk.expectation(lambda x: x, D.Poisson(torch.tensor(1.0)), 10)


@pytest.mark.parametrize("n", [0, -3])
def test_num_samples_must_be_positive(n):
    d = D.Normal(0.0, 1.0)
    for est in (gk.score_function, gk.pathwise):
        with pytest.raises(ValueError, match="at least 1"):
            est(lambda x: x, d, n)


@pytest.mark.parametrize("n", [2.0, True, "10"])
def test_num_samples_must_be_an_int(n):
    with pytest.raises(TypeError, match="num_samples must be a Python int"):
        gk.score_function(lambda x: x, D.Normal(0.0, 1.0), n)


def test_wrong_output_shape_from_f():
    d = D.Normal(torch.zeros(3), torch.ones(3))
    for est in (gk.score_function, gk.pathwise):
        with pytest.raises(ValueError, match="one value per sample"):
            est(lambda x: x.mean(0), d, 10)  # reduced over samples
    with pytest.raises(TypeError, match="must return a torch.Tensor"):
        gk.score_function(lambda x: 1.0, d, 10)
    with pytest.raises(TypeError, match="f must be callable"):
        gk.score_function("x**2", d, 10)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_in_f(bad):
    d = D.Normal(torch.zeros(3), torch.ones(3))
    f = lambda x: torch.where(x > 0, torch.full_like(x, bad), x)  # noqa: E731
    for est in (gk.score_function, gk.pathwise):
        with pytest.raises(ValueError, match="NaN or inf"):
            est(f, d, 20)


def test_not_a_distribution():
    with pytest.raises(TypeError, match="torch.distributions.Distribution"):
        gk.score_function(lambda x: x, torch.zeros(3), 10)


def test_integer_parameters_are_refused():
    d = D.Poisson(torch.tensor([1, 2]), validate_args=False)
    with pytest.raises(TypeError, match="floating-point parameters"):
        gk.score_function(lambda x: x, d, 10)


def test_score_function_refuses_support_parameters():
    d = D.Uniform(torch.tensor(0.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match="move the support"):
        gk.score_function(lambda x: x, d, 10)


def test_parameter_names_follow_construction():
    logits = torch.tensor([0.1, 0.2])
    d = D.Bernoulli(logits=logits)
    _ = d.probs  # torch caches the derived alternative; the estimator must still use logits
    assert set(gk.score_function(lambda x: x, d, 4)) == {"logits"}
    assert set(gk.score_function(lambda x: x, D.Bernoulli(probs=torch.tensor(0.3)), 4)) == {"probs"}
    assert sorted(gk.distributions.parameters(D.Binomial(10, probs=torch.tensor(0.3)))) == ["probs"]


def test_parameters_of_transformed_and_multivariate_distributions():
    relaxed = D.RelaxedBernoulli(torch.tensor(0.5), logits=torch.tensor([0.3, -0.1]))
    assert list(gk.distributions.parameters(relaxed)) == ["logits"]
    assert gk.pathwise(lambda x: x, relaxed, 3)["logits"].shape == (3, 2)
    assert list(gk.distributions.parameters(D.LogNormal(0.0, 1.0))) == ["loc", "scale"]
    mvn = D.MultivariateNormal(torch.zeros(2), scale_tril=torch.eye(2))
    _ = mvn.covariance_matrix  # cached alternative: the estimators still use scale_tril
    assert list(gk.pathwise(lambda x: x.sum(-1), mvn, 3)) == ["loc", "scale_tril"]
    mvn = D.MultivariateNormal(torch.zeros(2), covariance_matrix=torch.eye(2))
    _ = mvn.scale_tril
    assert list(gk.distributions.parameters(mvn)) == ["loc", "covariance_matrix"]
    geometric = D.Geometric(logits=torch.tensor([0.2]))
    _ = geometric.probs
    assert list(gk.distributions.parameters(geometric)) == ["logits"]
    one_hot = D.OneHotCategorical(logits=torch.zeros(3))
    assert list(gk.distributions.parameters(one_hot)) == ["logits"]
    assert gk.score_function(lambda x: x[..., 0], one_hot, 4)["logits"].shape == (4, 3)


def test_pathwise_of_a_step_function_is_zero_and_therefore_wrong():
    """A step has zero derivative almost everywhere: pathwise gives 0, the score function not."""
    d = D.Normal(torch.tensor(0.5), torch.tensor(1.0))
    step = lambda x: (x > 0).float()  # noqa: E731  cut off from autograd entirely
    assert torch.equal(gk.pathwise(step, d, 100)["loc"], torch.zeros(100))
    exact = math.exp(-0.125) / math.sqrt(2 * math.pi)  # phi(mu / sigma) / sigma
    assert_unbiased(
        {"loc": gk.score_function(step, d, 50_000)["loc"]}, {"loc": torch.tensor(exact)}
    )


@pytest.mark.parametrize(
    "dist",
    [
        D.Normal(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0])),
        D.Categorical(logits=torch.tensor([[0.1, 0.5, -1.0], [0.0, 0.0, 2.0]])),
        D.Gamma(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 3.0])),
        D.MultivariateNormal(torch.zeros(2), scale_tril=torch.tensor([[1.0, 0.0], [0.3, 0.7]])),
        D.Independent(D.Bernoulli(probs=torch.full((3, 4), 0.3)), 1),
    ],
    ids=["normal", "categorical", "gamma", "mvn", "independent_bernoulli"],
)
def test_score_equals_torch_func_per_sample_gradients(dist):
    from torch.func import grad, vmap

    x = dist.sample((6,))
    params = {k: v.detach() for k, v in gk.distributions.parameters(dist).items()}

    def log_density(p, xs):
        return gk.distributions.rebuild(dist, p).log_prob(xs).sum()

    reference = vmap(grad(log_density), in_dims=(None, 0))(params, x)
    ours = gk.score(dist, x)
    for name in params:
        assert torch.allclose(ours[name], reference[name], atol=1e-6), name


@pytest.mark.parametrize("estimator", ["score_function", "measure_valued", "pathwise"])
def test_expectation_any_output_shape_and_upstream_gradient(estimator):
    """f returns (S, 2) for a scalar distribution; upstream weights differ per output."""
    mu = torch.tensor(0.7, requires_grad=True)
    sigma = torch.tensor(1.3, requires_grad=True)
    d = D.Normal(mu, sigma)
    weights = torch.tensor([2.0, -0.5])
    n, repeats = 20_000, 10
    grads = []
    for _ in range(repeats):
        mu.grad = sigma.grad = None
        value = gk.expectation(lambda x: torch.stack([x, x**2], -1), d, n, estimator=estimator)
        assert value.shape == (2,)
        (value * weights).sum().backward()
        grads.append(torch.stack([mu.grad, sigma.grad]))
    grads = torch.stack(grads)
    # E[x] = mu, E[x^2] = mu^2 + sigma^2
    exact = torch.tensor([2.0 - 0.5 * 2 * 0.7, -0.5 * 2 * 1.3])
    se = grads.std(0) / math.sqrt(repeats)
    assert torch.all((grads.mean(0) - exact).abs() <= Z * se + 1e-5), (grads.mean(0), exact, se)


def test_expectation_constant_baseline_is_weighted_like_the_cost():
    """A constant baseline near E[f] lowers the variance of a mean-reduced loss (plate case)."""
    mu = torch.zeros(4, requires_grad=True)
    d = D.Normal(mu, torch.ones(4))

    def grad_once(baseline):
        mu.grad = None
        gk.expectation(
            lambda x: x**2 + 10.0, d, 8, estimator="score_function", baseline=baseline, plate=True
        ).mean().backward()
        return mu.grad.clone()

    plain = torch.stack([grad_once(None) for _ in range(300)])
    based = torch.stack([grad_once(11.0) for _ in range(300)])
    assert based.var(0).mean() < 0.2 * plain.var(0).mean()
    assert based.mean(0).abs().max() < Z * (based.std(0) / math.sqrt(300)).max()


def test_measure_valued_skips_unregistered_parameters_that_need_no_gradient():
    g = D.Gamma(torch.tensor([3.0, 1.5]), torch.tensor([2.0, 0.5]))
    est = gk.measure_valued(lambda x: x, g, 20_000, plate=True)
    assert list(est) == ["rate"]  # Gamma's concentration has no weak derivative
    assert_unbiased(est, {"rate": -g.concentration / g.rate**2})
    rate = torch.tensor(2.0, requires_grad=True)
    value = gk.expectation(
        lambda x: x, D.Gamma(torch.tensor(3.0), rate), 20_000, estimator="measure_valued"
    )
    value.backward()
    assert abs(rate.grad + 0.75) < 0.05
    concentration = torch.tensor(3.0, requires_grad=True)
    with pytest.raises(NotImplementedError, match="Registered"):
        gk.expectation(lambda x: x, D.Gamma(concentration, rate), 10, estimator="measure_valued")


def test_estimators_work_under_inference_mode():
    d = D.Normal(torch.tensor([0.0, 1.0]), torch.tensor(1.0))
    with torch.inference_mode():
        pw = gk.pathwise(lambda x: x**2, d, 4_000)["loc"]
        sf = gk.score_function(lambda x: x**2, d, 40_000)["loc"]
    exact = torch.tensor([0.0, 2.0])
    assert_unbiased({"loc": pw}, {"loc": exact})
    assert_unbiased({"loc": sf}, {"loc": exact})
    # families whose scores come from autograd (no closed form), and a distribution built
    # inside inference mode
    for case in ("beta", "gamma"):
        make, f, expect, params = CASES[case]
        with torch.inference_mode():
            g = gk.score_function(f, make(params), 40_000, plate=True)
            h = gk.score_function(f, make({k: v.clone() for k, v in params.items()}), 4_000)
        assert_unbiased(g, exact_grad(expect, **params))
        assert set(h) == set(params)
    loc, tril = torch.tensor([0.5, -1.0]), torch.tensor([[1.0, 0.0], [0.5, 0.8]])
    with torch.inference_mode():
        mvn = D.MultivariateNormal(loc, scale_tril=tril)
        g = gk.score_function(lambda x: (x**2).sum(-1), mvn, 100_000)
        cv = gk.control_variates.DeltaMethod()
        h = gk.pathwise(lambda x: (x**2).sum(-1), mvn, 100, control_variate=cv)
    assert_unbiased(g["loc"], 2 * loc)
    assert torch.allclose(h["loc"], (2 * loc).expand(100, 2), atol=1e-4)


def test_expectation_updates_a_moving_average_in_the_units_of_f():
    """A stateful baseline sees f itself in the forward pass, whatever the loss's scale."""
    mu = torch.zeros(3, requires_grad=True)
    d = D.Normal(mu, torch.ones(3))
    ema = gk.baselines.ExponentialMovingAverage(decay=0.5)
    for _ in range(6):
        value = gk.expectation(
            lambda x: x**2 + 10.0, d, 64, estimator="score_function", baseline=ema, plate=True
        )
        (1e-3 * value.sum()).backward()  # a loss on a very different scale
    assert abs(ema.average.item() - 11.0) < 1.0
    # per-parameter baselines in the plate case are weighted per element
    mu.grad = None
    value = gk.expectation(
        lambda x: x**2,
        d,
        2_000,
        estimator="score_function",
        baseline=gk.baselines.OptimalConstant(),
        plate=True,
    )
    (value * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(mu.grad, torch.zeros(3), atol=0.4)


# ------------------------------------------------------------------ declared plates

ROLL_LOC, ROLL_SCALE = torch.tensor([0.3, -0.2, 0.5]), torch.tensor([1.0, 0.7, 1.2])
# E[sum_i x_i x_{i+1}] (cyclic) = sum_i mu_i mu_{i+1}: d/dmu_j = mu_{j-1} + mu_{j+1}
ROLL_EXACT = {"loc": torch.tensor([0.3, 0.8, 0.1]), "scale": torch.zeros(3)}
# what crediting element b with its own output f_b = x_b x_{b+1} alone converges to
ROLL_WRONG_PLATE = torch.tensor([-0.2, 0.5, 0.3])


def roll_cost(x):
    """One output per batch element, but output b depends on x_b and x_{b+1}: not a plate."""
    return x * x.roll(-1, -1)


ROLL_SAMPLES = {"score_function": 200_000, "pathwise": 20_000, "measure_valued": 20_000}


@pytest.mark.parametrize("estimator", sorted(ROLL_SAMPLES))
def test_default_is_unbiased_for_a_cost_that_couples_batch_elements(estimator):
    d = D.Normal(ROLL_LOC, ROLL_SCALE)
    n = ROLL_SAMPLES[estimator]
    g = gk.ESTIMATORS[estimator](roll_cost, d, n)
    assert g["loc"].shape == (n, 3)
    assert_unbiased(g, ROLL_EXACT)
    # through expectation: the gradient of one call, within Z standard errors of its rows
    loc, scale = ROLL_LOC.clone().requires_grad_(), ROLL_SCALE.clone().requires_grad_()
    value = gk.expectation(roll_cost, D.Normal(loc, scale), n, estimator=estimator)
    assert value.shape == (3,)
    value.sum().backward()
    for name, grad in (("loc", loc.grad), ("scale", scale.grad)):
        se = g[name].std(0) / math.sqrt(n)
        assert torch.all((grad - ROLL_EXACT[name]).abs() <= Z * se + 1e-6), (name, grad)


@pytest.mark.parametrize("estimator", ["score_function", "measure_valued"])
def test_a_wrongly_declared_plate_is_caught_by_the_tolerance(estimator):
    """plate=True on a coupled cost is a false declaration: the mean is wrong, and it shows."""
    d = D.Normal(ROLL_LOC, ROLL_SCALE)
    g = gk.ESTIMATORS[estimator](roll_cost, d, ROLL_SAMPLES[estimator], plate=True)
    with pytest.raises(AssertionError, match="standard errors off"):
        assert_unbiased(g["loc"], ROLL_EXACT["loc"])
    if estimator == "score_function":  # each element credited with its own output only
        assert_unbiased(g["loc"], ROLL_WRONG_PLATE)


@pytest.mark.parametrize("estimator", ["score_function", "pathwise", "measure_valued"])
def test_plate_with_a_wrong_output_shape_names_both_shapes(estimator):
    d = D.Normal(torch.zeros(3), torch.ones(3))
    for f, got in ((lambda x: x.sum(-1), "(S,)"), (lambda x: torch.stack([x, x], -1), "(S, 3, 2)")):
        pattern = re.escape("(S, 3)") + ".*" + re.escape(got)
        with pytest.raises(ValueError, match=pattern):
            gk.ESTIMATORS[estimator](f, d, 4, plate=True)
        mu = torch.zeros(3, requires_grad=True)
        with pytest.raises(ValueError, match=pattern):
            gk.expectation(f, D.Normal(mu, torch.ones(3)), 4, estimator=estimator, plate=True)
    with pytest.raises(TypeError, match="plate must be True or False"):
        gk.ESTIMATORS[estimator](lambda x: x, d, 4, plate=1)


def test_an_undeclared_plate_shaped_output_hints_once(monkeypatch):
    import warnings

    monkeypatch.setattr(gk.registry, "_hinted", set())
    d = D.Normal(torch.zeros(3), torch.ones(3))
    with pytest.warns(gk.PlateHint, match=r"shape \(S, 3\).*pass plate=True"):
        gk.score_function(lambda x: x**2, d, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        gk.score_function(lambda x: x**2, d, 4)
        monkeypatch.setattr(gk.registry, "_hinted", set())
        gk.score_function(lambda x: x**2, d, 4, plate=True)  # declared: no hint
        gk.score_function(lambda x: (x**2).sum(-1), d, 4)  # not plate-shaped: no hint


# ------------------------------------------------------------------ options and their errors


def test_an_unknown_option_lists_the_options_the_estimator_takes():
    d = D.Normal(torch.tensor(0.0), torch.tensor(1.0))
    f = lambda x: x**2  # noqa: E731
    common = "'control_variate', 'plate', 'generator'"
    cases = [
        (gk.score_function, {"coupling": True}, f"['coupling']; it takes ['baseline', {common}]"),
        (gk.pathwise, {"baseline": 1.0}, f"['baseline']; it takes [{common}]"),
        (
            gk.measure_valued,
            {"baseline": 1.0},
            f"['baseline']; it takes ['coupling', 'wrt', {common}]",
        ),
    ]
    for est, options, message in cases:
        with pytest.raises(TypeError, match=re.escape(message)):
            est(f, d, 4, **options)
    mu = torch.tensor(0.0, requires_grad=True)
    with pytest.raises(
        TypeError, match=re.escape(f"['temperature']; it takes ['coupling', 'wrt', {common}]")
    ):
        gk.expectation(f, D.Normal(mu, 1.0), 4, estimator="measure_valued", temperature=0.5)


def test_a_control_variate_is_not_a_baseline_and_a_baseline_not_a_control_variate():
    mu = torch.tensor(0.5, requires_grad=True)
    d = D.Normal(mu, torch.tensor(1.0))
    cv = gk.control_variates.DeltaMethod()
    with pytest.raises(TypeError, match="DeltaMethod is a control variate.*control_variate="):
        gk.score_function(lambda x: x**2, d, 8, baseline=cv)
    with pytest.raises(TypeError, match="DeltaMethod is a control variate.*control_variate="):
        gk.expectation(lambda x: x**2, d, 8, estimator="score_function", baseline=cv)
    for est in (gk.score_function, gk.pathwise, gk.measure_valued):
        with pytest.raises(TypeError, match="control_variate must be a gradkit.control_variates"):
            est(lambda x: x**2, d, 8, control_variate=gk.baselines.LeaveOneOut())


@pytest.mark.parametrize("bad", [0, "seed", torch.tensor(1)])
def test_generator_must_be_a_torch_generator(bad):
    mu = torch.tensor(0.5, requires_grad=True)
    d = D.Normal(mu, torch.tensor(1.0))
    for est in (gk.score_function, gk.pathwise, gk.measure_valued):
        with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
            est(lambda x: x**2, d, 4, generator=bad)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        gk.expectation(lambda x: x**2, d, 4, generator=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_on_another_device_type_is_refused():
    d = D.Normal(torch.tensor(0.5), torch.tensor(1.0))
    with pytest.raises(ValueError, match="the generator is on cuda"):
        gk.score_function(lambda x: x**2, d, 4, generator=torch.Generator(device="cuda"))
    cuda = D.Normal(torch.tensor(0.5, device="cuda"), torch.tensor(1.0, device="cuda"))
    with pytest.raises(ValueError, match="the generator is on cpu"):
        gk.pathwise(lambda x: x**2, cuda, 4, generator=torch.Generator())


# ------------------------------------------------------------------ explicit random streams

STREAM_DIST = (torch.tensor([0.3, -1.0]), torch.tensor([1.0, 0.5]))


def stream_cost(x):
    return torch.sin(3 * x).sum(-1)


@pytest.mark.parametrize("estimator", [gk.score_function, gk.pathwise, gk.measure_valued])
def test_same_generator_state_gives_the_same_estimates(estimator):
    d = D.Normal(*STREAM_DIST)
    state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(7)
    saved = gen.get_state()
    first = estimator(stream_cost, d, 50, generator=gen)
    advanced = estimator(stream_cost, d, 50, generator=gen)  # the generator moved on
    gen.set_state(saved)
    replay = estimator(stream_cost, d, 50, generator=gen)
    other = estimator(stream_cost, d, 50, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    for name in ("loc", "scale"):
        assert torch.equal(first[name], replay[name]), name
        assert not torch.equal(first[name], advanced[name]), name
        assert not torch.equal(first[name], other[name]), name


@pytest.mark.parametrize("estimator", ["score_function", "pathwise", "measure_valued"])
def test_expectation_same_generator_state_gives_the_same_value_and_gradient(estimator):
    def run(seed):
        loc, scale = (t.clone().requires_grad_() for t in STREAM_DIST)
        gen = torch.Generator().manual_seed(seed)
        value = gk.expectation(
            stream_cost, D.Normal(loc, scale), 50, estimator=estimator, generator=gen
        )
        value.backward()  # the measure-valued perturbations are drawn here
        return torch.cat([value.detach().reshape(1), loc.grad, scale.grad])

    state = torch.get_rng_state()
    first, replay, other = run(7), run(7), run(8)
    assert torch.equal(torch.get_rng_state(), state)  # forward and backward passes included
    assert torch.equal(first, replay)
    assert not torch.equal(first, other)
