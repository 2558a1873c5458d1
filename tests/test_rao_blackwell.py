"""Sum-and-sample (Rao-Blackwellised) score-function estimator against exact enumeration.

The exact gradient of E_q[f(z)] = sum_z q(z) f(z) comes from autograd through the enumerated
sum; the estimator's mean must agree within a few standard errors, for both parameterisations,
with and without a baseline, for one categorical and for a declared plate of independent ones
(``plate=True``; a batch of categoricals without the declaration is refused).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal

import gradkit as gk
from gradkit import rao_blackwell as rb
from tests.stats import Z, assert_unbiased

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, -2.0], [0.1, 0.2, 0.3, 0.4, 0.5, 3.0]])
TABLE = torch.tensor([[1.0, -2.0, 4.0, 0.5, 3.0, -1.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])


def plate_cost(z: torch.Tensor) -> torch.Tensor:
    """f_b(z_b) = TABLE[b, z_b]: one cost per batch element, shape (S, 2)."""
    return TABLE.expand(*z.shape, -1).gather(-1, z.unsqueeze(-1)).squeeze(-1)


def build(param: str, logits: torch.Tensor) -> tuple[Categorical, torch.Tensor]:
    value = (logits if param == "logits" else logits.softmax(-1)).clone().requires_grad_()
    return Categorical(**{param: value}), value


def exact_gradient(dist: Categorical, leaf: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad((dist.probs * table).sum(), leaf)[0]


@pytest.mark.parametrize("param", ["logits", "probs"])
@pytest.mark.parametrize("num_summed", [0, 1, 3])
@pytest.mark.parametrize("baseline", [None, "loo"])
def test_plate_unbiased(param, num_summed, baseline):
    dist, leaf = build(param, LOGITS)
    exact = exact_gradient(dist, leaf, TABLE)
    options = {"baseline": gk.baselines.LeaveOneOut()} if baseline else {}
    g = rb.sum_and_sample(plate_cost, dist, 20_000, num_summed=num_summed, plate=True, **options)
    assert set(g) == {param} and g[param].shape == (20_000, *leaf.shape)
    assert_unbiased(g[param], exact, atol=1e-6)


@pytest.mark.parametrize("param", ["logits", "probs"])
def test_single_categorical_unbiased_with_constant_baseline(param):
    dist, leaf = build(param, LOGITS[0])
    exact = exact_gradient(dist, leaf, TABLE[0])
    f = lambda z: TABLE[0][z]  # noqa: E731
    g = rb.sum_and_sample(f, dist, 20_000, num_summed=2, baseline=1.5)[param]
    assert_unbiased(g, exact, atol=1e-6)


def test_summing_everything_is_exact():
    dist, leaf = build("logits", LOGITS)
    exact = exact_gradient(dist, leaf, TABLE)
    g = rb.sum_and_sample(plate_cost, dist, 7, num_summed=6, plate=True)["logits"]
    torch.testing.assert_close(g, exact.expand_as(g), rtol=1e-5, atol=1e-6)


def test_variance_falls_as_more_categories_are_summed():
    dist, _ = build("logits", LOGITS)
    variances = [
        float(
            rb.sum_and_sample(plate_cost, dist, 20_000, num_summed=k, plate=True)["logits"]
            .var(0)
            .sum()
        )
        for k in range(6)
    ]
    assert all(b < a for a, b in itertools.pairwise(variances)), variances
    plain = gk.score_function(plate_cost, dist, 20_000, plate=True)["logits"].var(0).sum()
    plain = float(plain)
    assert variances[0] == pytest.approx(plain, rel=0.1)  # k = 0 is the plain estimator
    assert variances[2] < 0.2 * plain


def test_zero_probability_categories_need_no_samples():
    dist = Categorical(probs=torch.tensor([0.5, 0.5, 0.0]))
    g = rb.sum_and_sample(lambda z: z.float(), dist, 5, num_summed=2)["probs"]
    assert torch.isfinite(g).all()
    assert torch.allclose(g, g[0].expand_as(g))  # nothing left to sample: no variance


def test_dtype_and_device_follow_the_distribution():
    dist = Categorical(logits=LOGITS.double())
    g = rb.sum_and_sample(lambda z: z.double(), dist, 3, num_summed=2, plate=True)["logits"]
    assert g.dtype == torch.float64 and g.device == LOGITS.device


def test_errors():
    dist = Categorical(logits=LOGITS)
    with pytest.raises(ValueError, match="a Categorical or the two values of a Bernoulli"):
        rb.sum_and_sample(lambda z: z, Normal(torch.tensor(0.0), torch.tensor(1.0)), 4)
    with pytest.raises(ValueError, match="num_summed must be between 0 and the number"):
        rb.sum_and_sample(plate_cost, dist, 4, num_summed=7, plate=True)
    with pytest.raises(TypeError, match="num_summed must be a Python int"):
        rb.sum_and_sample(plate_cost, dist, 4, num_summed=True, plate=True)
    # a batch of categoricals needs the declared plate, whatever f returns
    for f in (plate_cost, lambda z: plate_cost(z).sum(-1)):
        with pytest.raises(ValueError, match=r"batch_shape \(2,\), declare plate=True"):
            rb.sum_and_sample(f, dist, 4)
        with pytest.raises(ValueError, match="couples the batch"):
            gk.expectation(
                f, Categorical(logits=LOGITS.clone().requires_grad_()), 4, estimator="rao_blackwell"
            )
    with pytest.raises(ValueError, match=r"\(S, 2\).*\(S,\)"):  # declared, wrong shape
        rb.sum_and_sample(lambda z: plate_cost(z).sum(-1), dist, 4, plate=True)
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        rb.sum_and_sample(plate_cost, dist, 0, plate=True)
    with pytest.raises(ValueError, match="at least 2 samples"):
        rb.sum_and_sample(plate_cost, dist, 1, baseline=gk.baselines.LeaveOneOut(), plate=True)
    with pytest.raises(TypeError, match=r"it takes \['num_summed', 'baseline'"):
        gk.ESTIMATORS["rao_blackwell"](plate_cost, dist, 4, coupling=True, plate=True)


def test_generator_and_registration():
    dist = Categorical(logits=LOGITS)
    state = torch.get_rng_state()
    runs = [
        rb.sum_and_sample(
            plate_cost,
            dist,
            50,
            num_summed=2,
            plate=True,
            generator=torch.Generator().manual_seed(s),
        )["logits"]
        for s in (1, 1, 2)
    ]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not hasattr(rb, "score_function")  # renamed: sum_and_sample
    assert not gk.ESTIMATORS["rao_blackwell"].biased


@pytest.mark.parametrize("param", ["logits", "probs"])
@pytest.mark.parametrize("plate", [True, False])
def test_exact_gradient_matches_autograd_through_the_enumerated_sum(param, plate):
    logits, table = (LOGITS, TABLE) if plate else (LOGITS[0], TABLE[0])
    dist, leaf = build(param, logits)
    cost = plate_cost if plate else (lambda z: TABLE[0][z])
    exact = rb.exact_gradient(cost, dist, plate=plate)
    assert set(exact) == {param}
    torch.testing.assert_close(exact[param], exact_gradient(dist, leaf, table))


def test_exact_gradient_errors():
    with pytest.raises(TypeError, match="Categorical"):
        rb.exact_gradient(lambda z: z, Bernoulli(probs=torch.tensor(0.3)))
    with pytest.raises(ValueError, match="couples the batch"):
        rb.exact_gradient(plate_cost, Categorical(logits=LOGITS))  # plate not declared
    with pytest.raises(ValueError, match="plate=True declares one cost per categorical"):
        rb.exact_gradient(lambda z: plate_cost(z).sum(-1), Categorical(logits=LOGITS), plate=True)


def test_variance_sweep_records():
    dist, _ = build("logits", LOGITS)
    loo = {"none": None, "loo": gk.baselines.LeaveOneOut()}
    rows = rb.variance_sweep(plate_cost, dist, 20_000, [0, 2, 6], baselines=loo, plate=True)
    assert [r["k"] for r in rows] == [0, 2, 6]
    assert list(rows[0]) == ["k", "top-k mass", "none", "loo", "plain, k + 1 samples"]
    top2 = LOGITS.softmax(-1).topk(2, -1).values.sum(-1).mean().item()
    assert rows[0]["top-k mass"] == 0.0 and rows[1]["top-k mass"] == pytest.approx(top2)
    assert rows[2]["top-k mass"] == pytest.approx(1.0)
    assert rows[2]["none"] == pytest.approx(0.0, abs=1e-10)  # everything summed: exact
    plain = rows[0]["plain, k + 1 samples"]
    assert rows[1]["plain, k + 1 samples"] == pytest.approx(plain / 3)
    assert rows[0]["none"] == pytest.approx(plain, rel=0.1)  # k = 0 is the plain estimator
    assert rows[1]["none"] < 0.2 * plain and rows[1]["loo"] < rows[1]["none"]


def test_variance_sweep_errors():
    dist = Categorical(logits=LOGITS)
    with pytest.raises(ValueError, match="num_summed is empty"):
        rb.variance_sweep(plate_cost, dist, 10, [], plate=True)
    with pytest.raises(ValueError, match="baselines is empty"):
        rb.variance_sweep(plate_cost, dist, 10, [1], baselines={}, plate=True)
    with pytest.raises(ValueError, match="clash with the columns"):
        rb.variance_sweep(plate_cost, dist, 10, [1], baselines={"k": None}, plate=True)
    with pytest.raises(ValueError, match="num_samples must be at least 2"):
        rb.variance_sweep(plate_cost, dist, 1, [1], plate=True)
    with pytest.raises(ValueError, match="num_summed must be between 0 and the number"):
        rb.variance_sweep(plate_cost, dist, 10, [1, 7], plate=True)
    with pytest.raises(ValueError, match="declare plate=True"):
        rb.variance_sweep(plate_cost, dist, 10, [1])
    with pytest.raises(TypeError, match="Categorical"):
        rb.variance_sweep(lambda z: z, Bernoulli(probs=torch.tensor(0.3)), 10, [0])


@pytest.mark.parametrize("num_summed", [0, 2, 4])
def test_check_unbiased_passes_the_estimator(num_summed):
    dist, _ = build("probs", LOGITS)
    check = rb.check_unbiased(plate_cost, dist, 20_000, num_summed=num_summed, plate=True)
    assert check.expected_error > 0 and check.ratio < Z, check


def test_check_unbiased_everything_summed_is_exact():
    dist, _ = build("logits", LOGITS)
    check = rb.check_unbiased(plate_cost, dist, 10, num_summed=6, plate=True)
    assert check.expected_error == 0.0 and check.ratio == 0.0


def test_check_unbiased_detects_a_bias(monkeypatch):
    estimator = rb.sum_and_sample

    def biased(*args, **kwargs):
        return {name: g + 0.05 for name, g in estimator(*args, **kwargs).items()}

    monkeypatch.setattr(rb, "sum_and_sample", biased)
    dist, _ = build("logits", LOGITS)
    assert rb.check_unbiased(plate_cost, dist, 20_000, num_summed=2, plate=True).ratio > 10
    assert rb.check_unbiased(plate_cost, dist, 10, num_summed=6, plate=True).ratio == math.inf


def test_check_unbiased_errors():
    with pytest.raises(ValueError, match="num_samples must be at least 2"):
        rb.check_unbiased(plate_cost, Categorical(logits=LOGITS), 1, plate=True)


@pytest.mark.parametrize("param", ["probs", "logits"])
def test_a_bernoulli_site_is_two_categories(param):
    p0 = torch.tensor(0.3, dtype=torch.float64)
    value = p0 if param == "probs" else p0.logit()
    leaf = value.clone().requires_grad_()
    dist = Bernoulli(**{param: leaf})

    def f(z):  # two outputs, summed by the default (coupled) contract
        return torch.stack([2 * z, (z - 0.3) ** 2], -1)

    exact_leaf = value.clone().requires_grad_()
    p = exact_leaf if param == "probs" else torch.sigmoid(exact_leaf)
    expected = p * (2 + 0.49) + (1 - p) * 0.09
    (exact,) = torch.autograd.grad(expected, exact_leaf)
    # one value summed exactly, the other the only one left: every row is exact
    rows = rb.sum_and_sample(f, Bernoulli(**{param: value}), 6, num_summed=1)[param]
    torch.testing.assert_close(rows, exact.expand(6))
    # none summed: the plain score function, unbiased
    plain = rb.sum_and_sample(f, Bernoulli(**{param: value}), 40_000, num_summed=0)[param]
    assert_unbiased(plain, exact)
    out = gk.expectation(f, dist, 6, estimator="rao_blackwell", num_summed=1)
    torch.testing.assert_close(out.sum(), expected.detach())
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, exact)
