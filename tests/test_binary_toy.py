"""The REBAR/RELAX toy: exact values, every estimator's z-score, tuning and optimisation."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import gradkit as gk
from compendium import binary_toy as toy
from tests.stats import Z

ESTIMATORS = {n: n for n in ("score_function", "arm", "disarm", "rebar", "relax", "rao_blackwell")}


def test_exact_gradient_is_the_derivative_of_the_expected_cost():
    logit = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(toy.expected_cost(torch.sigmoid(logit), 0.45), logit)
    theta = torch.sigmoid(logit.detach())
    assert toy.exact_gradient(theta, 0.45) == pytest.approx(grad.item())
    assert toy.exact_gradient(theta, 0.45, wrt="probs") == pytest.approx(0.1)


def test_every_estimator_is_unbiased_on_the_toy_at_its_budget():
    table = pd.DataFrame(
        toy.variance_by_evaluations(
            ESTIMATORS,
            theta=0.3,
            t=0.45,
            evaluations=[6, 12],
            repeats=4_000,
            generator=torch.Generator().manual_seed(0),
        )
    )
    assert set(table.columns) >= {"estimator", "evaluations", "draws", "mean", "z", "variance"}
    assert (table["z"].abs() < Z).all(), table
    rebar = table[table.estimator == "rebar"]
    assert (rebar["evaluations"] == 3 * rebar["draws"]).all()
    assert (table[table.estimator == "arm"]["draws"] % 2 == 0).all()
    sf = table[table.estimator == "score_function"].set_index("evaluations")["variance"]
    assert sf[12] < sf[6]  # more evaluations, less variance


def test_a_wrong_estimator_gets_a_large_z_score():
    @gk.register_estimator("toy_wrong_sign")
    def wrong(problem):  # the score function with its sign flipped
        rows = gk.ESTIMATORS["score_function"].estimate(problem)
        return {n: -v for n, v in rows.items()}

    try:
        table = pd.DataFrame(
            toy.variance_by_evaluations(
                {"wrong": "toy_wrong_sign"}, theta=0.3, t=0.45, evaluations=[8], repeats=4_000
            )
        )
    finally:
        del gk.ESTIMATORS["toy_wrong_sign"]
    assert table["z"].abs().iloc[0] > Z


def test_tuning_lowers_relax_variance_and_optimisation_finds_the_optimum():
    relax = gk.discrete.RELAX().double()
    squares = toy.tune(
        relax, theta=0.3, t=0.45, steps=200, lr=0.05, generator=torch.Generator().manual_seed(1)
    )
    assert sum(squares[-50:]) < 0.5 * sum(squares[:50])
    curves = pd.DataFrame(
        toy.optimise(
            {"disarm": "disarm", "relax": gk.discrete.RELAX().double()},
            t=0.45,
            steps=150,
            lr=0.1,
            chains=4,
            generator=torch.Generator().manual_seed(2),
            progress=False,
        )
    )
    last = curves.groupby("estimator").tail(1).set_index("estimator")
    assert last.loc["disarm", "theta"] < 0.2  # the gradient 1 - 2t > 0 pushes theta to 0
    assert last.loc["disarm", "expected_cost"] < toy.expected_cost(0.5, 0.45).item()
    assert len(curves) == 2 * 150


def test_the_toy_refuses_bad_input():
    with pytest.raises(ValueError, match=r"theta must lie in \(0, 1\)"):
        toy.variance_by_evaluations(ESTIMATORS, theta=1.0, t=0.45, evaluations=[2], repeats=4)
    with pytest.raises(ValueError, match="finite number"):
        toy.optimise(ESTIMATORS, t=math.nan, steps=1)
    with pytest.raises(TypeError, match="tune trains an estimator with parameters"):
        toy.tune(gk.ESTIMATORS["arm"], theta=0.3, t=0.45, steps=1)
    with pytest.raises(ValueError, match="wrt must be"):
        toy.exact_gradient(0.3, 0.45, wrt="theta")
