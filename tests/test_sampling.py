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
