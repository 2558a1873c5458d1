"""Importance sampling of a Gaussian tail, tuned through its own estimate with fixed draws.

The second moment, its gradient, the best shift and the jump term are checked against
quadrature; the fixed-draw derivatives against the exact gradient within the repo-wide
tolerance of tests/stats.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from compendium import tail_sampling as ts
from gradkit.sampling import common_random_numbers
from tests.stats import Z, assert_unbiased, z_scores

A = 3.0


def _t(value):
    return torch.tensor(value, dtype=torch.float64, requires_grad=True)


def _slope(theta):
    at = _t(theta)
    (g,) = torch.autograd.grad(ts.second_moment(at, A), at)
    return g.item()


@pytest.mark.parametrize("theta", [0.0, 1.5, 3.2])
def test_second_moment_and_its_gradient_against_quadrature(theta):
    def density(x, t):  # p(x)^2 / q_t(x)
        return math.exp(2 * scipy.stats.norm.logpdf(x) - scipy.stats.norm.logpdf(x - t))

    exact = scipy.integrate.quad(density, A, math.inf, args=(theta,), epsabs=1e-16)[0]
    assert ts.second_moment(_t(theta), A).item() == pytest.approx(exact, rel=1e-8)
    h = 1e-5
    fd = (
        scipy.integrate.quad(density, A, math.inf, args=(theta + h,), epsabs=1e-16)[0]
        - scipy.integrate.quad(density, A, math.inf, args=(theta - h,), epsabs=1e-16)[0]
    ) / (2 * h)
    assert _slope(theta) == pytest.approx(fd, rel=1e-5)


def test_optimal_shift_is_the_minimiser():
    best = ts.optimal_shift(A)
    assert abs(_slope(best)) < 1e-15
    grid = torch.linspace(best - 0.5, best + 0.5, 1001, dtype=torch.float64)
    assert grid[ts.second_moment(grid, A).argmin()].item() == pytest.approx(best, abs=1e-3)


@pytest.mark.parametrize("theta", [0.5, 2.0, 3.5])
def test_jump_term_is_what_the_moving_samples_miss(theta):
    # E over eps of the fixed-draw derivative of w(theta + eps; theta)^2 1[theta + eps > a]
    def integrand(e):
        return (
            (-2 * theta - 2 * e) * math.exp(-(theta**2) - 2 * theta * e) * scipy.stats.norm.pdf(e)
        )

    interior = scipy.integrate.quad(integrand, A - theta, math.inf, epsabs=1e-16)[0]
    jump = ts.jump_term(torch.tensor(theta, dtype=torch.float64), A).item()
    assert interior + jump == pytest.approx(_slope(theta), rel=1e-8, abs=1e-15)
    closed = math.exp(theta**2) * scipy.stats.norm.pdf(A + theta)  # the docstring's closed form
    assert jump == pytest.approx(closed, rel=1e-12)


def _fixed_draw_rows(algorithm, theta, num_samples, repeats, seed):
    fixed = common_random_numbers(algorithm, seed)
    shifts = torch.full((repeats,), theta, dtype=torch.float64, requires_grad=True)
    values = fixed(shifts, num_samples, A)
    (rows,) = torch.autograd.grad(values.sum(), shifts)
    return values.detach(), rows


@pytest.mark.parametrize("theta", [1.0, 3.0])
def test_both_estimates_are_unbiased_but_only_one_derivative(theta):
    exact_value = ts.second_moment(torch.tensor(theta, dtype=torch.float64), A)
    jump = ts.jump_term(torch.tensor(theta, dtype=torch.float64), A)
    values, rows = _fixed_draw_rows(ts.from_target, theta, 4000, 400, seed=1)
    assert_unbiased(values, exact_value)
    assert_unbiased(rows, _slope(theta))
    values, rows = _fixed_draw_rows(ts.from_proposal, theta, 4000, 400, seed=2)
    assert_unbiased(values, exact_value)
    assert z_scores(rows, _slope(theta)).item() > 10 * Z  # biased by the jump term ...
    assert_unbiased(rows + jump, _slope(theta))  # ... and by nothing else


def test_gradient_table_columns_and_bias():
    table = ts.gradient_table([1.0, 2.5], 2000, 200, A, seed=3)
    assert table.index.names == ["θ", "algorithm"]
    assert list(table.columns) == ["exact", "mean", "standard error", "z", "jump term"]
    assert (table.xs("draws from the target", level="algorithm")["z"].abs() < Z).all()
    proposal = table.xs("draws from the proposal", level="algorithm")
    assert (proposal["z"].abs() > 10 * Z).all()
    bias = proposal["mean"] - proposal["exact"]
    assert ((bias + proposal["jump term"]).abs() < Z * proposal["standard error"]).all()


def test_saa_shifts_find_the_best_shift_from_the_target_only():
    best = ts.optimal_shift(A)
    shifts = ts.saa_shifts(ts.from_target, 20_000, 16, A, start=2.0, steps=200, seed=4)
    # independent fixed samples: their minimisers scatter around theta* (SAA bias is O(1/n))
    spread = shifts.std().item() / math.sqrt(len(shifts))
    assert abs(shifts.mean().item() - best) < Z * spread + 2e-3
    assert shifts.std().item() < 0.1
    # the proposal's fixed-draw derivative is always negative beyond a: the shift runs away
    away = ts.saa_shifts(ts.from_proposal, 20_000, 4, A, start=2.0, steps=200, seed=4)
    assert (away > best + 5).all()


def test_errors():
    theta = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        ts.from_target(theta, 0)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        ts.from_proposal(theta, 2.5)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        ts.from_target(theta, 10, math.inf)
    with pytest.raises(ValueError, match="no draw beyond the threshold"):
        ts.saa_shifts(ts.from_target, 10, 4, 5.0, steps=1)


@pytest.mark.parametrize("algorithm", [ts.from_target, ts.from_proposal])
def test_estimates_are_the_importance_weights_of_their_own_draws(algorithm):
    # the same draws, weighted by hand with scipy's log-densities: p(x) / q_theta(x)
    theta = torch.tensor([0.5, 2.0, 3.5], dtype=torch.float64)
    got = algorithm(theta, 5000, A, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(3, 5000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = theta[:, None].numpy()
    if algorithm is ts.from_target:
        x, power = eps.numpy(), 1
    else:
        x, power = eps.numpy() + t, 2
    log_w = scipy.stats.norm.logpdf(x) - scipy.stats.norm.logpdf(x - t)
    expected = (np.exp(power * log_w) * (x > A)).mean(-1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
