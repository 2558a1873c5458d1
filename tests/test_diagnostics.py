"""Diagnostics: moments against closed forms, pooling over repeats, bad input."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

import gradkit as gk
from gradkit.baselines import ExponentialMovingAverage
from gradkit.diagnostics import (
    CountingCost,
    GradientSummary,
    gradient_moments,
    gradient_variance,
    repeated_gradients,
    summarize,
)

MU, SIGMA = 0.5, 1.2


def quadrature(fn):
    """E[fn(eps)] for eps ~ N(0, 1), by Gauss-Hermite quadrature (exact for polynomials)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    return float((weights * fn(nodes)).sum() / weights.sum())


def test_pathwise_moments_match_closed_form():
    # f = x^2 with x = mu + sigma eps: per-sample estimates 2x (loc) and 2 x eps (scale)
    dist = Normal(torch.tensor(MU, dtype=torch.float64), torch.tensor(SIGMA, dtype=torch.float64))
    n = 20_000
    exact = {"loc": 2 * MU, "scale": 2 * SIGMA}
    summaries = gradient_moments("pathwise", lambda x: x**2, dist, n // 2, repeats=2, exact=exact)
    per_sample = {
        "loc": lambda e: 2 * (MU + SIGMA * e) - 2 * MU,
        "scale": lambda e: 2 * (MU + SIGMA * e) * e - 2 * SIGMA,
    }
    for name, centred in per_sample.items():
        s = summaries[name]
        assert isinstance(s, GradientSummary)
        assert s.count == n and s.num_samples == n // 2
        assert s.within(4), (name, s.z_score)
        variance = quadrature(lambda e, c=centred: c(e) ** 2)
        fourth = quadrature(lambda e, c=centred: c(e) ** 4)
        # standard error of a sample variance: sqrt((mu_4 - sigma^4) / n)
        assert abs(float(s.variance) - variance) < 4 * math.sqrt((fourth - variance**2) / n)
        assert torch.allclose(s.variance_of_mean, s.variance / (n // 2))
        assert torch.allclose(s.standard_error, (s.variance / n).sqrt())
        assert s.mean.dtype == torch.float64
    assert summaries["loc"].variance.item() == pytest.approx(4 * SIGMA**2, rel=0.05)


def test_repeats_pool_like_one_long_run():
    calls = []

    def fake(f, dist, num_samples):
        k = len(calls)
        calls.append(k)
        values = torch.arange(num_samples, dtype=torch.float64) * (k + 1) + k**2
        return {"a": values, "b": torch.stack([values, -2 * values], -1)}

    summaries = gradient_moments(fake, None, None, 5, repeats=4)
    pooled = torch.cat([torch.arange(5.0, dtype=torch.float64) * (k + 1) + k**2 for k in range(4)])
    assert len(calls) == 4
    a, b = summaries["a"], summaries["b"]
    assert a.count == 20 and a.num_samples == 5
    assert torch.allclose(a.mean, pooled.mean())
    assert torch.allclose(a.variance, pooled.var())
    assert torch.allclose(b.variance, torch.stack([pooled.var(), 4 * pooled.var()]))
    assert torch.allclose(a.variance_of_mean, pooled.var() / 5)
    assert torch.allclose(a.standard_error, (pooled.var() / 20).sqrt())


def test_estimator_by_name_with_options_and_state():
    dist = Normal(torch.tensor(MU), torch.tensor(SIGMA))
    ema = ExponentialMovingAverage(decay=0.5)
    summaries = gradient_moments(
        "score_function",
        lambda x: x**2,
        dist,
        2_000,
        repeats=3,
        exact={"loc": 2 * MU},
        baseline=ema,
    )
    assert ema.steps == 3  # one call per repeat, state carried over
    assert summaries["loc"].within(4)
    assert summaries["scale"].exact is None and summaries["scale"].bias is None


def test_bias_z_score_and_within():
    s = summarize({"a": torch.tensor([1.0, 2.0, 3.0, 4.0])}, exact={"a": 1.0})["a"]
    assert s.bias.item() == pytest.approx(1.5)
    assert s.z_score.item() == pytest.approx(1.5 / math.sqrt((5 / 3) / 4))
    assert s.within(3) and not s.within(1)
    assert s.within(1, atol=1.0)


def test_zero_variance_z_scores():
    exact_hit = summarize({"a": torch.ones(3, 2)}, exact={"a": 1.0})["a"]
    assert torch.equal(exact_hit.z_score, torch.zeros(2)) and exact_hit.within()
    # rounding-size differences pass by default; real ones do not
    rounding = summarize({"a": torch.full((3,), 1.0 + 1e-7)}, exact={"a": 1.0})["a"]
    assert rounding.within()
    missed = summarize({"a": torch.ones(3, 2)}, exact={"a": torch.tensor([2.0, 0.0])})["a"]
    assert torch.equal(missed.z_score, torch.tensor([-math.inf, math.inf]))
    assert not missed.within()


def test_summarize_exact_broadcasts_and_num_samples():
    estimates = {"loc": torch.randn(10, 3)}
    s = summarize(estimates, exact={"loc": 0.0}, num_samples=5)["loc"]
    assert s.exact.shape == (3,) and s.count == 10 and s.num_samples == 5
    assert torch.allclose(s.variance_of_mean, estimates["loc"].var(0) / 5)


def test_gradient_variance_closed_form():
    grads = torch.tensor([[0.0, 1.0, 5.0], [2.0, 1.0, 1.0], [4.0, 1.0, 3.0]])
    assert gradient_variance(grads).item() == pytest.approx(4.0 + 0.0 + 4.0)
    both = gradient_variance({"w": grads, "b": grads[:, :1] * 2})
    assert both.item() == pytest.approx(8.0 + 16.0)
    assert gradient_variance(torch.randn(4, 2, 3, dtype=torch.float64)).dtype == torch.float64


def test_repeated_gradients_of_a_stochastic_loss():
    # d/dw E_{x~N(w,1)}[x^2] = 2w; the score-function estimate from S samples has variance
    # Var[x^2 (x - w)] / S.
    w = torch.tensor([MU], requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)
    num_samples, repeats = 10, 400

    def loss():
        dist = Normal(w, torch.ones(1))
        return gk.expectation(
            lambda x: x**2, dist, num_samples, estimator="score_function", plate=True
        ).sum()

    grads = repeated_gradients(loss, [w, unused], repeats)
    assert grads.shape == (repeats, 3)
    assert torch.equal(grads[:, 1:], torch.zeros(repeats, 2))
    assert w.grad is None
    per_sample = quadrature(lambda e: ((MU + e) ** 2 * e) ** 2) - (2 * MU) ** 2
    expected = per_sample / num_samples
    summary = summarize({"w": grads[:, 0]}, exact={"w": 2 * MU})["w"]
    assert summary.within(4)
    # the sample variance of R nearly Gaussian means has relative SE sqrt(2 / (R - 1))
    assert gradient_variance(grads).item() == pytest.approx(
        expected, rel=4 * math.sqrt(2 / (repeats - 1))
    )


def test_error_unknown_or_bad_estimator():
    dist = Normal(torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown estimator 'reinforce'"):
        gradient_moments("reinforce", lambda x: x, dist, 10)
    with pytest.raises(TypeError, match="estimator must be a name in gk.ESTIMATORS"):
        gradient_moments(42, lambda x: x, dist, 10)
    with pytest.raises(TypeError, match="the estimator result must be a dict"):
        gradient_moments(lambda f, d, n: torch.zeros(n), lambda x: x, dist, 10)


@pytest.mark.parametrize("repeats", [0, -1, 1.5, "2", True])
def test_error_bad_repeats(repeats):
    dist = Normal(torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        gradient_moments("pathwise", lambda x: x, dist, 10, repeats=repeats)


def test_error_too_few_estimates():
    dist = Normal(torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="at least 2 estimates in all"):
        gradient_moments("pathwise", lambda x: x, dist, 1)
    with pytest.raises(ValueError, match="at least 2 estimates per parameter"):
        summarize({"loc": torch.zeros(1)})
    with pytest.raises(ValueError, match="exceeds the 3 estimates"):
        summarize({"loc": torch.zeros(3)}, num_samples=4)
    with pytest.raises(TypeError, match="estimates must be a dict"):
        summarize(torch.zeros(3))


def test_error_bad_exact():
    estimates = {"loc": torch.randn(5, 3)}
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['scale'\]"):
        summarize(estimates, exact={"scale": 1.0})
    with pytest.raises(ValueError, match="does not broadcast"):
        summarize(estimates, exact={"loc": torch.zeros(2)})
    with pytest.raises(TypeError, match="exact must be a dict"):
        summarize(estimates, exact=1.0)
    with pytest.raises(ValueError, match="no exact value to compare with"):
        summarize(estimates)["loc"].within()


def test_error_bad_gradient_variance_input():
    with pytest.raises(ValueError, match="at least 2 repeated estimates"):
        gradient_variance(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="grads must be a floating tensor"):
        gradient_variance([torch.zeros(3, 2)])
    with pytest.raises(TypeError, match="grads must be a floating tensor"):
        gradient_variance(torch.zeros(3, 2, dtype=torch.long))


def test_error_bad_repeated_gradients_input():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        repeated_gradients(lambda: w * 2, [w], 2)
    with pytest.raises(ValueError, match="params must be a non-empty list"):
        repeated_gradients(lambda: w.sum(), [], 2)
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        repeated_gradients(lambda: w.sum(), [w], 0)


@pytest.mark.parametrize(
    ("estimator", "options", "per_sample"),
    [
        ("score_function", {}, lambda d: 1),
        ("pathwise", {}, lambda d: 1),
        ("measure_valued", {"coupling": True}, lambda d: 1 + 3 * d),
        ("measure_valued", {"coupling": False}, lambda d: 1 + 4 * d),
    ],
)
def test_counting_cost_counts_rows_per_sample(estimator, options, per_sample):
    # one row = one draw of the 3-d Gaussian, however the estimator batches its calls
    d, n = 3, 7
    dist = Independent(Normal(torch.zeros(d), torch.ones(d)), 1)
    cost = CountingCost(lambda x: x.pow(2).sum(-1), dist.event_shape)
    gk.ESTIMATORS[estimator](cost, dist, n, **options)
    assert cost.rows == per_sample(d) * n
    assert 1 <= cost.calls <= cost.rows
    cost.reset()
    assert (cost.calls, cost.rows) == (0, 0)


@pytest.mark.filterwarnings("ignore::gradkit.PlateHint")
@pytest.mark.parametrize(
    ("reduce", "plate", "rows_per_sample"),
    [(False, True, 1 + 3), (False, False, 1 + 3 * 5), (True, False, 1 + 3 * 5)],
)
def test_counting_cost_sees_the_plate_saving(reduce, plate, rows_per_sample):
    # a batch of 5 independent Normals: with one value per element declared a plate, the
    # measure-valued estimator perturbs every element at once; undeclared, or a cost that sums
    # over the batch, every element is perturbed on its own
    dist = Normal(torch.zeros(5), torch.ones(5))
    cost = CountingCost((lambda x: x.pow(2).sum(-1)) if reduce else torch.square, dist.batch_shape)
    gk.measure_valued(cost, dist, 4, plate=plate)
    assert cost.rows == rows_per_sample * 4


def test_counting_cost_passes_values_and_gradients_through():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    cost = CountingCost(lambda t: t.pow(2).sum(-1), 2)
    value = cost(x)
    assert value.dtype == torch.float64 and torch.equal(value, x.detach().pow(2).sum(-1))
    value.sum().backward()
    assert torch.equal(x.grad, 2 * x.detach())
    scalar = CountingCost(torch.sin)
    scalar(torch.zeros(4, 3))
    assert (scalar.calls, scalar.rows) == (1, 12)
    assert repr(cost) == "CountingCost(calls=1, rows=2, shape=(2,))"
    torch.manual_seed(0)
    counted = gk.pathwise(CountingCost(torch.sin), Normal(torch.tensor(0.3), torch.tensor(1.0)), 9)
    torch.manual_seed(0)
    plain = gk.pathwise(torch.sin, Normal(torch.tensor(0.3), torch.tensor(1.0)), 9)
    assert all(torch.equal(counted[k], plain[k]) for k in plain)


def test_counting_cost_errors():
    with pytest.raises(TypeError, match="f must be a callable"):
        CountingCost("x**2")
    for shape in (0, (3, -1), 2.5, "3", (True,)):
        with pytest.raises(ValueError, match="shape must be a positive int"):
            CountingCost(torch.sin, shape)
    cost = CountingCost(torch.sin, (3,))
    with pytest.raises(ValueError, match=r"one row has shape \(3,\).*dist.batch_shape"):
        cost(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="one row has shape"):
        CountingCost(torch.sin, (2, 3))(torch.zeros(3))
    with pytest.raises(TypeError, match="expects a tensor"):
        cost([0.0, 1.0, 2.0])
    assert (cost.calls, cost.rows) == (0, 0)


def test_check_by_enumeration_passes_the_right_estimators_and_catches_the_wrong_ones():
    @gk.register_estimator("enum_wrong_scale")
    def wrong(problem):  # the score function with its sign flipped
        rows = gk.ESTIMATORS["score_function"].estimate(problem)
        return {n: -v for n, v in rows.items()}

    q = torch.distributions.Bernoulli(logits=torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64))
    try:
        rows = gk.diagnostics.check_by_enumeration(
            ["score_function", "disarm", "straight_through", "enum_wrong_scale"],
            lambda z: torch.sin(2 * z.sum(-1)) + z[..., 0] * z[..., 2],
            q,
            20_000,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        del gk.ESTIMATORS["enum_wrong_scale"]
    by_name = {r["estimator"]: r for r in rows}
    assert by_name["score_function"]["within"] and by_name["disarm"]["within"]
    assert not by_name["enum_wrong_scale"]["within"]
    assert by_name["straight_through"]["biased"] and not by_name["straight_through"]["within"]
    assert by_name["disarm"]["variance"] < by_name["score_function"]["variance"]


def test_check_by_enumeration_records_a_refusal():
    q = torch.distributions.Categorical(logits=torch.zeros(3))
    (row,) = gk.diagnostics.check_by_enumeration(["arm"], lambda z: z.double(), q, 10)
    assert "defined for Bernoulli" in row["refused"] and not row["within"]


def test_variance_standard_error_matches_the_gaussian_closed_form():
    # the sample variance of n Gaussian values has standard deviation sigma^2 sqrt(2 / n)
    n, batches, sigma = 2000, 2000, 1.5
    generator = torch.Generator().manual_seed(0)
    values = sigma * torch.randn(n, batches, generator=generator, dtype=torch.float64)
    se = gk.diagnostics.variance_standard_error(values)
    assert se.shape == (batches,) and se.dtype == torch.float64
    exact = sigma**2 * math.sqrt(2 / n)
    spread = se.std().item() / math.sqrt(batches)  # standard error of the mean estimate
    slack = 3 / n * exact  # the plug-in moments' O(1/n) bias
    assert abs(se.mean().item() - exact) <= 4.5 * spread + slack
    # and it measures what it claims: the spread of the variances themselves
    variances = values.var(0)
    assert se.mean().item() == pytest.approx(variances.std().item(), rel=0.05)


def test_variance_standard_error_along_a_dimension_and_errors():
    x = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(
        gk.diagnostics.variance_standard_error(x), torch.zeros(2, dtype=torch.float64)
    )
    assert gk.diagnostics.variance_standard_error(x.T, dim=1).shape == (2,)
    with pytest.raises(ValueError, match="at least 2 values"):
        gk.diagnostics.variance_standard_error(torch.ones(1))
    with pytest.raises(ValueError, match="at least 2 values"):
        gk.diagnostics.variance_standard_error(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        gk.diagnostics.variance_standard_error([1.0, 2.0])


def test_standard_error_measures_the_spread_of_means():
    # the standard error of a mean of n values is sigma / sqrt(n): check it against the spread
    # of many independent means, and its average against the closed form
    n, batches, sigma = 400, 4000, 2.0
    generator = torch.Generator().manual_seed(1)
    values = sigma * torch.randn(n, batches, generator=generator, dtype=torch.float64)
    se = gk.diagnostics.standard_error(values)
    assert se.shape == (batches,) and se.dtype == torch.float64
    exact = sigma / math.sqrt(n)
    assert abs(se.mean().item() - exact) <= 4.5 * se.std().item() / math.sqrt(batches) + 1e-3
    assert values.mean(0).std().item() == pytest.approx(exact, rel=0.05)
    assert gk.diagnostics.standard_error(values.T, dim=1).shape == (batches,)


def test_z_score_of_an_unbiased_and_a_biased_estimate():
    generator = torch.Generator().manual_seed(2)
    rows = MU + SIGMA * torch.randn(20_000, 3, generator=generator)
    z = gk.diagnostics.z_score(rows, MU)
    assert z.shape == (3,) and z.dtype == torch.float64
    assert z.abs().max() < 4.5
    # a bias of 0.1 is 0.1 / (1.2 / sqrt(20000)) ~ 12 standard errors
    assert (gk.diagnostics.z_score(rows, MU - 0.1) > 8).all()
    # exact broadcasts, per element; the value matches the definition
    exact = torch.tensor([MU, MU + 0.2, MU])
    expected = (rows.double().mean(0) - exact) / (rows.double().std(0) / math.sqrt(20_000))
    torch.testing.assert_close(gk.diagnostics.z_score(rows, exact), expected.double())
    # a variance against its exact value: the mean of squared (zero-mean) deviations
    assert gk.diagnostics.z_score((rows - MU) ** 2, SIGMA**2).abs().max() < 4.5


def test_z_score_without_spread_and_errors():
    flat = torch.full((5,), 2.0)
    assert gk.diagnostics.z_score(flat, 2.0).item() == 0.0
    assert gk.diagnostics.z_score(flat, 1.0).item() == math.inf
    assert gk.diagnostics.z_score(flat, 3.0).item() == -math.inf
    with pytest.raises(ValueError, match="does not broadcast"):
        gk.diagnostics.z_score(torch.zeros(4, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="at least 2 values"):
        gk.diagnostics.z_score(torch.zeros(1, 3), 0.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        gk.diagnostics.z_score([1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="at least 2 values"):
        gk.diagnostics.standard_error(torch.tensor(1.0))


def test_results_table_rows_columns_and_elements():
    generator = torch.Generator().manual_seed(3)
    vector = torch.randn(1000, 2, generator=generator, dtype=torch.float64) + torch.tensor([0, 1])
    scalar = torch.randn(1000, generator=generator, dtype=torch.float64)
    table = gk.diagnostics.results_table(
        {("loc", "pathwise"): vector, ("scale", "score"): scalar},
        {("loc", "pathwise"): torch.tensor([0.0, 1.0])},
        index=["parameter", "estimator", "element"],
    )
    assert list(table.columns) == [
        "exact", "mean", "standard error", "z", "per-sample variance", "variance s.e.",
    ]  # fmt: skip
    assert table.index.names == ["parameter", "estimator", "element"]
    assert len(table) == 3
    row = table.loc[("loc", "pathwise", 1)]
    assert row["exact"] == 1.0
    assert row["mean"] == pytest.approx(vector[:, 1].mean().item())
    assert row["standard error"] == pytest.approx(gk.diagnostics.standard_error(vector)[1].item())
    assert row["z"] == pytest.approx(gk.diagnostics.z_score(vector, torch.tensor([0, 1.0]))[1])
    assert row["per-sample variance"] == pytest.approx(vector[:, 1].var().item())
    assert row["variance s.e."] == pytest.approx(
        gk.diagnostics.variance_standard_error(vector)[1].item()
    )
    other = table.loc[("scale", "score", "")]
    assert math.isnan(other["exact"]) and math.isnan(other["z"])
    # a single-level table, without the variance columns
    plain = gk.diagnostics.results_table({"a": scalar, "b": scalar + 5}, {"b": 5.0}, variance=False)
    assert list(plain.index) == ["a", "b"] and list(plain.columns) == [
        "exact", "mean", "standard error", "z",
    ]  # fmt: skip
    assert abs(plain.loc["b", "z"]) < 4.5
    assert plain.loc["b", "z"] == pytest.approx(gk.diagnostics.z_score(scalar, 0.0).item())


def test_results_table_errors():
    rows = torch.zeros(4)
    with pytest.raises(TypeError, match="non-empty dict"):
        gk.diagnostics.results_table({})
    with pytest.raises(TypeError, match="non-empty dict"):
        gk.diagnostics.results_table(rows)
    with pytest.raises(TypeError, match="exact must be a dict"):
        gk.diagnostics.results_table({"a": rows}, 1.0)
    with pytest.raises(ValueError, match=r"\['b'\] with no estimates"):
        gk.diagnostics.results_table({"a": rows}, {"b": 1.0})
    with pytest.raises(ValueError, match="does not broadcast"):
        gk.diagnostics.results_table({"a": rows}, {"a": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"results_table\['a'\] needs at least 2 values"):
        gk.diagnostics.results_table({"a": torch.zeros(1)})
    with pytest.raises(TypeError, match="torch.Tensor"):
        gk.diagnostics.results_table({"a": [1.0, 2.0]})
    with pytest.raises(ValueError, match="all be tuples of one length"):
        gk.diagnostics.results_table({"a": rows, ("b", "c"): rows})
    with pytest.raises(ValueError, match=r"index names \['x', 'y'\] do not match"):
        gk.diagnostics.results_table({"a": rows}, index=["x", "y"])


def test_results_table_names_the_element_level_and_keeps_nan():
    rows = torch.randn(50, 3, generator=torch.Generator().manual_seed(6))
    table = gk.diagnostics.results_table({"a": rows}, index="estimate")
    assert table.index.names == ["estimate", "element"]
    assert gk.diagnostics.results_table({"a": rows[:, 0]}, index="e").index.names == ["e"]
    rows[4, 1] = math.nan  # a NaN estimate gives a NaN z, not a confident infinity
    z = gk.diagnostics.z_score(rows, 0.0)
    assert math.isnan(z[1]) and not z[[0, 2]].isnan().any()
    assert math.isnan(gk.diagnostics.z_score(torch.full((3,), math.nan), 0.0))
