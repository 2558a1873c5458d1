"""The conformance matrix: every registered estimator, every family it accepts, both plates.

Each case is a distribution with a cost whose expected gradient is known in closed form (or by
enumeration), in two variants: a *coupled* cost, whose outputs mix batch elements (the case an
estimator that guessed independence from output shapes got wrong), run with the default
``plate=False``; and a *plate* cost, one value per batch element depending on that element only,
run with ``plate=True``. Every unbiased estimator must match the exact gradient within
``tests.stats.Z`` standard errors, in float32 and float64 (and on CUDA when present); through
``gk.expectation`` the same generator state must give exactly the mean of the per-sample rows.
Estimators that are biased by design are checked for shapes, dtypes and their ``biased`` flag.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Binomial,
    Categorical,
    Distribution,
    Exponential,
    Gamma,
    Geometric,
    Independent,
    Laplace,
    Normal,
    OneHotCategorical,
    Poisson,
)

import gradkit as gk
from tests.stats import assert_unbiased, z_scores

pytestmark = pytest.mark.filterwarnings("ignore::gradkit.PlateHint")

BUILT_IN = (
    "score_function",
    "pathwise",
    "measure_valued",
    "implicit_pathwise",
    "rao_blackwell",
    "gumbel_softmax",
    "straight_through_gumbel",
    "arm",
    "disarm",
    "straight_through",
    "enumerate",
    "indecater",
    "gumbel_rao",
    "rebar",
    "relax",
    "stochastic_ad",
)
NUM_SAMPLES = 20_000
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@dataclass(frozen=True)
class Case:
    """A distribution factory, a cost and its exact expected gradient (float64)."""

    name: str
    params: dict[str, list]  # parameter values (float64 lists)
    build: Callable[..., Distribution]
    cost: Callable[[Tensor], Tensor]
    exact: Callable[..., dict[str, Tensor]]
    plate: bool
    options: dict | None = None

    def dist(self, dtype: torch.dtype, device: str) -> Distribution:
        values = {k: torch.tensor(v, dtype=dtype, device=device) for k, v in self.params.items()}
        return self.build(**values)

    def exact_gradient(self) -> dict[str, Tensor]:
        values = {k: torch.tensor(v, dtype=torch.float64) for k, v in self.params.items()}
        return self.exact(**values)


def _autograd_exact(expected: Callable[..., Tensor]) -> Callable[..., dict[str, Tensor]]:
    """Exact gradients by autograd through a closed-form expectation."""

    def exact(**values: Tensor) -> dict[str, Tensor]:
        leaves = {k: v.clone().requires_grad_() for k, v in values.items()}
        grads = torch.autograd.grad(expected(**leaves), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True))

    return exact


MU, SD = [0.3, -0.2, 0.5], [1.0, 0.7, 1.2]
LOGITS = [0.4, -1.1, 0.7]
TABLE = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.5, 3.0, -1.0, 2.0]], dtype=torch.float64)
PAIR = torch.tensor(
    [[1.0, -2.0, 0.5, 3.0], [0.5, 3.0, -1.0, 2.0], [2.0, 0.0, 1.0, -1.5], [-1.0, 1.0, 0.0, 2.5]],
    dtype=torch.float64,
)


def _independent_categorical_expected(logits: Tensor, centre: float = 1.5) -> Tensor:
    """E[sum_i (z_i - centre)^2 + z_0 z_1] for independent categoricals over 0..K-1."""
    p = logits.softmax(-1)
    values = torch.arange(p.shape[-1], dtype=p.dtype)
    squares = (p * (values - centre) ** 2).sum()
    means = (p * values).sum(-1)
    return squares + means[0] * means[1]


def _categorical_pair_expected(logits: Tensor) -> Tensor:
    p = logits.softmax(-1)
    return (p[0][:, None] * p[1][None, :] * PAIR).sum()


CASES = [
    Case(
        "normal-coupled",
        {"loc": MU, "scale": SD},
        Normal,
        lambda x: x * x.roll(-1, -1) + x**2,  # outputs (S, 3) that mix neighbours
        _autograd_exact(lambda loc, scale: (loc * loc.roll(-1, -1) + loc**2 + scale**2).sum()),
        plate=False,
    ),
    Case(
        "normal-plate",
        {"loc": MU, "scale": SD},
        Normal,
        lambda x: x**2 + x,
        _autograd_exact(lambda loc, scale: (loc**2 + scale**2 + loc).sum()),
        plate=True,
    ),
    Case(
        "bernoulli-coupled",
        {"logits": LOGITS},
        lambda logits: Bernoulli(logits=logits),
        lambda z: z * z.roll(-1, -1) + z,
        _autograd_exact(
            lambda logits: (lambda p: (p * p.roll(-1, -1) + p).sum())(logits.sigmoid())
        ),
        plate=False,
    ),
    Case(
        "bernoulli-probs-plate",
        {"probs": [0.2, 0.55, 0.9]},
        lambda probs: Bernoulli(probs=probs),
        lambda z: (z - 0.45) ** 2,
        _autograd_exact(lambda probs: (probs * 0.55**2 + (1 - probs) * 0.45**2).sum()),
        plate=True,
    ),
    Case(
        "categorical-coupled",
        {"logits": [[0.3, -0.5, 1.0, 0.0], [0.2, 0.1, -1.0, 0.6]]},
        lambda logits: Categorical(logits=logits),
        lambda z: PAIR[z[..., 0], z[..., 1]],  # couples the pair
        _autograd_exact(_categorical_pair_expected),
        plate=False,
    ),
    Case(
        "categorical-plate",
        {"logits": [[0.3, -0.5, 1.0, 0.0], [0.2, 0.1, -1.0, 0.6]]},
        lambda logits: Categorical(logits=logits),
        lambda z: TABLE[torch.arange(2), z],
        _autograd_exact(lambda logits: (logits.softmax(-1) * TABLE).sum()),
        plate=True,
    ),
    Case(
        "categorical-single",
        {"logits": [0.3, -0.5, 1.0, 0.0]},
        lambda logits: Categorical(logits=logits),
        lambda z: torch.stack([TABLE[0][z], TABLE[1][z]], -1),
        _autograd_exact(lambda logits: (logits.softmax(-1) * TABLE).sum()),
        plate=False,
    ),
    Case(
        "onehot-plate",
        {"logits": [[0.3, -0.5, 1.0, 0.0], [0.2, 0.1, -1.0, 0.6]]},
        lambda logits: OneHotCategorical(logits=logits),
        lambda y: (y * TABLE.to(y.dtype)).sum(-1),
        _autograd_exact(lambda logits: (logits.softmax(-1) * TABLE).sum()),
        plate=True,
    ),
    Case(
        "independent-categorical-coupled",
        {"logits": [[0.3, -0.5, 1.0, 0.0], [0.2, 0.1, -1.0, 0.6], [1.0, 0.0, 0.0, -1.0]]},
        lambda logits: Independent(Categorical(logits=logits), 1),
        lambda z: ((z - 1.5) ** 2).sum(-1) + z[..., 0] * z[..., 1],
        _autograd_exact(lambda logits: _independent_categorical_expected(logits)),
        plate=False,
    ),
    Case(
        "independent-categorical-plate",
        {"logits": [[[0.3, -0.5, 1.0], [0.2, 0.1, -1.0]], [[1.0, 0.0, -1.0], [0.0, 0.5, 0.5]]]},
        lambda logits: Independent(Categorical(logits=logits), 1),
        lambda z: ((z - 1.0) ** 2).sum(-1) + z[..., 0] * z[..., 1],
        _autograd_exact(
            lambda logits: sum(
                _independent_categorical_expected(logits[b], centre=1.0) for b in range(2)
            )
        ),
        plate=True,
    ),
    Case(
        "poisson-coupled",
        {"rate": [1.5, 0.7]},
        Poisson,
        lambda x: x[..., 0] * x[..., 1] + x[..., 0] ** 2,
        _autograd_exact(lambda rate: rate[0] * rate[1] + rate[0] + rate[0] ** 2),
        plate=False,
    ),
    Case(
        "binomial-plate",
        {"probs": [0.3, 0.75]},
        lambda probs: Binomial(
            torch.tensor([4.0, 6.0], dtype=probs.dtype, device=probs.device), probs
        ),
        lambda x: x**2,
        _autograd_exact(
            lambda probs: (
                torch.tensor([4.0, 6.0]) * probs * (1 - probs)
                + (torch.tensor([4.0, 6.0]) * probs) ** 2
            ).sum()
        ),
        plate=True,
    ),
    Case(
        "geometric-coupled",
        {"probs": [0.4, 0.7]},
        Geometric,
        lambda x: x[..., 0] * x[..., 1] + x[..., 0].clamp(max=2.0),
        _autograd_exact(
            lambda probs: ((1 - probs) / probs).prod() + (1 - probs[0]) + (1 - probs[0]) ** 2
        ),
        plate=False,
    ),
    Case(
        "exponential-plate",
        {"rate": [1.5, 0.8]},
        Exponential,
        lambda x: x**2,
        _autograd_exact(lambda rate: (2.0 / rate**2).sum()),
        plate=True,
    ),
    Case(
        "gamma-coupled",
        {"concentration": [2.5, 1.5], "rate": [1.2, 2.0]},
        Gamma,
        lambda x: x[..., 0] * x[..., 1],
        _autograd_exact(lambda concentration, rate: (concentration / rate).prod()),
        plate=False,
        options={"measure_valued": {"wrt": ["rate"]}},
    ),
    Case(
        "independent-normal-coupled",
        {"loc": [[0.3, -0.2, 0.5], [1.0, 0.1, -0.4]], "scale": [[1.0, 0.7, 1.2], [0.5, 0.9, 1.1]]},
        lambda loc, scale: Independent(Normal(loc, scale), 1),
        lambda x: (x**2).sum((-1, -2)) + x[..., 0, 0] * x[..., 1, 2],
        _autograd_exact(lambda loc, scale: (loc**2 + scale**2).sum() + loc[0, 0] * loc[1, 2]),
        plate=False,
    ),
    Case(
        "independent-normal-plate",
        {"loc": [[0.3, -0.2, 0.5], [1.0, 0.1, -0.4]], "scale": [[1.0, 0.7, 1.2], [0.5, 0.9, 1.1]]},
        lambda loc, scale: Independent(Normal(loc, scale), 1),
        lambda x: (x**2).sum(-1) + x[..., 0] * x[..., 1],
        _autograd_exact(
            lambda loc, scale: (loc**2 + scale**2).sum() + (loc[:, 0] * loc[:, 1]).sum()
        ),
        plate=True,
    ),
]


def _options(name: str, case: Case) -> dict:
    options = dict((case.options or {}).get(name, {}))
    if name == "rao_blackwell":
        options.setdefault("num_summed", 1)
    return options


def _accepts(name: str, case: Case) -> bool:
    """Whether the estimator takes the case (it refuses others with a ValueError)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gk.PlateHint)
            gk.ESTIMATORS[name](
                case.cost,
                case.dist(torch.float64, "cpu"),
                4,
                plate=case.plate,
                generator=torch.Generator().manual_seed(0),
                **_options(name, case),
            )
    except (ValueError, TypeError) as err:
        # a refusal must say what the estimator needs, never a shape or NaN complaint
        assert "f returned" not in str(err), err
        return False
    except NotImplementedError:
        return False
    return True


MATRIX = [
    (name, case)
    for name, case in itertools.product(BUILT_IN, CASES)
    if not gk.ESTIMATORS[name].biased and _accepts(name, case)
]


def test_every_built_in_is_registered_with_its_properties():
    for name in BUILT_IN:
        est = gk.ESTIMATORS[name]
        assert est.name == name
        assert isinstance(est.biased, bool)
    assert {n for n in BUILT_IN if gk.ESTIMATORS[n].biased} == {
        "gumbel_softmax",
        "straight_through_gumbel",
        "straight_through",
        "gumbel_rao",
    }


def test_the_matrix_covers_every_estimator_and_both_plates():
    covered = {(name, case.plate) for name, case in MATRIX}
    for name in BUILT_IN:
        if gk.ESTIMATORS[name].biased:
            continue
        assert (name, True) in covered, name
        if name != "rao_blackwell":  # sums each categorical alone: a plate or a single one
            assert (name, False) in covered, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "case"), MATRIX, ids=[f"{n}-{c.name}" for n, c in MATRIX])
def test_unbiased_against_the_exact_gradient(name, case, dtype, device):
    dist = case.dist(dtype, device)
    generator = torch.Generator(device=device).manual_seed(1)
    rows = gk.ESTIMATORS[name](
        case.cost, dist, NUM_SAMPLES, plate=case.plate, generator=generator, **_options(name, case)
    )
    exact = case.exact_gradient()
    for key, value in rows.items():
        param = gk.distributions.parameters(dist)[key]
        assert value.dtype == dtype and value.device.type == device
        assert value.shape[1:] == param.shape
        rounding = 20 * torch.finfo(dtype).eps * (1 + float(exact[key].abs().max()))
        if value.shape[0] == 1:  # an exact estimator (enumeration) returns its one row
            torch.testing.assert_close(
                value[0].cpu().double(), exact[key], rtol=0, atol=100 * rounding
            )
        else:
            assert_unbiased(value.cpu(), exact[key], atol=rounding)
    assert set(rows) >= set(exact) - {"concentration"}


@pytest.mark.parametrize(("name", "case"), MATRIX, ids=[f"{n}-{c.name}" for n, c in MATRIX])
def test_expectation_gives_the_mean_of_the_rows(name, case):
    options = _options(name, case)
    rows = gk.ESTIMATORS[name](
        case.cost,
        case.dist(torch.float64, "cpu"),
        500,
        plate=case.plate,
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    leaves = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in case.params.items()
    }
    dist = case.build(**leaves)
    params = gk.distributions.parameters(dist)
    value = gk.expectation(
        case.cost,
        dist,
        500,
        estimator=name,
        plate=case.plate,
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    value.sum().backward(retain_graph=True)
    for key, r in rows.items():
        # compared at the leaf the distribution was built from: torch stores Categorical logits
        # normalised, and any representative of the same distribution is a valid input there
        (expected,) = torch.autograd.grad(params[key], leaves[key], r.mean(0), retain_graph=True)
        assert leaves[key].grad is not None, key
        torch.testing.assert_close(leaves[key].grad, expected, rtol=1e-6, atol=1e-8)


BIASED = [
    (name, case)
    for name in BUILT_IN
    if gk.ESTIMATORS[name].biased
    for case in ("bernoulli-coupled", "categorical-plate", "onehot-plate")
    if not (name in ("straight_through", "gumbel_rao") and case == "categorical-plate")
]


@pytest.mark.parametrize(("name", "case"), BIASED)
def test_biased_estimators_run_with_the_right_shapes(name, case):
    chosen = next(c for c in CASES if c.name == case)
    dist = chosen.dist(torch.float32, "cpu")

    def relaxed_cost(y: Tensor) -> Tensor:  # defined on relaxed points
        if isinstance(dist, Bernoulli):
            return y * y.roll(-1, -1) + y
        return (y * TABLE.to(y.dtype)).sum(-1)

    options = {} if name == "straight_through" else {"temperature": 0.5}
    rows = gk.ESTIMATORS[name](relaxed_cost, dist, 64, plate=chosen.plate, **options)
    (key,) = rows
    assert rows[key].shape == (64, *gk.distributions.parameters(dist)[key].shape)
    assert bool(torch.isfinite(rows[key]).all())


CLOSED_FORM = [
    Normal(torch.tensor([0.3, -1.0]), torch.tensor([1.2, 0.4])),
    Bernoulli(logits=torch.tensor([0.3, -1.0])),
    Bernoulli(probs=torch.tensor([0.3, 0.8])),
    Categorical(logits=torch.tensor([[0.3, -1.0, 2.0], [0.0, 0.5, -0.5]])),
    Poisson(torch.tensor([1.5, 0.2])),
    Exponential(torch.tensor([1.5, 0.2])),
    Gamma(torch.tensor([2.5, 0.7]), torch.tensor([1.5, 3.0])),
    Laplace(torch.tensor([0.3, -1.0]), torch.tensor([1.2, 0.4])),
    Independent(Normal(torch.zeros(2, 3), torch.ones(2, 3)), 1),
]


@pytest.mark.parametrize("dist", CLOSED_FORM, ids=lambda d: type(d).__name__)
def test_closed_form_scores_match_autograd(dist):
    from gradkit import _engine

    resolved = _engine.resolve(dist)
    x = dist.sample((7,))
    names = list(resolved.params)
    closed = _engine.closed_form_scores(resolved, x, names)
    assert closed is not None, type(dist).__name__
    autograd = _engine.gradients(resolved, lambda d: _engine.log_prob(d, x), names, 7)
    for name in names:
        torch.testing.assert_close(closed[name], autograd[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in BUILT_IN if gk.ESTIMATORS[n].biased])
def test_biased_estimators_are_measurably_biased(name):
    # one Bernoulli with p = 0.8 and cost (z - 0.45)^2: exact d/dlogit = 0.1 p (1 - p) = 0.016,
    # while a relaxed or straight-through gradient follows f'(z) = 2 (z - 0.45) instead
    dist = Bernoulli(logits=torch.tensor(0.8, dtype=torch.float64).logit())
    options = {} if name == "straight_through" else {"temperature": 0.5}
    rows = gk.ESTIMATORS[name](
        lambda z: (z - 0.45) ** 2,
        dist,
        20_000,
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    assert float(z_scores(rows["logits"], 0.1 * 0.8 * 0.2)) > 10
