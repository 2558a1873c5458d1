"""Antithetic and stratified Gaussian draws: marginals, structure, and variances against
closed forms and quadrature."""

from __future__ import annotations

import math

import pytest
import torch

import gradkit as gk
from gradkit import sampling
from tests.stats import Z


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scheme", sampling.SCHEMES)
def test_every_scheme_draws_standard_normals(scheme):
    eps = sampling.normal_noise(100_000, (2,), scheme=scheme, generator=_g(), dtype=torch.float64)
    assert eps.shape == (100_000, 2) and eps.dtype == torch.float64
    # mean 0 and variance 1 within their standard errors (1/sqrt(n) and sqrt(2/n))
    assert (eps.mean(0).abs() < Z / math.sqrt(1e5)).all()
    assert ((eps.var(0) - 1).abs() < Z * math.sqrt(2 / 1e5)).all()


def test_antithetic_rows_are_mirror_images_and_stratified_rows_fill_every_stratum():
    eps = sampling.normal_noise(6, (3,), scheme="antithetic", generator=_g(1))
    assert torch.equal(eps[3:], -eps[:3])
    n = 50
    eps = sampling.normal_noise(n, (4,), scheme="stratified", generator=_g(2), dtype=torch.float64)
    strata = (torch.special.ndtr(eps) * n).floor().long()
    for j in range(4):  # one draw in each of the n strata, per coordinate
        assert sorted(strata[:, j].tolist()) == list(range(n))


def test_the_same_generator_state_gives_the_same_draws():
    for scheme in sampling.SCHEMES:
        a = sampling.normal_noise(8, scheme=scheme, generator=_g(3))
        b = sampling.normal_noise(8, scheme=scheme, generator=_g(3))
        assert torch.equal(a, b)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="scheme must be one of"):
        sampling.normal_noise(4, scheme="sobol")
    with pytest.raises(ValueError, match="num_samples must be even"):
        sampling.normal_noise(5, scheme="antithetic")
    with pytest.raises(ValueError, match="estimator must be"):
        sampling.compare_schemes(lambda x: x, 0.0, 1.0, 4, 10, estimator="measure_valued")
    with pytest.raises(ValueError, match="at least 2"):
        sampling.compare_schemes(lambda x: x, 0.0, 1.0, 4, 1)


@pytest.mark.parametrize("estimator", ["score_function", "pathwise"])
def test_every_scheme_is_unbiased(estimator):
    table = sampling.compare_schemes(
        lambda x: torch.cos(2 * x) + x**3, 0.5, 1.2, 16, 4000, estimator=estimator, generator=_g(4)
    )
    assert (table.z.abs() < Z).all(), table


def test_variances_match_their_closed_forms():
    mu, sigma, n = 1.0, 1.0, 16
    table = sampling.compare_schemes(
        lambda x: x**2, mu, sigma, n, 20_000, generator=_g(5)
    ).set_index("scheme")
    # independent draws: the per-sample variance (quadrature) over n
    per_sample = gk.quadrature.gaussian_gradient_variance(
        lambda x: x**2, mu, sigma, estimator="score_function", param="loc"
    )
    iid = table.loc["iid"]
    assert abs(iid.variance - per_sample / n) < Z * iid.variance_se
    # antithetic pairs: (f(x) - f(2mu - x)) eps / (2 sigma) = 2 mu eps^2, variance 8 mu^2 per pair
    anti = table.loc["antithetic"]
    assert abs(anti.variance - 8 * mu**2 / (n / 2)) < Z * anti.variance_se


def test_common_random_numbers_hold_the_draws_fixed():
    def estimate(theta, scale=1.0, *, generator):
        eps = torch.randn(1000, generator=generator, dtype=torch.float64)
        return ((theta + scale * eps) ** 2).mean()

    fixed = gk.sampling.common_random_numbers(estimate, seed=7)
    theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    first, again = fixed(theta), fixed(theta, scale=1.0)
    assert first.item() == again.item()
    assert fixed(theta, 2.0).item() != first.item()
    # the gradient is the pathwise derivative along the fixed draws: 2 (theta + mean eps)
    (g,) = torch.autograd.grad(first, theta)
    eps = torch.randn(1000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert g.item() == pytest.approx(2 * (0.5 + eps.mean().item()), rel=1e-12)
    # another seed, other draws; gradkit's estimators take the generator too
    assert gk.sampling.common_random_numbers(estimate, seed=8)(theta).item() != first.item()
    dist = torch.distributions.Normal(theta, torch.tensor(1.0, dtype=torch.float64))
    pathwise = gk.sampling.common_random_numbers(
        lambda d, generator: gk.pathwise(lambda x: x**2, d, 10, generator=generator)["loc"],
        seed=1,
    )
    assert torch.equal(pathwise(dist), pathwise(dist))


def test_common_random_numbers_refuse_the_global_generator_and_bad_input():
    def leaky(theta, generator):  # the second draw ignores the generator
        return theta + torch.randn(3, generator=generator) + torch.randn(3)

    with pytest.raises(RuntimeError, match="global random number generator"):
        gk.sampling.common_random_numbers(leaky, seed=0)(torch.tensor(0.0))

    def sampled(theta, generator):  # torch.distributions always draw from the global one
        return torch.distributions.Normal(theta, 1.0).rsample((3,))

    with pytest.raises(RuntimeError, match="pass generator=generator"):
        gk.sampling.common_random_numbers(sampled, seed=0)(torch.tensor(0.0))
    fixed = gk.sampling.common_random_numbers(
        lambda generator: torch.rand(1, generator=generator), 0
    )
    with pytest.raises(TypeError, match="passes generator= itself"):
        fixed(generator=torch.Generator())
    with pytest.raises(TypeError, match="fn must be callable"):
        gk.sampling.common_random_numbers(3, seed=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        gk.sampling.common_random_numbers(leaky, seed=1.5)
