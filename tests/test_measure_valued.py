"""Tests for gradkit.weak_derivatives: the registry, every registered weak derivative, the engine.

Statistical tests compare the mean of per-sample estimates with exact gradients (closed forms
for continuous families, enumeration of the support for discrete ones, differentiated with
autograd through torch's own parameterisation) within ``tests.stats.Z`` standard errors, at the
seed fixed in conftest.py. Costs with one value per batch element that depends on that element
only declare it (``plate=True``); the default treats every output as coupled.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import scipy.stats
import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Distribution,
    Exponential,
    Gamma,
    Geometric,
    Independent,
    Laplace,
    Normal,
    Poisson,
    Uniform,
    Weibull,
    constraints,
)

import gradkit as gk
from gradkit import weak_derivatives
from gradkit.distributions import base_distribution, parameters, rebuild
from gradkit.weak_derivatives import WeakDerivative, _lookup, measure_valued_estimates
from tests.stats import Z, assert_unbiased

NUM = 20_000

# ------------------------------------------------------------------------------------------
# Distribution factories: every registered (type, parameter) pair, any batch shape and dtype.
# ------------------------------------------------------------------------------------------


def _uniform(lo: float, hi: float, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    gen = torch.Generator().manual_seed(1 + len(shape) + sum(shape))
    return (lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)


def _categorical_probs(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.softmax(_uniform(-1.0, 1.0, (*shape, 3), dtype), -1)


FAMILIES: dict[str, Callable[[tuple[int, ...], torch.dtype], Distribution]] = {
    "normal": lambda s, t: Normal(_uniform(-1, 1, s, t), _uniform(0.5, 1.5, s, t)),
    "laplace": lambda s, t: Laplace(_uniform(-1, 1, s, t), _uniform(0.5, 1.5, s, t)),
    "bernoulli_probs": lambda s, t: Bernoulli(probs=_uniform(0.2, 0.8, s, t)),
    "bernoulli_logits": lambda s, t: Bernoulli(logits=_uniform(-1, 1, s, t)),
    "binomial_probs": lambda s, t: Binomial(4, probs=_uniform(0.2, 0.8, s, t)),
    "binomial_logits": lambda s, t: Binomial(4, logits=_uniform(-1, 1, s, t)),
    "categorical_probs": lambda s, t: Categorical(probs=_categorical_probs(s, t)),
    "categorical_logits": lambda s, t: Categorical(logits=_categorical_probs(s, t).log()),
    "poisson": lambda s, t: Poisson(_uniform(1, 3, s, t)),
    "geometric_probs": lambda s, t: Geometric(probs=_uniform(0.3, 0.8, s, t)),
    "geometric_logits": lambda s, t: Geometric(logits=_uniform(-1, 1, s, t)),
    "exponential": lambda s, t: Exponential(_uniform(0.5, 2, s, t)),
    "gamma": lambda s, t: Gamma(_uniform(1, 3, s, t), _uniform(0.5, 2, s, t)),
    "uniform": lambda s, t: Uniform(_uniform(-1, -0.2, s, t), _uniform(0.5, 2, s, t)),
}
# Gamma's concentration has no weak derivative: estimate only its rate.
WRT = {"gamma": ["rate"], "weibull": ["scale"]}
SUPPORT = {
    "bernoulli_probs": 2,
    "bernoulli_logits": 2,
    "binomial_probs": 5,
    "binomial_logits": 5,
    "categorical_probs": 3,
    "categorical_logits": 3,
    "poisson": 60,
    "geometric_probs": 150,
    "geometric_logits": 150,
}


def _float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.float64)


COSTS: dict[str, Callable[[Tensor], Tensor]] = {
    "square": lambda x: (_float(x) - 0.3) ** 2,
    "cos": lambda x: torch.cos(_float(x)),
    "step": lambda x: (_float(x) > 0.5).to(_float(x).dtype),
    "exp": lambda x: torch.exp(-_float(x)),
}


def _phi(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))


# Closed forms of E[f] per element, as functions of a (rebuilt) distribution.
CLOSED_FORMS: dict[tuple[str, str], Callable[[Distribution], Tensor]] = {
    ("normal", "square"): lambda d: (d.loc - 0.3) ** 2 + d.scale**2,
    ("normal", "cos"): lambda d: torch.cos(d.loc) * torch.exp(-0.5 * d.scale**2),
    ("normal", "step"): lambda d: _phi((d.loc - 0.5) / d.scale),
    ("laplace", "square"): lambda d: (d.loc - 0.3) ** 2 + 2 * d.scale**2,
    ("laplace", "cos"): lambda d: torch.cos(d.loc) / (1 + d.scale**2),
    ("laplace", "step"): lambda d: torch.where(
        d.loc >= 0.5,
        1 - 0.5 * torch.exp(-(d.loc - 0.5) / d.scale),
        0.5 * torch.exp((d.loc - 0.5) / d.scale),
    ),
    ("exponential", "square"): lambda d: 2 / d.rate**2 - 0.6 / d.rate + 0.09,
    ("exponential", "cos"): lambda d: d.rate**2 / (d.rate**2 + 1),
    ("exponential", "step"): lambda d: torch.exp(-0.5 * d.rate),
    ("gamma", "square"): lambda d: (
        d.concentration * (d.concentration + 1) / d.rate**2 - 0.6 * d.concentration / d.rate + 0.09
    ),
    ("gamma", "exp"): lambda d: (d.rate / (d.rate + 1)) ** d.concentration,
    ("uniform", "square"): lambda d: (
        ((d.high - 0.3) ** 3 - (d.low - 0.3) ** 3) / (3 * (d.high - d.low))
    ),
    ("uniform", "cos"): lambda d: (torch.sin(d.high) - torch.sin(d.low)) / (d.high - d.low),
    ("uniform", "step"): lambda d: (d.high - 0.5) / (d.high - d.low),
}


def _enumerated(family: str, cost: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    def expectation(d: Distribution) -> Tensor:
        k = torch.arange(SUPPORT[family], dtype=torch.float64)
        if isinstance(d, Categorical):
            k = k.long()
        k = k.reshape(-1, *([1] * len(d.batch_shape))).expand(-1, *d.batch_shape)
        return (d.log_prob(k).exp() * cost(k).to(d.log_prob(k).dtype)).sum(0)

    return expectation


def _cases() -> list[tuple[str, str]]:
    cases = [(family, cost) for family, cost in CLOSED_FORMS]
    cases += [(family, cost) for family in SUPPORT for cost in ("square", "cos", "step")]
    return cases


def exact_grad(dist: Distribution, expect: Callable[[Distribution], Tensor]) -> dict[str, Tensor]:
    """Autograd of an exact expectation with respect to the stored parameter tensors."""
    leaves = {n: p.detach().clone().requires_grad_() for n, p in parameters(dist).items()}
    value = expect(rebuild(dist, leaves)).sum()
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return {
        n: torch.zeros_like(leaves[n]) if g is None else g
        for n, g in zip(leaves, grads, strict=True)
    }


def estimate(
    f: Callable[[Tensor], Tensor],
    dist: Distribution,
    n: int,
    coupling: bool,
    family: str,
    plate: bool = False,
) -> dict[str, Tensor]:
    # Sample from a rebuilt copy: gradkit.distributions.parameters cannot tell which of
    # Geometric's probs/logits it was built from once sampling has cached the other one.
    x = rebuild(dist, parameters(dist)).sample((n,))
    return measure_valued_estimates(f, dist, x, f(x), coupling, wrt=WRT.get(family), plate=plate)


def check(est: dict[str, Tensor], exact: dict[str, Tensor]) -> None:
    """Every estimated parameter within Z standard errors (float32 rounding: atol 1e-5).

    Estimates that are exact per sample (a Bernoulli's f(1) - f(0)) have zero variance and
    differ from the float64 reference by rounding only.
    """
    assert est, "no estimates"
    assert_unbiased(est, {name: exact[name] for name in est}, atol=1e-5)


@pytest.fixture
def registry_guard():
    """Restore the registry after a test that registers its own weak derivatives."""
    saved = dict(weak_derivatives._REGISTRY)
    yield
    weak_derivatives._REGISTRY.clear()
    weak_derivatives._REGISTRY.update(saved)


# ------------------------------------------------------------------------------------------
# Unbiasedness of every registered weak derivative.
# ------------------------------------------------------------------------------------------


BUILT_IN = {
    (Normal, "loc"),
    (Normal, "scale"),
    (Laplace, "loc"),
    (Laplace, "scale"),
    (Bernoulli, "probs"),
    (Bernoulli, "logits"),
    (Binomial, "probs"),
    (Binomial, "logits"),
    (Categorical, "probs"),
    (Categorical, "logits"),
    (Geometric, "probs"),
    (Geometric, "logits"),
    (Poisson, "rate"),
    (Exponential, "rate"),
    (Gamma, "rate"),
    (Uniform, "low"),
    (Uniform, "high"),
}


def test_every_registered_pair_is_tested():
    covered = set()
    for family in FAMILIES:
        base = FAMILIES[family]((1,), torch.float32)
        names = WRT.get(family, list(parameters(base)))
        covered |= {(type(base), name) for name in names}
    assert covered == BUILT_IN
    registered = set(gk.registered_weak_derivatives())
    assert BUILT_IN <= registered
    # the register_weak_derivative doctest adds Weibull scale when run in the same process
    assert registered - BUILT_IN <= {(Weibull, "scale")}


@pytest.mark.parametrize("coupling", [True, False])
@pytest.mark.parametrize(("family", "cost"), _cases())
def test_unbiased_per_element(family: str, cost: str, coupling: bool):
    """Batch (2,), elementwise cost, a declared plate: closed form or enumerated gradient."""
    dist = FAMILIES[family]((2,), torch.float32)
    f = COSTS[cost]
    expect = CLOSED_FORMS.get((family, cost)) or _enumerated(family, f)
    exact = exact_grad(dist, expect)
    check(estimate(f, dist, NUM, coupling, family, plate=True), exact)


def _mean_product(d: Distribution) -> Tensor:
    """E[x[..., 0] * x[..., 1]] over the last batch dim: the two coordinates interact."""
    base, _ = base_distribution(d)
    if isinstance(base, Categorical):  # P(x0 == x1)
        return (base.probs[..., 0, :] * base.probs[..., 1, :]).sum(-1)
    return base.mean[..., 0] * base.mean[..., 1]


def _product_cost(family: str) -> Callable[[Tensor], Tensor]:
    if family.startswith("categorical"):
        return lambda x: (x[..., 0] == x[..., 1]).to(torch.float32)
    return lambda x: x[..., 0] * x[..., 1]


LAYOUTS = ["coupled", "independent_plate", "independent_undeclared", "independent_coupled"]


def _layout(family: str, layout: str, dtype: torch.dtype = torch.float32):
    """A distribution, a cost in which coordinates interact, and whether it is a plate."""
    product = _product_cost(family)
    if layout == "coupled":  # batch (2,), f reduces over the batch: every element coupled
        return FAMILIES[family]((2,), dtype), product, False
    dist = Independent(FAMILIES[family]((3, 2), dtype), 1)
    if layout == "independent_plate":  # one value per batch element, declared
        return dist, product, True
    if layout == "independent_undeclared":  # the same cost, plate not declared: coupled
        return dist, product, False
    return dist, lambda x: product(x).sum(-1), False


@pytest.mark.parametrize("coupling", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.filterwarnings("ignore::gradkit.PlateHint")
def test_unbiased_with_interactions(family: str, layout: str, coupling: bool):
    dist, f, plate = _layout(family, layout)
    exact = exact_grad(dist, _mean_product)
    check(estimate(f, dist, NUM, coupling, family, plate), exact)


def test_through_public_estimator_for_categorical_probs():
    """gk.measure_valued differentiates through torch's normalisation of the probabilities,
    the same convention as gk.score_function: d/dpi_j E f = f(j) - E f at sum(pi) = 1."""
    dist = Categorical(probs=torch.tensor([0.2, 0.3, 0.5]))
    f = COSTS["square"]
    values = f(torch.arange(3))
    exact = (values - (dist.probs * values).sum()).to(torch.float32)
    check({"probs": gk.measure_valued(f, dist, NUM)["probs"]}, {"probs": exact})


# ------------------------------------------------------------------------------------------
# The engine: exact agreement with a per-coordinate loop, chunking, cost, dtype.
# ------------------------------------------------------------------------------------------


def reference_loop(f, dist, params, x, fx, coupling, wrt=None, plate=False):
    """The measure-valued estimate, one parameter element and one coordinate at a time."""
    base, _ = base_distribution(dist)
    plate_ndim = len(dist.batch_shape) if plate else 0
    num = x.shape[0]
    signal = fx if plate else fx.reshape(num, -1).sum(-1)
    batch, event = tuple(base.batch_shape), tuple(base.event_shape)
    out = {}
    for name, param in params.items():
        if wrt is not None and name not in wrt:
            continue
        wd = _lookup(type(base), name)(base, x, coupling)
        full = (num, *param.shape, *event)
        const = torch.broadcast_to(torch.as_tensor(wd.constant), (num, *param.shape))
        est = torch.empty(num, *param.shape, dtype=param.dtype)
        for idx in itertools.product(*map(range, param.shape)):
            coord, plate_idx = idx[: len(batch)], idx[:plate_ndim]
            values = []
            for part in (wd.positive, wd.negative):
                if part is None:
                    values.append(signal[(slice(None), *plate_idx)])
                    continue
                x_pert = x.clone()
                x_pert[(slice(None), *coord)] = torch.broadcast_to(part, full)[
                    (slice(None), *idx)
                ].to(x.dtype)
                fp = f(x_pert)
                values.append(
                    fp[(slice(None), *plate_idx)] if plate else fp.reshape(num, -1).sum(-1)
                )
            est[(slice(None), *idx)] = (const[(slice(None), *idx)] * (values[0] - values[1])).to(
                param.dtype
            )
        out[name] = est
    return out


@pytest.mark.filterwarnings("ignore::gradkit.PlateHint")
@pytest.mark.parametrize("coupling", [True, False])
@pytest.mark.parametrize("layout", [*LAYOUTS, "elementwise_plate", "elementwise_undeclared"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_engine_equals_reference_loop(family: str, layout: str, coupling: bool):
    if layout.startswith("elementwise"):
        dist, f = FAMILIES[family]((2, 3), torch.float32), COSTS["cos"]
        plate = layout == "elementwise_plate"
    else:
        dist, f, plate = _layout(family, layout)
    params = parameters(dist)  # before sampling caches Geometric's other parameter
    x = rebuild(dist, params).sample((7,))
    fx = f(x)
    torch.manual_seed(123)  # without a generator the perturbations come from the global stream
    batched = measure_valued_estimates(f, dist, x, fx, coupling, wrt=WRT.get(family), plate=plate)
    torch.manual_seed(123)
    looped = reference_loop(f, dist, params, x, fx, coupling, WRT.get(family), plate)
    assert batched.keys() == looped.keys()
    for name in batched:
        assert batched[name].shape == looped[name].shape
        assert torch.equal(batched[name], looped[name]), name


def test_chunking_gives_the_same_estimates(monkeypatch):
    dist = Independent(Normal(torch.randn(4, 5), torch.rand(4, 5) + 0.5), 1)
    x = dist.sample((6,))

    def f(x):
        return torch.sin(x).sum(-1)

    torch.manual_seed(5)
    whole = measure_valued_estimates(f, dist, x, f(x), plate=True)
    monkeypatch.setattr(weak_derivatives, "_CHUNK_ELEMENTS", 2 * x.numel())
    calls = []

    def counted(x):
        calls.append(x.shape[0])
        return f(x)

    torch.manual_seed(5)
    chunked = measure_valued_estimates(counted, dist, x, f(x), plate=True)
    # under the plate 5 groups (one event coordinate for all 4 batch elements), 2 per chunk;
    # loc: +, -; scale: + (x- is the sample)
    assert calls == [2, 2, 1] * 2 + [2, 2, 1]
    for name in whole:
        assert torch.equal(whole[name], chunked[name])


def _rows_passed_to_f(batch: int, event: int, plate: bool) -> int:
    rows = []

    def f(x):
        rows.append(x.shape[:-2].numel())  # leading dims: groups x samples
        return (x**2).sum(-1) if plate else (x**2).sum((-2, -1))

    dist = Independent(Normal(torch.zeros(batch, event), torch.ones(batch, event)), 1)
    gk.measure_valued(f, dist, 4, plate=plate)
    return sum(rows)


def test_plate_cost_grows_with_event_size_not_batch_size():
    # coupled Normal: loc needs f(x+) and f(x-), scale only f(x+); plus the original f(x)
    event = 3
    assert _rows_passed_to_f(1, event, plate=True) == 4 * (1 + 3 * event)
    assert _rows_passed_to_f(64, event, plate=True) == 4 * (1 + 3 * event)
    assert _rows_passed_to_f(64, event, plate=False) == 4 * (1 + 3 * 64 * event)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float64_in_float64_out(family: str):
    dist, f, plate = _layout(family, "independent_plate", torch.float64)
    shapes = {name: p.shape for name, p in parameters(dist).items()}
    out = estimate(f, dist, 5, True, family, plate)
    for name, values in out.items():
        assert values.dtype == torch.float64, name
        assert values.shape == (5, *shapes[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_estimates_stay_on_the_device():
    dist = Independent(Normal(torch.zeros(3, 2, device="cuda"), torch.ones(3, 2, device="cuda")), 1)
    out = gk.measure_valued(lambda x: x.prod(-1), dist, 5, plate=True)
    assert all(v.device.type == "cuda" for v in out.values())


# ------------------------------------------------------------------------------------------
# Coupling.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cost", ["square", "cos"])
def test_normal_scale_coupling_lowers_variance(cost: str):
    dist = Normal(torch.tensor(0.4), torch.tensor(1.2))
    f = COSTS[cost]
    coupled = gk.measure_valued(f, dist, NUM, coupling=True)["scale"].var()
    independent = gk.measure_valued(f, dist, NUM, coupling=False)["scale"].var()
    assert coupled < 0.6 * independent, (coupled, independent)


def test_normal_scale_coupling_is_the_maxwell_gaussian_pair():
    """x+ = mu + sigma m with m double-sided Maxwell and (x - mu) = u (x+ - mu), u ~ U(0, 1)."""
    mu, sigma = torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    dist = Normal(mu, sigma)
    x = dist.sample((NUM,))
    wd = _lookup(Normal, "scale")(dist, x, True)
    assert wd.negative is None
    m = (wd.positive - mu) / sigma
    u = (x - mu) / (wd.positive - mu)
    maxwell = gk.DoubleSidedMaxwell(torch.tensor(0.0), torch.tensor(1.0))
    assert (
        scipy.stats.kstest(m.numpy(), lambda v: maxwell.cdf(torch.as_tensor(v)).numpy()).pvalue
        > 1e-3
    )
    assert scipy.stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    corr = torch.corrcoef(torch.stack([u, m.abs()]))[0, 1]
    assert abs(float(corr)) < 4 / math.sqrt(NUM)


# ------------------------------------------------------------------------------------------
# The registry: user entries, inheritance, errors.
# ------------------------------------------------------------------------------------------


def _weibull_scale(dist: Weibull, x: Tensor, coupling: bool) -> WeakDerivative:
    # d/dlam p = (k/lam) (y p - p), y = (x/lam)^k ~ Exp(1); y p is the law of lam G^(1/k),
    # G ~ Gamma(2, 1). Coupled: G = y + E and x- = x; uncoupled: fresh G and x-.
    k, lam = dist.concentration, dist.scale
    e = torch.empty_like(x).exponential_()
    if coupling:
        g, negative = (x / lam) ** k + e, None
    else:
        g, negative = e + torch.empty_like(x).exponential_(), dist.sample(x.shape[:1])
    return WeakDerivative(k / lam, lam * g ** (1 / k), negative)


@pytest.mark.parametrize("coupling", [True, False])
def test_user_registered_weak_derivative(registry_guard, coupling: bool):
    gk.register_weak_derivative(Weibull, "scale")(_weibull_scale)
    assert (Weibull, "scale") in gk.registered_weak_derivatives()
    dist = Weibull(torch.tensor([0.7, 1.5]), torch.tensor([0.8, 2.5]))  # scale, concentration

    def expect(d):  # E[(x - 0.3)^2] with E[x^m] = lam^m Gamma(1 + m/k)
        def moment(m):
            return d.scale**m * torch.exp(torch.lgamma(1 + m / d.concentration))

        return moment(2) - 0.6 * moment(1) + 0.09

    f = COSTS["square"]
    out = estimate(f, dist, NUM, coupling, "weibull", plate=True)
    assert set(out) == {"scale"}
    check(out, exact_grad(dist, expect))


def test_subclass_inherits_registered_weak_derivative(registry_guard):
    class ShiftedNormal(Normal):
        pass

    dist = ShiftedNormal(torch.tensor(0.5), torch.tensor(1.0))
    out = gk.measure_valued(COSTS["square"], dist, NUM)
    check(out, {"loc": torch.tensor(0.4), "scale": torch.tensor(2.0)})

    @gk.register_weak_derivative(ShiftedNormal, "loc")
    def _broken(dist, x, coupling):
        return WeakDerivative(torch.zeros(()), x, None)

    assert torch.equal(gk.measure_valued(COSTS["square"], dist, 5)["loc"], torch.zeros(5))


def test_unregistered_pair_lists_what_is_registered():
    dist = Beta(torch.tensor(2.0), torch.tensor(3.0))
    with pytest.raises(NotImplementedError, match=r"Beta parameter 'concentration1'") as info:
        gk.measure_valued(COSTS["square"], dist, 5)
    message = str(info.value)
    for dist_type, name in gk.registered_weak_derivatives():
        assert f"({dist_type.__name__}, {name!r})" in message
    assert "register_weak_derivative(Beta, 'concentration1')" in message


def test_gamma_concentration_is_unregistered_and_wrt_selects_rate():
    dist = Gamma(torch.tensor(2.0), torch.tensor(1.5))
    # a parameter with no weak derivative is left out unless it needs a gradient
    assert set(gk.measure_valued(COSTS["square"], dist, 5)) == {"rate"}
    needs_grad = Gamma(torch.tensor(2.0, requires_grad=True), torch.tensor(1.5))
    with pytest.raises(NotImplementedError, match="Gamma parameter 'concentration'.*wrt="):
        gk.measure_valued(COSTS["square"], needs_grad, 5)
    x = dist.sample((5,))
    assert set(measure_valued_estimates(COSTS["square"], dist, x, x, wrt=["rate"])) == {"rate"}


@pytest.mark.parametrize(
    ("dist_type", "name", "match"),
    [
        (int, "loc", "Distribution subclass"),
        (Normal(0.0, 1.0), "loc", "Distribution subclass"),
        (Normal, 3, "parameter name as a string"),
    ],
)
def test_register_rejects_bad_arguments(dist_type, name, match):
    with pytest.raises(TypeError, match=match):
        gk.register_weak_derivative(dist_type, name)


class _Custom(Normal):
    """A Normal subclass to register deliberately broken weak derivatives on."""


@pytest.mark.parametrize(
    ("rule", "error", "match"),
    [
        (lambda d, x, c: (1.0, x, x), TypeError, "must return gk.WeakDerivative"),
        (lambda d, x, c: WeakDerivative(1.0, None, None), ValueError, "None for both"),
        (lambda d, x, c: WeakDerivative(1.0, x[:, :1].repeat(1, 3), None), ValueError, "broadcast"),
        (lambda d, x, c: WeakDerivative(1.0, [0.0], None), TypeError, "tensor or None"),
        (lambda d, x, c: WeakDerivative(torch.ones(3, 1, 1), x, None), ValueError, "constant"),
    ],
)
def test_malformed_weak_derivative_is_reported(registry_guard, rule, error, match):
    gk.register_weak_derivative(_Custom, "loc")(rule)
    dist = _Custom(torch.zeros(2), torch.ones(2))
    with pytest.raises(error, match=match):
        gk.measure_valued(lambda x: x.sum(-1), dist, 4)


def test_bad_arguments_to_the_engine():
    dist = Normal(torch.zeros(2), torch.ones(2))
    x = dist.sample((5,))
    with pytest.raises(TypeError, match="coupling must be True or False"):
        measure_valued_estimates(lambda x: x, dist, x, x, coupling="yes")
    with pytest.raises(ValueError, match="wrt must be a list of parameter names"):
        measure_valued_estimates(lambda x: x, dist, x, x, wrt=["rate"])
    with pytest.raises(ValueError, match="wrt must be a list of parameter names"):
        measure_valued_estimates(lambda x: x, dist, x, x, wrt="loc")


def test_engine_plate_shape_and_generator():
    dist = Independent(Normal(torch.randn(3, 2), torch.ones(3, 2)), 1)
    x = dist.sample((5,))

    def f(x):
        return torch.cos(x).sum(-1)  # (S, 3): one value per batch element

    with pytest.raises(ValueError, match=r"\(S, 3\).*\(S,\)"):
        measure_valued_estimates(lambda x: f(x).sum(-1), dist, x, f(x).sum(-1), plate=True)
    state = torch.get_rng_state()
    runs = [
        measure_valued_estimates(
            f, dist, x, f(x), plate=True, generator=torch.Generator().manual_seed(s)
        )
        for s in (3, 3, 4)
    ]
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    for name in ("loc", "scale"):
        assert torch.equal(runs[0][name], runs[1][name])
        assert not torch.equal(runs[0][name], runs[2][name])


def test_cost_that_does_not_broadcast_over_a_leading_dim():
    dist = Normal(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match=r"broadcast over leading dimensions.*x\[\.\.\., i\]"):
        gk.measure_valued(lambda x: x[:, 0] * x[:, 1], dist, 5)


def test_cost_whose_shape_changes_on_perturbed_samples():
    dist = Normal(torch.zeros(2), torch.ones(2))

    def f(x):
        return x.sum(-1) if x.dim() == 2 else x

    pattern = r"shape \(2,\) per sample .* but \(\) for the forward samples.*perturbed samples"
    with pytest.raises(ValueError, match=pattern):
        gk.measure_valued(f, dist, 5)


def test_nan_on_perturbed_samples_is_reported():
    dist = Normal(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="NaN or inf.*perturbed samples"):
        gk.measure_valued(lambda x: x.sum(-1) / (x.dim() == 2), dist, 5)


class _Unbroadcast(Distribution):
    """A distribution whose parameter is not laid out batch-first (batch (2,), loc (3,))."""

    arg_constraints = {"loc": constraints.real}
    support = constraints.real

    def __init__(self, loc: Tensor, validate_args=None):
        self.loc = loc
        super().__init__(torch.Size([2]), validate_args=False)

    def sample(self, sample_shape=()):
        return torch.zeros(*sample_shape, 2)


def test_parameter_not_batch_first(registry_guard):
    gk.register_weak_derivative(_Unbroadcast, "loc")(lambda d, x, c: WeakDerivative(1.0, x, None))
    with pytest.raises(ValueError, match="does not start with the batch shape"):
        gk.measure_valued(lambda x: x, _Unbroadcast(torch.zeros(3)), 4)


# ------------------------------------------------------------------------------------------
# Autograd integration.
# ------------------------------------------------------------------------------------------


def test_expectation_backward_matches_exact_gradient_of_an_encoder():
    """loc = inputs @ w, scale = softplus(inputs @ v): gradients reach w and v unbiasedly."""
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(4, 3, generator=gen)
    w = torch.randn(3, 2, generator=gen, requires_grad=True)
    v = (0.3 * torch.randn(3, 2, generator=gen)).requires_grad_()

    def make():
        loc, scale = inputs @ w, torch.nn.functional.softplus(inputs @ v) + 0.1
        return Independent(Normal(loc, scale), 1)

    def f(x):
        return torch.cos(x).sum(-1)  # one value per data point: the plate case

    base = make().base_dist
    exact = torch.cos(base.loc) * torch.exp(-0.5 * base.scale**2)
    exact_w, exact_v = torch.autograd.grad(exact.sum(), [w, v])
    runs = []
    for _ in range(30):
        value = gk.expectation(f, make(), 500, estimator="measure_valued", plate=True)
        assert value.shape == (4,)
        runs.append(torch.cat([g.flatten() for g in torch.autograd.grad(value.sum(), [w, v])]))
    runs = torch.stack(runs)
    mean, se = runs.mean(0), runs.std(0) / math.sqrt(runs.shape[0])
    exact_all = torch.cat([exact_w.flatten(), exact_v.flatten()])
    assert bool(((mean - exact_all).abs() < Z * se + 1e-6).all()), (mean, exact_all, se)
