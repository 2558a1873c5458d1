"""Tests for gradkit.reparam: implicit reparameterisation, Gumbel tricks and relaxation bias.

Statistical tests run at the seed fixed in conftest.py and allow 4 standard errors.
"""

import math

import numpy as np
import pytest
import scipy.special as sp
import scipy.stats
import torch
from torch.distributions import (
    Bernoulli,
    Beta,
    Categorical,
    Cauchy,
    Chi2,
    Dirichlet,
    Exponential,
    Gamma,
    Independent,
    Laplace,
    MultivariateNormal,
    Normal,
    Poisson,
    StudentT,
    Uniform,
)

import gradkit as gk
from gradkit import reparam

F64 = torch.float64


def t64(*values):
    """A float64 tensor: 0-d for one value, 1-d for several."""
    return torch.tensor(values[0] if len(values) == 1 else values, dtype=F64)


# --- differentiable CDFs --------------------------------------------------------------------


@pytest.mark.parametrize("a", [0.05, 0.3, 1.0, 2.5, 30.0])
def test_gamma_cdf_value_and_gradients_match_scipy(a):
    x = t64(0.01, 0.5, 1.0, 3.0, 10.0, 40.0) * a
    conc = torch.full_like(x, a).requires_grad_()
    rate = torch.full_like(x, 1.5).requires_grad_()
    xg = x.clone().requires_grad_()
    F = reparam.gamma_cdf(xg, conc, rate)
    z = (1.5 * x).numpy()
    np.testing.assert_allclose(F.detach().numpy(), sp.gammainc(a, z), rtol=1e-12, atol=1e-15)
    d_conc, d_rate, d_x = torch.autograd.grad(F.sum(), [conc, rate, xg])
    h = 1e-5 * a
    fd = (sp.gammainc(a + h, z) - sp.gammainc(a - h, z)) / (2 * h)
    np.testing.assert_allclose(d_conc.numpy(), fd, rtol=1e-6, atol=1e-10)  # FD rounding ~ eps/h
    density = scipy.stats.gamma.pdf(x.numpy(), a, scale=1 / 1.5)
    np.testing.assert_allclose(d_x.numpy(), density, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(d_rate.numpy(), x.numpy() / 1.5 * density, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize(
    ("a", "b"), [(0.3, 0.5), (1.0, 1.0), (2.0, 5.0), (20.0, 0.7), (40.0, 60.0)]
)
def test_beta_cdf_value_and_gradients_match_scipy(a, b):
    x = t64(1e-4, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999)
    A = torch.full_like(x, a).requires_grad_()
    B = torch.full_like(x, b).requires_grad_()
    xg = x.clone().requires_grad_()
    F = reparam.beta_cdf(xg, A, B)
    xs = x.numpy()
    np.testing.assert_allclose(F.detach().numpy(), sp.betainc(a, b, xs), rtol=1e-10, atol=1e-14)
    d_a, d_b, d_x = torch.autograd.grad(F.sum(), [A, B, xg])
    h = 1e-6
    fd_a = (sp.betainc(a + h, b, xs) - sp.betainc(a - h, b, xs)) / (2 * h)
    fd_b = (sp.betainc(a, b + h, xs) - sp.betainc(a, b - h, xs)) / (2 * h)
    np.testing.assert_allclose(d_a.numpy(), fd_a, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(d_b.numpy(), fd_b, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(d_x.numpy(), scipy.stats.beta.pdf(xs, a, b), rtol=1e-9)


def test_cdfs_keep_float32():
    x = torch.tensor([0.2, 0.6])
    a = torch.tensor(2.0, requires_grad=True)
    for F in (reparam.gamma_cdf(x, a), reparam.beta_cdf(x, a, 3.0)):
        assert F.dtype == torch.float32
        (g,) = torch.autograd.grad(F.sum(), a)
        assert g.dtype == torch.float32 and torch.isfinite(g)


def test_registry_lookup_prefers_registered_and_follows_subclasses():
    class Shifted(Uniform):
        pass

    @reparam.register_cdf(Shifted)
    def _cdf(dist, value):
        return torch.full_like(value, 0.25)

    assert reparam.differentiable_cdf(Shifted(0.0, 1.0), torch.tensor(0.9)).item() == 0.25
    chi2 = Chi2(t64(3.0))
    x = t64(2.0)
    expected = sp.gammainc(1.5, 1.0)
    assert reparam.differentiable_cdf(chi2, x).item() == pytest.approx(expected, rel=1e-12)


def test_register_cdf_rejects_non_distribution():
    with pytest.raises(TypeError, match="Distribution subclass"):
        reparam.register_cdf(int)


# --- implicit reparameterisation ------------------------------------------------------------


def test_location_derivative_is_exactly_one():
    # Source 002: for a location family F(x; theta) = F(x - theta; 0), dx/dtheta = 1.
    for dist in (
        Normal(t64(0.3), t64(1.7)),
        Laplace(t64(-1.0), t64(0.5)),
        Cauchy(t64(2.0), t64(0.2)),
    ):
        x = dist.sample((500,))
        dx = reparam.implicit_derivative(dist, x)
        torch.testing.assert_close(dx["loc"], torch.ones_like(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(dx["scale"], (x - dist.loc) / dist.scale, rtol=1e-10, atol=1e-10)


def test_implicit_derivative_closed_forms():
    # Beta(a, 1): F = x^a, x = u^(1/a), dx/da = -x log(x) / a.
    # Beta(1, b): F = 1 - (1-x)^b, dx/db = (1-x) log(1-x) / b.
    # Gamma and Exponential rates: x scales like 1/rate, dx/drate = -x/rate.
    cases = [
        (Beta(t64(2.5), t64(1.0)), "concentration1", lambda x: -x * torch.log(x) / 2.5),
        (Beta(t64(1.0), t64(0.6)), "concentration0", lambda x: (1 - x) * torch.log1p(-x) / 0.6),
        (Gamma(t64(0.7), t64(3.0)), "rate", lambda x: -x / 3.0),
        (Exponential(t64(2.0)), "rate", lambda x: -x / 2.0),
    ]
    for dist, name, expected in cases:
        x = dist.sample((400,))
        dx = reparam.implicit_derivative(dist, x)[name]
        torch.testing.assert_close(dx, expected(x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("a", [0.2, 1.0, 4.0, 50.0])
def test_gamma_implicit_derivative_matches_inverse_cdf_finite_differences(a):
    u = np.linspace(0.01, 0.99, 41)
    x = torch.as_tensor(sp.gammaincinv(a, u))
    dx = reparam.implicit_derivative(Gamma(t64(a), t64(1.0)), x)["concentration"]
    h = 1e-5 * a
    fd = (sp.gammaincinv(a + h, u) - sp.gammaincinv(a - h, u)) / (2 * h)
    np.testing.assert_allclose(dx.numpy(), fd, rtol=1e-6)


@pytest.mark.parametrize(("a", "b"), [(0.5, 0.5), (3.0, 1.5), (10.0, 20.0)])
def test_beta_implicit_derivative_matches_inverse_cdf_finite_differences(a, b):
    u = np.linspace(0.01, 0.99, 41)
    x = torch.as_tensor(sp.betaincinv(a, b, u))
    dx = reparam.implicit_derivative(Beta(t64(a), t64(b)), x)
    h = 1e-6
    fd_a = (sp.betaincinv(a + h, b, u) - sp.betaincinv(a - h, b, u)) / (2 * h)
    fd_b = (sp.betaincinv(a, b + h, u) - sp.betaincinv(a, b - h, u)) / (2 * h)
    np.testing.assert_allclose(dx["concentration1"].numpy(), fd_a, rtol=1e-5)
    np.testing.assert_allclose(dx["concentration0"].numpy(), fd_b, rtol=1e-5)


def test_implicit_gradients_match_torch_rsample_for_gamma_and_beta():
    # torch differentiates its Gamma/Beta samples with approximations (accurate to ~1e-3).
    a = torch.full((2000,), 1.3, dtype=F64, requires_grad=True)
    x = Gamma(a, torch.ones_like(a)).rsample()
    (torch_grad,) = torch.autograd.grad(x.sum(), a)
    ours = reparam.implicit_derivative(Gamma(t64(1.3), t64(1.0)), x.detach())["concentration"]
    torch.testing.assert_close(ours, torch_grad, rtol=5e-3, atol=1e-8)

    c1 = torch.full((2000,), 0.8, dtype=F64, requires_grad=True)
    c0 = torch.full((2000,), 2.5, dtype=F64, requires_grad=True)
    x = Beta(c1, c0).rsample()
    g1, g0 = torch.autograd.grad(x.sum(), [c1, c0])
    ours = reparam.implicit_derivative(Beta(t64(0.8), t64(2.5)), x.detach())
    torch.testing.assert_close(ours["concentration1"], g1, rtol=5e-3, atol=1e-8)
    torch.testing.assert_close(ours["concentration0"], g0, rtol=5e-3, atol=1e-8)


def test_implicit_rsample_keeps_values_and_sends_gradient_upstream():
    raw = torch.tensor(0.5, dtype=F64, requires_grad=True)
    conc = torch.nn.functional.softplus(raw)
    dist = Gamma(conc, t64(2.0))
    torch.manual_seed(3)
    plain = dist.sample((100,))
    torch.manual_seed(3)
    x = reparam.implicit_rsample(dist, (100,))
    assert x.shape == (100,) and x.dtype == F64
    torch.testing.assert_close(x.detach(), plain, rtol=0, atol=0)
    x.sum().backward()
    dx = reparam.implicit_derivative(Gamma(conc.detach(), t64(2.0)), plain)["concentration"]
    expected = dx.sum() * torch.sigmoid(raw.detach())
    torch.testing.assert_close(raw.grad, expected)


def test_implicit_rsample_float32_and_independent():
    loc = torch.zeros(3, requires_grad=True)
    dist = Independent(Normal(loc, torch.ones(3)), 1)
    x = reparam.implicit_rsample(dist, (5,))
    assert x.shape == (5, 3) and x.dtype == torch.float32
    x.sum().backward()
    torch.testing.assert_close(loc.grad, torch.full((3,), 5.0))


def test_implicit_pathwise_is_unbiased_for_gamma_and_beta():
    n = 20_000
    a, b = 1.5, 2.0
    # E[x^2] = a(a+1)/b^2 for Gamma(a, rate b).
    g = reparam.implicit_pathwise(lambda x: x**2, Gamma(t64(a), t64(b)), n)
    exact = {"concentration": (2 * a + 1) / b**2, "rate": -2 * a * (a + 1) / b**3}
    for name, value in exact.items():
        est = g[name]
        assert est.shape == (n,)
        assert abs(est.mean().item() - value) < 4 * est.std().item() / math.sqrt(n)
    # E[x] = a/(a+b) for Beta(a, b).
    g = reparam.implicit_pathwise(lambda x: x, Beta(t64(a), t64(b)), n)
    exact = {"concentration1": b / (a + b) ** 2, "concentration0": -a / (a + b) ** 2}
    for name, value in exact.items():
        est = g[name]
        assert abs(est.mean().item() - value) < 4 * est.std().item() / math.sqrt(n)


def test_implicit_pathwise_batched_plate_and_constant_cost():
    loc = t64(0.0, 1.0, 2.0)
    g = reparam.implicit_pathwise(lambda x: x**2, Normal(loc, t64(1.0, 1.0, 1.0)), 3000)
    assert g["loc"].shape == (3000, 3)
    se = g["loc"].std(0) / math.sqrt(3000)
    assert bool(((g["loc"].mean(0) - 2 * loc).abs() < 4 * se).all())
    zero = reparam.implicit_pathwise(lambda x: torch.ones_like(x), Normal(t64(0.0), t64(1.0)), 7)
    assert bool((zero["loc"] == 0).all()) and zero["scale"].shape == (7,)


def test_implicit_errors_name_the_fix():
    with pytest.raises(NotImplementedError, match="register_cdf"):
        reparam.implicit_rsample(StudentT(t64(3.0)), (2,))
    with pytest.raises(ValueError, match="scalar events"):
        reparam.implicit_rsample(MultivariateNormal(torch.zeros(2), torch.eye(2)))
    with pytest.raises(ValueError, match="scalar events"):
        reparam.implicit_derivative(Dirichlet(torch.ones(3)), torch.ones(3) / 3)
    with pytest.raises(ValueError, match="discrete"):
        reparam.implicit_pathwise(lambda x: x, Poisson(t64(2.0)), 10)
    with pytest.raises(TypeError, match="torch.distributions.Distribution"):
        reparam.implicit_rsample("Normal(0, 1)")
    with pytest.raises(ValueError, match="num_samples"):
        reparam.implicit_pathwise(lambda x: x, Normal(t64(0.0), t64(1.0)), 0)


def test_implicit_pathwise_generator_plate_and_control_variate():
    dist = Gamma(t64(1.5, 3.0), t64(2.0, 0.5))
    state = torch.get_rng_state()
    runs = [
        reparam.implicit_pathwise(
            lambda x: x**2, dist, 20, plate=True, generator=torch.Generator().manual_seed(s)
        )
        for s in (1, 1, 2)
    ]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0]["rate"], runs[1]["rate"])
    assert not torch.equal(runs[0]["rate"], runs[2]["rate"])
    with pytest.raises(ValueError, match=r"\(S, 2\).*\(S,\)"):
        reparam.implicit_pathwise(lambda x: (x**2).sum(-1), dist, 4, plate=True)
    # a quadratic cost: the delta method makes every implicit-pathwise row exact
    normal = Normal(t64(0.3), t64(1.4))
    cv = gk.control_variates.DeltaMethod(coefficient=1.0)
    g = reparam.implicit_pathwise(lambda x: x**2, normal, 10, control_variate=cv)
    torch.testing.assert_close(g["loc"], torch.full((10,), 0.6, dtype=F64))
    torch.testing.assert_close(g["scale"], torch.full((10,), 2.8, dtype=F64))


# --- Gumbel-max and the Concrete relaxation -------------------------------------------------


def test_gumbel_max_frequencies_match_probabilities():
    probs = torch.tensor([[0.05, 0.15, 0.3, 0.5], [0.4, 0.3, 0.2, 0.1]], dtype=F64)
    n = 50_000
    k = reparam.gumbel_max(torch.log(probs) + 1.7, (n,))  # logits need not be normalised
    assert k.shape == (n, 2) and k.dtype == torch.long
    for row in range(2):
        counts = torch.bincount(k[:, row], minlength=4).numpy()
        p_value = scipy.stats.chisquare(counts, n * probs[row].numpy()).pvalue
        assert p_value > 1e-3


def test_gumbel_max_never_draws_a_zero_probability_category():
    k = reparam.gumbel_max(torch.tensor([0.0, -math.inf, 0.0]), (5000,))
    assert not bool((k == 1).any())


def test_gumbel_softmax_sample_simplex_limit_and_straight_through():
    logits = torch.log(torch.tensor([0.2, 0.3, 0.5])).requires_grad_()
    y = reparam.gumbel_softmax_sample(logits, 0.5, (1000,))
    assert y.shape == (1000, 3)
    torch.testing.assert_close(y.sum(-1), torch.ones(1000))
    cold = reparam.gumbel_softmax_sample(logits.detach(), 0.01, (1000,))
    assert (cold.max(-1).values > 0.99).float().mean() > 0.95
    hard = reparam.gumbel_softmax_sample(logits, 0.5, (1000,), straight_through=True)
    assert set(hard.detach().unique().tolist()) == {0.0, 1.0}
    (hard * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert logits.grad is not None and bool((logits.grad != 0).any())


def test_gumbel_softmax_bias_shrinks_as_temperature_falls():
    logits = torch.log(t64(0.1, 0.2, 0.3, 0.4))
    c = t64(1.0, -2.0, 3.0, 0.5)
    pi = torch.softmax(logits, -1)
    exact = pi * (c - (pi * c).sum())  # d/dlogits of E[z . c] = sum_k pi_k c_k
    n = 40_000
    bias, se = [], []
    for tau in (4.0, 1.0, 0.25):
        g = reparam.gumbel_softmax(lambda y: y @ c, Categorical(logits=logits), n, tau)["logits"]
        assert g.shape == (n, 4)
        bias.append((g.mean(0) - exact).norm().item())
        se.append((g.var(0).sum() / n).sqrt().item())
    assert bias[0] > 4 * se[0]  # biased at a high temperature ...
    assert bias[0] - bias[1] > 4 * (se[0] + se[1])  # ... and less so as it falls
    assert bias[1] - bias[2] > 4 * (se[1] + se[2])
    hard = reparam.gumbel_softmax(
        lambda y: y @ c, Categorical(logits=logits), n, 0.25, straight_through=True
    )["logits"]
    assert hard.shape == (n, 4) and bool(torch.isfinite(hard).all())


def test_gumbel_softmax_bernoulli_at_low_temperature():
    probs = t64(0.3, 0.8)
    n = 40_000
    g = reparam.gumbel_softmax(lambda y: y, Bernoulli(probs=probs), n, 0.05)["probs"]
    se = g.std(0) / math.sqrt(n)
    assert bool(((g.mean(0) - 1.0).abs() < 4 * se + 0.02).all())  # d/dp E[z] = 1
    g = reparam.gumbel_softmax(lambda y: y.sum(-1), Bernoulli(logits=t64(0.0, 0.0)), 10, 0.5)
    assert g["logits"].shape == (10, 2)


def test_gumbel_softmax_generator_and_plate():
    logits = torch.log(t64(0.2, 0.3, 0.5)).expand(2, 3)
    dist = Categorical(logits=logits)
    c = t64(1.0, -2.0, 3.0)
    state = torch.get_rng_state()
    runs = [
        reparam.gumbel_softmax(
            lambda y: y @ c, dist, 10, 0.5, plate=True, generator=torch.Generator().manual_seed(s)
        )["logits"]
        for s in (1, 1, 2)
    ]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with pytest.raises(ValueError, match=r"\(S, 2\).*\(S,\)"):
        reparam.gumbel_softmax(lambda y: (y @ c).sum(-1), dist, 4, 0.5, plate=True)


def test_gumbel_errors_name_the_fix():
    logits = torch.zeros(3)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature must be positive"):
            reparam.gumbel_softmax_sample(logits, bad)
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="temperature must be a positive number"):
            reparam.gumbel_softmax(lambda y: y.sum(-1), Categorical(logits=logits), 5, bad)
    with pytest.raises(ValueError, match="relaxes Categorical, OneHotCategorical and Bernoulli"):
        reparam.gumbel_softmax(lambda x: x, Normal(0.0, 1.0), 5, 0.5)
    with pytest.raises(TypeError, match="floating-point tensor"):
        reparam.gumbel_max(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="last dimension"):
        reparam.gumbel_max(torch.tensor(1.0))
    with pytest.raises(ValueError, match="NaN"):
        reparam.gumbel_max(torch.tensor([0.0, math.nan]))


# --- exact categorical gradients and the relaxation study ------------------------------------


def test_categorical_gradient_matches_autograd_through_the_enumeration():
    logits = t64(0.3, -1.0, 2.0, 0.0).requires_grad_()
    target = t64(1.0, 0.0, 0.0, 0.0)

    def cost(z):  # (S, 4) -> (S, 2): the target sums the two outputs
        return torch.stack([((z - target) ** 2).sum(-1), z @ t64(1.0, -2.0, 3.0, 0.5)], -1)

    (expected,) = torch.autograd.grad(
        (torch.softmax(logits, -1) * cost(torch.eye(4, dtype=F64)).sum(-1)).sum(), logits
    )
    got = reparam.categorical_gradient(cost, logits)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert got.shape == (4,) and not got.requires_grad
    blocked = reparam.categorical_gradient(cost, t64(0.0, -math.inf, 0.0, 0.0))
    assert blocked[1].item() == 0.0 and abs(blocked.sum().item()) < 1e-12


def test_categorical_gradient_float32_and_errors():
    got = reparam.categorical_gradient(lambda z: z[:, 0], torch.zeros(2))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.25, -0.25]))
    with pytest.raises(ValueError, match=r"shape \(K,\)"):
        reparam.categorical_gradient(lambda z: z[..., 0], torch.zeros(2, 3))
    with pytest.raises(TypeError, match="floating-point tensor"):
        reparam.categorical_gradient(lambda z: z[:, 0], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one value per sample"):
        reparam.categorical_gradient(lambda z: z.sum(), torch.zeros(3))


def test_relaxation_study_bias_and_variance_against_enumeration():
    logits = torch.log(t64(0.1, 0.2, 0.3, 0.4))
    c = t64(1.0, -2.0, 3.0, 0.5)
    n = 20_000
    rows = reparam.relaxation_study(lambda y: y @ c, logits, [0.1, 5.0, 1e3], n)
    got = {
        (r["estimator"], r["temperature"]): r for r in rows if r["estimator"] != "score function"
    }
    (sf,) = [r for r in rows if r["estimator"] == "score function"]
    assert len(rows) == 7 and math.isnan(sf["temperature"])
    # at a very high temperature y is nearly uniform and barely moves: the mean gradient is ~0,
    # so the bias is the exact gradient's norm
    exact = reparam.categorical_gradient(lambda y: y @ c, logits)
    assert got["Gumbel-softmax", 1e3]["bias"] == pytest.approx(exact.norm().item(), rel=0.02)
    assert sf["bias"] < 4 * sf["standard_error"]  # the score function is unbiased
    assert sf["standard_error"] == pytest.approx(math.sqrt(sf["variance"] / n))
    hot, cold = got["Gumbel-softmax", 5.0], got["Gumbel-softmax", 0.1]
    assert hot["bias"] > 10 * hot["standard_error"]  # confidently wrong when hot ...
    assert cold["bias"] < hot["bias"] / 4  # ... much less biased when cold ...
    assert cold["variance"] > 10 * hot["variance"]  # ... and much noisier
    # a linear cost has the same gradient at the hard and the soft sample
    st = got["straight-through", 0.1]
    assert abs(st["variance"] - cold["variance"]) < 0.1 * cold["variance"]


def test_relaxation_study_errors_name_the_fix():
    logits = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match="temperatures is empty"):
        reparam.relaxation_study(lambda y: y[..., 0], logits, [], 10)
    with pytest.raises(ValueError, match="temperature must be positive"):
        reparam.relaxation_study(lambda y: y[..., 0], logits, [0.5, 0.0], 10)
    with pytest.raises(ValueError, match="two samples"):
        reparam.relaxation_study(lambda y: y[..., 0], logits, [0.5], 1)
    with pytest.raises(ValueError, match=r"shape \(K,\)"):
        reparam.relaxation_study(lambda y: y[..., 0], logits[None], [0.5], 10)
