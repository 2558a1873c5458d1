"""The estimator registry: registration, options, families, a user's estimator end to end."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal, Poisson

import gradkit as gk
from gradkit import registry
from tests.stats import assert_unbiased


@pytest.fixture
def scratch_names():
    """Registered names a test adds are removed afterwards."""
    before = set(gk.ESTIMATORS)
    yield
    for name in set(gk.ESTIMATORS) - before:
        del gk.ESTIMATORS[name]


def _reinforce(problem, *, scale=1.0):
    """A user's REINFORCE: scale * f(x) * score, through the engine's per-sample gradients."""
    weights = problem.broadcast(scale * problem.signal)
    x = problem.x
    return problem.per_sample_gradients(lambda d: weights * d.log_prob(x))


def test_a_user_estimator_works_everywhere(scratch_names):
    gk.register_estimator("user_reinforce", families=(Bernoulli, Poisson))(_reinforce)
    est = gk.ESTIMATORS["user_reinforce"]
    assert est.options == ("scale",) and not est.biased
    assert est.families == (Bernoulli, Poisson)
    probs = torch.tensor([0.2, 0.7])
    # per-sample interface, coupled cost: d/dp_i E[z0 z1 + z] = p_{other} + 1
    rows = est(lambda z: z[..., 0] * z[..., 1] + z.sum(-1), Bernoulli(probs), 50_000)
    assert_unbiased(rows["probs"], torch.tensor([1.7, 1.2]))
    # through expectation, with its option and a declared plate
    leaf = probs.clone().requires_grad_()
    value = gk.expectation(
        lambda z: 3 * z, Bernoulli(leaf), 40_000, estimator="user_reinforce", plate=True, scale=1.0
    )
    value.sum().backward()
    torch.testing.assert_close(leaf.grad, torch.full((2,), 3.0), atol=0.1, rtol=0)


def test_duplicate_names_are_refused_unless_replaced(scratch_names):
    gk.register_estimator("user_twice")(_reinforce)
    with pytest.raises(ValueError, match="registered already.*replace=True"):
        gk.register_estimator("user_twice")(_reinforce)
    gk.register_estimator("user_twice", replace=True, biased=True)(_reinforce)
    assert gk.ESTIMATORS["user_twice"].biased
    with pytest.raises(ValueError, match="registered already"):
        gk.register_estimator("score_function")(_reinforce)


def test_registration_errors():
    with pytest.raises(ValueError, match="identifier"):
        gk.register_estimator("not a name")
    with pytest.raises(TypeError, match="Distribution subclasses"):
        gk.register_estimator("user_bad", families=(int,))
    with pytest.raises(TypeError, match="decorates a function"):
        gk.register_estimator("user_bad")(3)
    assert "user_bad" not in gk.ESTIMATORS


def test_unknown_estimator_and_options_name_what_exists():
    d = Normal(torch.tensor(0.0, requires_grad=True), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"unknown estimator 'nope'; registered: \["):
        gk.expectation(lambda x: x, d, 4, estimator="nope")
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['baseline'\].*'generator'"):
        gk.expectation(lambda x: x, d, 4, estimator="pathwise", baseline=0.0)
    with pytest.raises(TypeError, match=r"\['coupling', 'wrt', 'control_variate'"):
        gk.measure_valued(lambda x: x, d, 4, temperature=1.0)


def test_families_are_enforced_with_a_list(scratch_names):
    gk.register_estimator("user_families", families=(Bernoulli, Poisson))(_reinforce)
    with pytest.raises(ValueError, match="supports Bernoulli, Poisson, got Normal"):
        gk.ESTIMATORS["user_families"](lambda x: x, Normal(0.0, 1.0), 4)
    with pytest.raises(ValueError, match="relaxes Categorical, OneHotCategorical and Bernoulli"):
        gk.ESTIMATORS["gumbel_softmax"](lambda x: x, Normal(0.0, 1.0), 4)


def test_plate_hint_is_issued_once_and_can_be_filtered():
    registry._hinted.discard("score_function")
    d = Normal(torch.zeros(3), torch.ones(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gk.score_function(lambda x: x**2, d, 4)
        gk.score_function(lambda x: x**2, d, 4)
        gk.score_function(lambda x: x**2, d, 4, plate=True)
    hints = [w for w in caught if issubclass(w.category, gk.PlateHint)]
    assert len(hints) == 1
    assert "plate=True" in str(hints[0].message)
    assert hints[0].filename == __file__  # points at the caller, not at gradkit


def test_plate_errors_name_both_shapes():
    d = Normal(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"\(S, 3\).*returned \(S,\)"):
        gk.score_function(lambda x: x.sum(-1), d, 4, plate=True)
    with pytest.raises(TypeError, match="plate must be True or False"):
        gk.pathwise(lambda x: x, d, 4, plate="yes")


def test_generator_errors():
    d = Normal(torch.zeros(3), torch.ones(3))
    with pytest.raises(TypeError, match="torch.Generator"):
        gk.pathwise(lambda x: x, d, 4, generator=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_on_another_device_is_refused():
    d = Normal(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="generator is on cuda"):
        gk.pathwise(lambda x: x, d, 4, generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize("name", ["score_function", "pathwise", "measure_valued"])
def test_common_random_numbers_and_an_untouched_global_stream(name):
    d = Normal(torch.tensor([0.3, -1.0]), torch.tensor([1.0, 2.0]))
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    first = gk.ESTIMATORS[name](torch.sin, d, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.rand(3), expected_next)  # the global stream is untouched
    again = gk.ESTIMATORS[name](torch.sin, d, 16, generator=torch.Generator().manual_seed(2))
    for key in first:
        assert torch.equal(first[key], again[key])
    other = gk.ESTIMATORS[name](torch.sin, d, 16, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(first["loc"], other["loc"])


def test_forward_samples_are_shared_across_estimators():
    d = Normal(torch.tensor([0.3, -1.0]), torch.tensor([1.0, 2.0]))
    seen = {}
    for name in ("score_function", "pathwise", "measure_valued"):

        def f(x, name=name):
            seen.setdefault(name, x.detach().clone())
            return x**2

        gk.ESTIMATORS[name](f, d, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(seen["score_function"], seen["pathwise"])
    assert torch.equal(seen["score_function"], seen["measure_valued"])


@pytest.mark.parametrize("outer", ["score_function", "pathwise", "measure_valued"])
def test_nested_expectations(outer):
    # E_x[E_y[(y - x)^2]] with y ~ N(x, 1), x ~ N(mu, 1): = 1 for every mu, so d/dmu = 0,
    # while E_x[E_y[y^2]] = mu^2 + 2 has d/dmu = 2 mu.
    mu = torch.tensor(0.7, requires_grad=True)

    def inner(x):
        return gk.expectation(lambda y: y**2, Normal(x, torch.ones_like(x)), 64, plate=True)

    value = gk.expectation(inner, Normal(mu, torch.tensor(1.0)), 4000, estimator=outer)
    value.backward()
    assert abs(mu.grad.item() - 1.4) < 0.25


def test_rao_blackwell_value_is_the_matching_estimate():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    table = torch.tensor([1.0, -2.0, 0.5, 3.0])
    d = Categorical(logits=logits)
    value = gk.expectation(lambda z: table[z], d, 8, estimator="rao_blackwell", num_summed=4)
    torch.testing.assert_close(value, (d.probs * table).sum())
