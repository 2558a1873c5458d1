"""The reparameterisation chapter's reading of the relaxation study, in the compendium."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

import gradkit as gk
from compendium.relaxation_studies import coldest_run, rise_when_colder, temperature_claims


def test_coldest_run():
    taus = [0.1, 0.2, 0.5, 1.0]
    assert coldest_run([True, True, True, True], taus) == 1.0
    assert coldest_run([True, False, True, True], taus) == 0.1
    assert math.isnan(coldest_run([False, True, True, True], taus))


def test_rise_when_colder_is_the_largest_pairwise_z_over_colder_hotter_pairs():
    rng = np.random.default_rng(0)
    taus = np.sort(rng.uniform(0.05, 5.0, 7))
    bias, se = rng.uniform(0.0, 1.0, 7), rng.uniform(0.01, 0.1, 7)
    want = max(
        ((bias[c] - bias[h]) / math.hypot(se[c], se[h]), taus[c], taus[h])
        for c, h in itertools.combinations(range(7), 2)  # c < h: c is the colder
    )
    assert rise_when_colder(bias, se, taus) == pytest.approx(want)
    z, _, _ = rise_when_colder([0.1, 0.2, 0.3], [0.1, 0.1, 0.1], [0.1, 0.2, 0.5])
    assert z < 0  # a bias that only falls as τ falls
    with pytest.raises(ValueError, match="two or more temperatures"):
        rise_when_colder([0.1], [0.1], [0.1])
    with pytest.raises(ValueError, match="2 biases, 1 standard errors"):
        rise_when_colder([0.1, 0.2], [0.1], [0.1, 0.2])


def study(seed=0):
    torch.manual_seed(seed)
    logits = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    c = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    taus = [0.05, 0.1, 0.3, 1.0, 3.0]
    exact = gk.reparam.categorical_gradient(lambda y: y @ c, logits).norm().item()
    rows = gk.reparam.relaxation_study(lambda y: y @ c, logits, taus, 400)
    return pd.DataFrame(
        [{"cost": "linear", **row, "bias / ‖exact‖": row["bias"] / exact} for row in rows]
    )


def test_claims_restate_the_rows():
    relax = study()
    claims = temperature_claims(relax)["linear"]
    soft = relax[relax.estimator == "Gumbel-softmax"].set_index("temperature")
    hard = relax[relax.estimator == "straight-through"].set_index("temperature")
    sf_var = relax[relax.estimator == "score function"]["variance"].item()
    taus = soft.index.to_numpy()
    assert claims["hot bias / ‖exact‖"] == soft["bias / ‖exact‖"].iloc[-1]
    assert claims["Var(SF) / Var(GS), hottest"] == pytest.approx(sf_var / soft["variance"].iloc[-1])
    low = taus <= 0.3
    slope = np.polyfit(np.log(taus[low]), np.log(soft["variance"].to_numpy()[low]), 1)[0]
    assert claims["variance slope, τ ≤ 0.3"] == pytest.approx(slope)
    below = (soft["bias"] < 2 * soft["standard_error"]).to_numpy()
    assert claims["bias < 2 s.e. for all τ up to"] == pytest.approx(
        coldest_run(below, taus), nan_ok=True
    )
    assert claims["τ where Var(ST) > Var(GS)"] == int((hard["variance"] > soft["variance"]).sum())
    ratio = (hard["variance"] / soft["variance"] - 1).abs().max()
    assert claims["max |Var(ST) / Var(GS) − 1|"] == pytest.approx(ratio)
    z, cold, hot = rise_when_colder(soft["bias"], soft["standard_error"], taus)
    assert (
        claims["largest bias rise when colder (s.e.)"],
        claims["… to τ"],
        claims["… from τ"],
    ) == (z, cold, hot)


def test_claims_refuse_incomplete_studies():
    relax = study()
    with pytest.raises(ValueError, match="needs Gumbel-softmax and straight-through rows"):
        temperature_claims(relax[relax.estimator != "score function"])
    shifted = relax.copy()
    st = shifted.estimator == "straight-through"
    shifted.loc[st, "temperature"] = shifted.loc[st, "temperature"] * 2
    with pytest.raises(ValueError, match="temperatures differ"):
        temperature_claims(shifted)
