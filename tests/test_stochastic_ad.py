"""Stochastic triples: unbiasedness against closed forms and dynamic programming, finite
differences under common random numbers, the score function of the same program, the
registered one-draw estimator, and every refusal."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, Poisson

import gradkit as gk
from compendium import program_studies as studies
from gradkit import stochastic_ad as sad
from gradkit.models import programs
from tests.stats import assert_unbiased

N = 40_000
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
STRATEGY_ERROR = "strategy must be one of"


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grad(fn, theta):
    """The exact gradient of a closed form ``fn(theta)`` by autograd (float64)."""
    t = torch.as_tensor(theta, dtype=torch.float64).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(t), t)
    return g


# -- unbiasedness against closed forms -----------------------------------------------------------

CLOSED_FORMS = {
    # program, theta, exact expectation as a function of theta
    "binomial-mean": (lambda t: sad.binomial(10, t), 0.3, lambda t: 10 * t),
    "binomial-square": (
        lambda t: sad.binomial(7, t) ** 2,
        0.6,
        lambda t: 7 * t * (1 - t) + (7 * t) ** 2,
    ),
    "poisson-mean": (lambda t: sad.poisson(t), 2.5, lambda t: t),
    "poisson-square": (lambda t: sad.poisson(t) ** 2, 2.5, lambda t: t + t**2),
    "poisson-cube": (lambda t: sad.poisson(t) ** 3, 1.2, lambda t: t + 3 * t**2 + t**3),
    "geometric-mean": (lambda t: sad.geometric(t), 0.35, lambda t: (1 - t) / t),
    "geometric-square": (lambda t: sad.geometric(t) ** 2, 0.5, lambda t: (1 - t) * (2 - t) / t**2),
    # E[min(X, 3)] = sum_{k < 3} P(X > k) = sum (1 - p)^{k+1}
    "geometric-clamped": (
        lambda t: sad.geometric(t).clamp(max=3.0),
        0.3,
        lambda t: sum((1 - t) ** (k + 1) for k in range(3)),
    ),
    "bernoulli-affine": (lambda t: 3 * sad.bernoulli(t) - t, 0.4, lambda t: 2 * t),
    # a Bernoulli selects a Poisson's rate: E[X^2] = t (2t + 4t^2) + (1 - t)(5 + 25)
    "bernoulli-selects-poisson": (
        lambda t: sad.poisson(torch.where(sad.bernoulli(t) > 0, 2 * t, 5.0)) ** 2,
        0.4,
        lambda t: t * (2 * t + 4 * t**2) + (1 - t) * 30,
    ),
    # a Poisson count is the number of trials of a Binomial: E = 3 t
    "poisson-trials-of-binomial": (
        lambda t: sad.binomial(sad.poisson(3.0), t),
        0.3,
        lambda t: 3 * t,
    ),
    # the draw's parameter depends on theta continuously and the cost too
    "continuous-and-discrete": (
        lambda t: t**2 * sad.poisson(torch.exp(t)),
        0.5,
        lambda t: t**2 * torch.exp(t),
    ),
}


@DTYPES
@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_unbiased_against_closed_forms(name, dtype):
    program, theta, expected = CLOSED_FORMS[name]
    rows = sad.derivative_estimates(program, torch.tensor(theta, dtype=dtype), N, generator=_g())
    assert rows.shape == (N,) and rows.dtype == dtype
    assert_unbiased(rows, _grad(expected, theta), atol=1e-4 if dtype == torch.float32 else 1e-9)


TABLE = torch.tensor([1.0, -2.0, 5.0, 0.5], dtype=torch.float64)


def _table_lookup(t):
    probs = torch.softmax(torch.stack([t[0], t[1], t[0] * t[1], torch.zeros_like(t[0])]), 0)
    return TABLE.to(t.dtype)[sad.categorical(probs)] * (1 + t[1])


def _table_exact(t):
    probs = torch.softmax(torch.stack([t[0], t[1], t[0] * t[1], torch.zeros_like(t[0])]), 0)
    return (probs * TABLE).sum() * (1 + t[1])


def test_categorical_table_lookup_with_a_vector_theta():
    theta = torch.tensor([0.2, -0.7], dtype=torch.float64)
    rows = sad.derivative_estimates(_table_lookup, theta, N, generator=_g(1))
    assert rows.shape == (N, 2)
    assert_unbiased(rows, _grad(_table_exact, theta))


def test_a_matrix_theta_gets_one_derivative_per_coordinate():
    theta = torch.tensor([[1.0, 2.0], [0.5, 3.0]], dtype=torch.float64)
    weights = torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=torch.float64)
    rows = sad.derivative_estimates(
        lambda t: (weights * sad.poisson(t) ** 2).sum(), theta, N, generator=_g(2)
    )
    assert rows.shape == (N, 2, 2)
    assert_unbiased(rows, weights * (1 + 2 * theta))


def test_categorical_draws_of_a_batch_and_both_directions_of_a_boundary():
    # two categoricals per run; probabilities of some categories fall while others rise
    def program(t):
        logits = torch.stack([torch.stack([t, -t, 0 * t]), torch.stack([0 * t, 2 * t, t])])
        index = sad.categorical(torch.softmax(logits, -1))
        values = torch.tensor([[0.0, 3.0, -1.0], [2.0, -2.0, 4.0]], dtype=t.dtype)
        return values[0][index[0]] * values[1][index[1]]

    def exact(t):
        logits = torch.stack([torch.stack([t, -t, 0 * t]), torch.stack([0 * t, 2 * t, t])])
        probs = torch.softmax(logits, -1)
        values = torch.tensor([[0.0, 3.0, -1.0], [2.0, -2.0, 4.0]], dtype=t.dtype)
        return (probs[0] * values[0]).sum() * (probs[1] * values[1]).sum()

    rows = sad.derivative_estimates(
        program, torch.tensor(0.4, dtype=torch.float64), N, generator=_g(3)
    )
    assert_unbiased(rows, _grad(exact, 0.4))


@pytest.mark.parametrize("steps", [1, 5, 25])
def test_random_walk_against_dynamic_programming(steps):
    theta = 2.0 * steps
    value, slope = programs.random_walk_exact(theta, steps)
    t = torch.tensor(theta, dtype=torch.float64)
    rows = sad.derivative_estimates(lambda s: programs.random_walk(s, steps), t, N, generator=_g(4))
    assert_unbiased(rows, slope)
    values = sad.program_values(lambda s: programs.random_walk(s, steps), t, N, generator=_g(4))
    assert_unbiased(values.unsqueeze(1), [value])


def test_random_walk_exact_agrees_with_finite_differences():
    h = 1e-5
    _, slope = programs.random_walk_exact(30.0, 15)
    up, _ = programs.random_walk_exact(30.0 + h, 15)
    down, _ = programs.random_walk_exact(30.0 - h, 15)
    assert slope == pytest.approx((up - down) / (2 * h), rel=1e-6)


def test_inventory_against_its_markov_chain():
    policy = programs.InventoryPolicy(base_stock=5, capacity=4, periods=6)
    theta = torch.tensor([4.0, 0.3], dtype=torch.float64)
    value, grad = programs.inventory_exact(theta, policy)
    rows = sad.derivative_estimates(
        lambda t: programs.inventory_cost(t, policy), theta, N, generator=_g(5)
    )
    assert_unbiased(rows, grad)
    values = sad.program_values(
        lambda t: programs.inventory_cost(t, policy), theta, N, generator=_g(6)
    )
    assert_unbiased(values.unsqueeze(1), [value])
    h = 1e-6
    for i in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[i] = h
        up, _ = programs.inventory_exact(theta + step, policy)
        down, _ = programs.inventory_exact(theta - step, policy)
        assert grad[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-5)


def test_finite_differences_under_common_random_numbers_where_smooth():
    # the draws do not depend on theta: each run's derivative is the pathwise one, exactly
    def program(t):
        counts = sad.poisson(torch.tensor([2.0, 5.0], dtype=t.dtype))
        flip = sad.bernoulli(0.3)
        return torch.sin(t * counts[0]) + torch.where(flip > 0, t**3, counts[1] * t)

    theta, h = torch.tensor(0.7, dtype=torch.float64), 1e-6
    rows = sad.derivative_estimates(program, theta, 500, generator=_g(7))
    up = sad.program_values(program, theta + h, 500, generator=_g(7))
    down = sad.program_values(program, theta - h, 500, generator=_g(7))
    torch.testing.assert_close(rows, (up - down) / (2 * h), rtol=1e-6, atol=1e-6)


def test_loops_and_draws_of_a_vector_parameter():
    # one Bernoulli vector per step; the cost couples coordinates and steps
    def program(t):
        total = torch.zeros((), dtype=t.dtype)
        for _ in range(4):
            bits = sad.bernoulli(torch.stack([t, 1 - t, t * t]))
            total = total + bits[0] * bits[1] + bits[2] * total
        return total

    def exact(t):
        total = torch.zeros((), dtype=t.dtype)
        for _ in range(4):  # fresh bits each step: E[new] = t (1 - t) + E[total] (1 + t^2)
            total = t * (1 - t) + total * (1 + t * t)
        return total

    rows = sad.derivative_estimates(
        program, torch.tensor(0.3, dtype=torch.float64), N, generator=_g(8)
    )
    assert_unbiased(rows, _grad(exact, 0.3))


# -- the smoothed variant and the score function ------------------------------------------------


def test_smoothing_is_exact_for_a_linear_program_and_biased_otherwise():
    theta = torch.tensor(2.0, dtype=torch.float64)
    linear = sad.derivative_estimates(
        lambda t: 3 * sad.poisson(t) + t, theta, N, strategy="smooth", generator=_g(9)
    )
    assert_unbiased(linear, 4.0)
    square = sad.derivative_estimates(
        lambda t: sad.poisson(t) ** 2, theta, N, strategy="smooth", generator=_g(9)
    )
    # the smoothed derivative of x^2 is 2 x dx with E[dx] = 1: 2 lambda, not 1 + 2 lambda
    assert_unbiased(square, 2 * 2.0)


@pytest.mark.parametrize("baseline", ["leave_one_out", None])
def test_score_function_of_the_same_program_is_unbiased(baseline):
    program, theta, expected = CLOSED_FORMS["bernoulli-selects-poisson"]
    rows = sad.score_function_estimates(
        program, torch.tensor(theta, dtype=torch.float64), N, baseline=baseline, generator=_g(10)
    )
    assert_unbiased(rows, _grad(expected, theta))
    walk = sad.score_function_estimates(
        lambda s: programs.random_walk(s, 10),
        torch.tensor(20.0, dtype=torch.float64),
        N,
        baseline=baseline,
        generator=_g(11),
    )
    assert_unbiased(walk, programs.random_walk_exact(20.0, 10)[1])


def test_score_function_includes_the_direct_dependence_on_theta():
    theta = torch.tensor([0.5, 1.5], dtype=torch.float64)
    rows = sad.score_function_estimates(
        lambda t: t[1] * sad.poisson(t[0]) + t[1] ** 2, theta, N, generator=_g(12)
    )
    assert_unbiased(rows, torch.tensor([1.5, 0.5 + 3.0], dtype=torch.float64))


def test_the_same_generator_state_gives_the_same_draws_and_estimates():
    program = CLOSED_FORMS["bernoulli-selects-poisson"][0]
    theta = torch.tensor(0.4)
    before = torch.get_rng_state()
    a = sad.derivative_estimates(program, theta, 200, generator=_g(13))
    b = sad.derivative_estimates(program, theta, 200, generator=_g(13))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), before)
    draws = [sad.program_values(program, theta, 200, generator=_g(13)) for _ in range(2)]
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    # the score function sees the same draws: its value-free part is the same run's
    sf = sad.score_function_estimates(lambda t: sad.poisson(3.0) * t, theta, 50, generator=_g(14))
    values = sad.program_values(lambda t: sad.poisson(3.0) * t, theta, 50, generator=_g(14))
    torch.testing.assert_close(sf, values / theta, rtol=1e-6, atol=1e-6)


def test_estimates_keep_the_dtype_of_theta():
    for dtype in (torch.float32, torch.float64):
        theta = torch.tensor([1.0, 2.0], dtype=dtype)
        program = lambda t: sad.poisson(t).sum()  # noqa: E731
        assert sad.derivative_estimates(program, theta, 4).dtype == dtype
        assert sad.score_function_estimates(program, theta, 4).dtype == dtype
        assert sad.program_values(program, theta, 4).dtype == dtype


# -- the samplers outside a program --------------------------------------------------------------


def test_samplers_outside_a_program_give_ordinary_samples():
    torch.manual_seed(0)
    p = torch.full((10_000,), 0.3)
    assert sad.bernoulli(p).mean().item() == pytest.approx(0.3, abs=0.02)
    assert sad.binomial(10, p).mean().item() == pytest.approx(3.0, abs=0.1)
    assert sad.geometric(p).mean().item() == pytest.approx(0.7 / 0.3, abs=0.15)
    assert sad.poisson(torch.full((10_000,), 2.0)).mean().item() == pytest.approx(2.0, abs=0.1)
    index = sad.categorical(torch.tensor([0.2, 0.8]).expand(10_000, 2))
    assert index.dtype == torch.long and index.float().mean().item() == pytest.approx(0.8, abs=0.02)


@pytest.mark.parametrize(
    ("sampler", "args", "message"),
    [
        (sad.bernoulli, (1.5,), r"bernoulli\(p\) needs probabilities in \[0, 1\]"),
        (sad.binomial, (5, -0.1), r"binomial\(n, p\) needs probabilities"),
        (sad.binomial, (2.5, 0.3), r"whole number of trials"),
        (sad.geometric, (0.0,), r"geometric\(p\) needs probabilities in \(0, 1\]"),
        (sad.poisson, (-1.0,), r"poisson\(rate\) needs finite rates >= 0"),
        (sad.categorical, (torch.tensor([0.0, 0.0]),), "table of zeros"),
        (sad.categorical, (torch.tensor([-0.5, 1.5]),), r"needs probabilities in \[0, 1\]"),
    ],
)
def test_bad_parameters_are_refused_inside_and_outside_a_program(sampler, args, message):
    with pytest.raises(ValueError, match=message):
        sampler(*args)
    with pytest.raises(ValueError, match=message):
        sad.derivative_estimates(lambda t: sampler(*args) * t, torch.tensor(1.0), 3)


def test_probabilities_leaving_the_unit_interval_in_some_runs_are_refused():
    with pytest.raises(ValueError, match="bernoulli"):
        sad.derivative_estimates(
            lambda t: sad.bernoulli(t * (1 + sad.poisson(3.0))), torch.tensor(0.4), 200
        )


# -- what a program may not do -------------------------------------------------------------------


def _refused(program, match, theta=None):
    theta = torch.tensor(0.5) if theta is None else theta
    with pytest.raises(sad.UnsupportedOperation, match=match):
        sad.derivative_estimates(program, theta, 3)


def test_python_control_flow_on_a_run_value_is_refused_with_the_fix():
    _refused(lambda t: t if sad.bernoulli(t) else 2 * t, r"torch\.where")
    _refused(lambda t: t * int(sad.poisson(t)), r"int\(\)")
    _refused(lambda t: t * float(sad.poisson(t)), r"float\(\)")
    _refused(lambda t: t * sum(1.0 for _ in range(sad.poisson(t))), "index or range")
    _refused(lambda t: max(t, sad.poisson(t)), r"torch\.where")
    _refused(lambda t: t * sad.poisson(t).item(), "item would turn")
    _refused(lambda t: t.detach() * 2, "detach would turn")
    _refused(lambda t: sad.poisson(t).numpy(), "numpy would turn")
    _refused(lambda t: torch.tensor([t, t]).sum(), r"torch\.stack")
    _refused(lambda t: torch.as_tensor(t) * 2, r"torch\.stack")


def test_torch_samplers_inside_a_program_are_refused_with_the_replacement():
    _refused(
        lambda t: torch.poisson(t.expand(2)).sum(),
        r"random function poisson.*stochastic_ad\.poisson",
    )
    _refused(lambda t: torch.bernoulli(t), r"stochastic_ad\.bernoulli")
    _refused(lambda t: Poisson(t).sample(), "stochastic_ad's samplers")
    _refused(lambda t: t * torch.rand(()), r"random function rand\b")
    _refused(lambda t: t * torch.randn(()), "continuous draws are not supported")
    _refused(lambda t: torch.multinomial(torch.stack([t, 1 - t]), 1).sum() * 1.0, "categorical")
    _refused(
        lambda t: torch.distributions.Categorical(torch.stack([t, 1 - t])).sample() * t,
        "stochastic_ad.s samplers",
    )


def test_in_place_operations_are_refused():
    _refused(lambda t: t.add_(1), "in-place operation add_")
    buffer = torch.zeros(2)

    def assign(t):
        buffer[0] = t
        return buffer.sum()

    _refused(assign, "__setitem__ would turn")
    _refused(lambda t: torch.add(t, 1, out=torch.zeros(())), "in-place")


def test_an_operation_that_cannot_run_per_run_is_refused_by_name():
    _refused(lambda t: torch.nonzero(sad.poisson(t.expand(3))).sum() * t, "nonzero")


def test_a_triple_used_after_its_call_is_refused():
    kept = []
    sad.derivative_estimates(lambda t: kept.append(t) or t, torch.tensor(0.5), 2)
    with pytest.raises(sad.UnsupportedOperation, match="after its derivative_estimates call"):
        kept[0] + 1


def test_smoothing_refuses_a_categorical_draw():
    with pytest.raises(
        sad.UnsupportedOperation, match="strategy='smooth' cannot carry a categorical"
    ):
        sad.derivative_estimates(
            lambda t: TABLE.to(t.dtype)[sad.categorical(torch.stack([t, 1 - t]))],
            torch.tensor(0.5),
            3,
            strategy="smooth",
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"theta": torch.tensor(1)},
            TypeError,
            "floating-point torch.Tensor, got a tensor of dtype torch.int64",
        ),
        ({"theta": 0.5}, TypeError, "floating-point torch.Tensor, got float"),
        ({"num_samples": 0}, ValueError, "at least 1"),
        ({"num_samples": 2.0}, TypeError, "Python int"),
        ({"strategy": "exact"}, ValueError, STRATEGY_ERROR),
        ({"generator": 3}, TypeError, "torch.Generator"),
        ({"program": "poisson"}, TypeError, "program must be callable"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    args = {"program": lambda t: sad.poisson(t), "theta": torch.tensor(1.0), "num_samples": 3}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sad.derivative_estimates(
            args.pop("program"), args.pop("theta"), args.pop("num_samples"), **args
        )


def test_bad_outputs_are_refused():
    with pytest.raises(TypeError, match=r"one scalar per run, got shape \(2,\)"):
        sad.derivative_estimates(lambda t: sad.poisson(t.expand(2)), torch.tensor(1.0), 3)
    with pytest.raises(TypeError, match="one scalar per run"):
        sad.derivative_estimates(lambda t: "cost", torch.tensor(1.0), 3)
    with pytest.raises(TypeError, match="returned a bool"):
        sad.derivative_estimates(lambda t: sad.poisson(t) > 1, torch.tensor(1.0), 3)
    with pytest.raises(ValueError, match="another run"):
        sad.score_function_estimates(lambda t: sad.poisson(t), torch.tensor(1.0), 1)
    with pytest.raises(ValueError, match="baseline must be"):
        sad.score_function_estimates(lambda t: sad.poisson(t), torch.tensor(1.0), 3, baseline="ema")


def test_a_program_that_ignores_theta_has_zero_derivative():
    rows = sad.derivative_estimates(lambda t: sad.poisson(3.0) * 2.0, torch.tensor(1.0), 10)
    assert torch.equal(rows, torch.zeros(10))
    assert torch.equal(
        sad.derivative_estimates(lambda t: 1.5, torch.tensor(1.0), 4), torch.zeros(4)
    )


# -- the registered one-draw estimator -------------------------------------------------------------


def test_registered_estimator_trains_through_expectation():
    rate = torch.tensor([1.5, 4.0], dtype=torch.float64, requires_grad=True)
    value = gk.expectation(
        lambda x: (x**2).sum(-1), Poisson(rate), N, estimator="stochastic_ad", generator=_g(15)
    )
    value.backward()
    rows = gk.ESTIMATORS["stochastic_ad"](
        lambda x: (x**2).sum(-1), Poisson(rate), N, generator=_g(15)
    )["rate"]
    torch.testing.assert_close(rate.grad, rows.mean(0))
    assert_unbiased(rows, 1 + 2 * rate.detach())


def test_registered_estimator_matches_the_program_version_on_one_draw():
    # the same derivative two ways: one draw from torch's Binomial, one program draw
    probs = torch.tensor(0.3, dtype=torch.float64)
    rows = gk.ESTIMATORS["stochastic_ad"](
        lambda x: x**2, torch.distributions.Binomial(10, probs), N, generator=_g(16)
    )
    program = sad.derivative_estimates(
        lambda t: sad.binomial(10, t) ** 2, probs, N, generator=_g(17)
    )
    exact = 10 * (1 - 2 * 0.3) + 200 * 0.3
    assert_unbiased(rows["probs"], exact)
    assert_unbiased(program, exact)
    assert rows["probs"].var().item() == pytest.approx(program.var().item(), rel=0.1)


def test_registered_estimator_refuses_continuous_distributions():
    with pytest.raises(ValueError, match="stochastic_ad estimator supports Bernoulli"):
        gk.ESTIMATORS["stochastic_ad"](lambda x: x, Normal(torch.tensor(0.0), 1.0), 4)


def test_single_draw_table_and_variance_by_length_are_unbiased():
    table = studies.single_draw_table(num_samples=4000, generator=_g(18))
    unbiased = table[~table.estimator.str.contains("biased")]
    assert (unbiased.z.abs() < 4.5).all(), unbiased
    assert set(table.estimator) == {
        "stochastic_ad",
        "stochastic_ad (smooth, biased)",
        "score_function (LOO)",
        "measure_valued",
    }
    walk = studies.variance_by_length([5, 10], num_samples=4000, generator=_g(19))
    assert (walk[walk.estimator == "stochastic_ad"].z.abs() < 4.5).all()
    assert math.isclose(walk.theta.iloc[0], 10.0)


# -- edges: empty categories, parameters at the end of their range, numbers of trials ----------


def test_a_jump_passes_over_an_empty_category():
    table = torch.tensor([0.0, 10.0, 1.0], dtype=torch.float64)
    rows = sad.derivative_estimates(
        lambda t: table[sad.categorical(torch.stack([t, 0 * t, 1 - t]))],
        torch.tensor(0.4, dtype=torch.float64),
        N,
        generator=_g(20),
    )
    assert_unbiased(rows, -1.0)  # d/dt (0 t + 1 (1 - t))


def test_an_empty_category_whose_probability_moves_is_refused():
    with pytest.raises(ValueError, match="probability 0 while its probability changes"):
        sad.derivative_estimates(
            lambda t: sad.categorical(torch.stack([t, t - 0.4, 1.4 - 2 * t])).double(),
            torch.tensor(0.4, dtype=torch.float64),
            3,
        )
    with pytest.raises(ValueError, match="probability 0 while its probability changes"):
        gk.ESTIMATORS["stochastic_ad"](
            lambda x: x.double(), torch.distributions.Categorical(torch.tensor([0.4, 0.0, 0.6])), 3
        )


def test_categorical_probabilities_are_normalised_as_torch_does():
    # E[index] = 0.7 / (t + 0.7): d/dt = -0.7 / (t + 0.7)^2 = -0.7 at t = 0.3
    rows = sad.derivative_estimates(
        lambda t: sad.categorical(torch.stack([t, 0.7 + 0 * t])).double(),
        torch.tensor(0.3, dtype=torch.float64),
        N,
        generator=_g(21),
    )
    assert_unbiased(rows, -0.7)


EDGES = {
    # parameter at the end of its range: the derivative from inside
    "bernoulli-at-1": (lambda t: 3 * sad.bernoulli(t.clamp(0, 1)) + 1, 1.0, 3.0),
    "bernoulli-at-0": (lambda t: 3 * sad.bernoulli(t.clamp(0, 1)) + 1, 0.0, 3.0),
    "geometric-at-1": (lambda t: sad.geometric(t), 1.0, -1.0),
    "binomial-at-1": (lambda t: sad.binomial(5, t) ** 2, 1.0, 5 - 10 + 50),
    "binomial-at-0": (lambda t: sad.binomial(5, t) ** 2, 0.0, 5.0),
    "poisson-at-0": (lambda t: sad.poisson(t) ** 2, 0.0, 1.0),
}


@pytest.mark.parametrize("strategy", ["prune", "smooth"])
@pytest.mark.parametrize("name", sorted(EDGES))
def test_parameters_at_the_end_of_their_range(name, strategy):
    program, theta, exact = EDGES[name]
    if strategy == "smooth" and name.startswith("binomial"):
        exact = {"binomial-at-1": 50.0, "binomial-at-0": 0.0}[name]  # linearised: 2 E[x] dx
    if strategy == "smooth" and name == "poisson-at-0":
        exact = 0.0
    rows = sad.derivative_estimates(
        program, torch.tensor(theta, dtype=torch.float64), 2000, strategy=strategy, generator=_g(22)
    )
    assert torch.isfinite(rows).all()
    assert_unbiased(rows, exact, atol=1e-9)


def test_registered_estimator_at_the_end_of_the_range():
    rows = gk.ESTIMATORS["stochastic_ad"](
        lambda x: 3 * x + 1, torch.distributions.Bernoulli(torch.tensor(1.0)), 100
    )
    torch.testing.assert_close(rows["probs"], torch.full((100,), 3.0))
    rows = gk.ESTIMATORS["stochastic_ad"](
        lambda x: x, torch.distributions.Geometric(torch.tensor(1.0)), 100
    )
    torch.testing.assert_close(rows["probs"], torch.full((100,), -1.0))


def test_numbers_of_trials_that_move_continuously_are_refused_and_smoothed():
    with pytest.raises(sad.UnsupportedOperation, match="number of trials changes continuously"):
        sad.derivative_estimates(lambda t: sad.binomial(10 * t, 0.5), torch.tensor(1.0), 3)
    # smoothing carries the trials' derivative: E = 3 t / 2 is linear in the draws
    rows = sad.derivative_estimates(
        lambda t: sad.binomial(sad.poisson(3 * t), 0.5),
        torch.tensor(1.0, dtype=torch.float64),
        N,
        strategy="smooth",
        generator=_g(23),
    )
    assert_unbiased(rows, 1.5)


def test_mixed_dtypes_promote_as_torch_does():
    w32 = torch.ones(3, dtype=torch.float32)
    rows = sad.derivative_estimates(
        lambda t: ((t * w32) @ w32).double(), torch.tensor(0.3, dtype=torch.float64), 4
    )
    torch.testing.assert_close(rows, torch.full((4,), 3.0, dtype=torch.float64))
    seen = []
    sad.derivative_estimates(
        lambda t: seen.append((t * w32).dtype) or t, torch.tensor(0.3, dtype=torch.float64), 2
    )
    assert seen == [torch.float32]


def test_more_refusals_with_their_fixes():
    with pytest.raises(ValueError, match="needs a last dimension of categories"):
        sad.derivative_estimates(lambda t: sad.categorical(t).double(), torch.tensor(0.5), 3)
    with pytest.raises(sad.UnsupportedOperation, match="cannot run inside a program"):
        sad.derivative_estimates(
            lambda t: sad.derivative_estimates(lambda s: s, torch.tensor(1.0), 2).sum() * t,
            torch.tensor(0.5),
            3,
        )
    with pytest.raises(ValueError, match="theta has no elements"):
        sad.derivative_estimates(lambda t: t.sum(), torch.zeros(0), 3)
    rows = sad.derivative_estimates(lambda t: round(t * 3.0) + t, torch.tensor(0.5), 3)
    torch.testing.assert_close(rows, torch.ones(3))
    with pytest.raises(AttributeError):
        sad.derivative_estimates(lambda t: t.primal, torch.tensor(0.5), 3)
