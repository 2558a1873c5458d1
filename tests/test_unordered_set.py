"""The unordered-set estimator: set probabilities, weights, unbiasedness, exactness, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Independent, Normal, OneHotCategorical

import gradkit as gk
from gradkit.unordered_set import _set_weights, log_set_probability
from tests.stats import assert_unbiased

EST = gk.ESTIMATORS["unordered_set"]
LOGITS = [0.3, -1.2, 2.0, 0.0, 0.7]
TABLE = [1.0, -2.0, 0.5, 3.0, -1.0]
# three categoricals of a plate, each with its own cost table
PLATE_LOGITS = [[0.3, -1.2, 2.0, 0.0, 0.7], [1.5, 1.4, -2.0, 0.1, -0.5], [-1.0, 0.0, 0.5, 3.0, 2.5]]
PLATE_TABLE = [[1.0, -2.0, 0.5, 3.0, -1.0], [4.0, 0.0, 2.0, -3.0, 1.0], [-1.0, 2.5, 0.0, 1.5, 5.0]]
COPIES = 4000  # independent estimates per statistical test (a plate of copies)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rounding(dtype: torch.dtype, exact: Tensor) -> float:
    return 20 * torch.finfo(dtype).eps * (1 + float(exact.abs().max()))


# -- exact references by enumeration ----------------------------------------------------------


def _log_ordered(log_p: Tensor, order: tuple[int, ...]) -> Tensor:
    """Log-probability of drawing ``order`` without replacement (Plackett-Luce), float64."""
    remaining = list(range(log_p.shape[-1]))
    total = log_p.new_zeros(())
    for s in order:
        total = total + log_p[s] - torch.logsumexp(log_p[remaining], 0)
        remaining.remove(s)
    return total


def _exact_log_set(log_p: Tensor, members: tuple[int, ...]) -> Tensor:
    """:math:`\\log p(S)`: the sum over every ordering of the set."""
    orders = itertools.permutations(members)
    return torch.logsumexp(torch.stack([_log_ordered(log_p, o) for o in orders]), 0)


def _exact_first(log_p: Tensor, members: tuple[int, ...]) -> Tensor:
    """:math:`P(x_1 = s \\mid S)` for each member."""
    joint = torch.stack(
        [
            torch.logsumexp(
                torch.stack(
                    [_log_ordered(log_p, o) for o in itertools.permutations(members) if o[0] == s]
                ),
                0,
            )
            for s in members
        ]
    )
    return (joint - _exact_log_set(log_p, members)).exp()


def _without(log_p: Tensor, removed: tuple[int, ...]) -> tuple[Tensor, list[int]]:
    """The categorical renormalised on the categories not ``removed`` (and their labels)."""
    kept = [i for i in range(log_p.shape[-1]) if i not in removed]
    return torch.log_softmax(log_p[kept], -1), kept


def _exact_baseline_weights(log_p: Tensor, members: tuple[int, ...]) -> Tensor:
    """:math:`p(s') R^{D \\setminus \\{s\\}}(S, s')` by enumeration, ``(k, k)``."""
    k = len(members)
    out = torch.zeros(k, k, dtype=log_p.dtype)
    for i, s in enumerate(members):
        rest, kept = _without(log_p, (s,))
        others = tuple(kept.index(m) for m in members if m != s)
        log_rest_set = _exact_log_set(rest, others)
        for j, t in enumerate(members):
            if t == s:
                out[i, j] = log_p[s].exp()
                continue
            pair, kept2 = _without(log_p, (s, t))
            remaining = tuple(kept2.index(m) for m in members if m not in (s, t))
            log_pair_set = _exact_log_set(pair, remaining) if remaining else log_p.new_zeros(())
            out[i, j] = (log_p[t] + log_pair_set - log_rest_set).exp()
    return out


def _exact_gradient(name: str, param: Tensor, table: Tensor) -> Tensor:
    """:math:`\\nabla \\sum_j p_j t_j` for a categorical built from ``logits`` or ``probs``."""
    leaf = param.detach().double().clone().requires_grad_()
    p = leaf.softmax(-1) if name == "logits" else leaf / leaf.sum(-1, keepdim=True)
    (grad,) = torch.autograd.grad((p * table.double()).sum(), leaf)
    return grad


def _param(name: str, logits: list, dtype: torch.dtype) -> Tensor:
    values = torch.tensor(logits, dtype=torch.float64)
    return (values if name == "logits" else values.softmax(-1)).to(dtype)


def _build(name: str, param: Tensor, kind: type = Categorical) -> Categorical:
    return kind(logits=param) if name == "logits" else kind(probs=param)


# -- the probability of a set and the weights -------------------------------------------------


@DTYPES
@pytest.mark.parametrize("logits", [LOGITS, [8.0, 7.0, -6.0, -9.0, 0.0]], ids=["mild", "peaked"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_set_probabilities_sum_to_one_and_match_enumeration(k, logits, dtype):
    log_p = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    subsets = list(itertools.combinations(range(5), k))
    computed = log_set_probability(log_p.to(dtype), torch.tensor(subsets))
    assert computed.dtype == dtype and computed.shape == (len(subsets),)
    exact = torch.stack([_exact_log_set(log_p, s) for s in subsets])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(computed.double(), exact, rtol=0, atol=tol)
    total = computed.double().exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=tol)


def test_set_probability_takes_unnormalised_logits_and_broadcasts():
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    sets = torch.tensor([[0, 2], [1, 4], [3, 2]])
    shifted = log_set_probability(logits + 7.0, sets)
    torch.testing.assert_close(shifted, log_set_probability(logits.log_softmax(-1), sets))
    batched = log_set_probability(logits.expand(2, 3, 5), sets)
    assert batched.shape == (2, 3)
    torch.testing.assert_close(batched[1], shifted)


@pytest.mark.parametrize("logits", [LOGITS, [8.0, 7.0, -6.0, -9.0, 0.0]], ids=["mild", "peaked"])
def test_weights_are_the_first_draw_given_the_set_and_its_baseline(logits):
    log_p = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    subsets = list(itertools.combinations(range(5), 3))
    alpha, beta = _set_weights(log_p.expand(len(subsets), 5), torch.tensor(subsets), True)
    assert beta is not None
    exact_alpha = torch.stack([_exact_first(log_p, s) for s in subsets])
    exact_beta = torch.stack([_exact_baseline_weights(log_p, s) for s in subsets])
    torch.testing.assert_close(alpha, exact_alpha, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(beta, exact_beta, rtol=1e-11, atol=1e-14)
    ones = torch.ones(len(subsets), dtype=torch.float64)
    torch.testing.assert_close(alpha.sum(-1), ones)  # a distribution over the set
    torch.testing.assert_close(beta.sum(-1), ones.unsqueeze(-1).expand(-1, 3))


def test_sets_are_distinct_and_drawn_with_their_probability():
    # Gumbel-top-k draws each set S with probability p(S): count the sets of many draws
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    copies = 20_000
    dist = Categorical(logits=logits.expand(copies, 5).clone())
    seen: list[Tensor] = []

    def f(z: Tensor) -> Tensor:
        seen.append(z)
        return z.to(torch.float64)

    EST(f, dist, 2, plate=True, generator=_generator(11))
    z = seen[0]  # (k, copies)
    assert z.dtype == torch.long and z.shape == (2, copies)
    assert bool((z[0] != z[1]).all())
    code = z.min(0).values * 5 + z.max(0).values
    counts = torch.bincount(code, minlength=25).double()
    subsets = list(itertools.combinations(range(5), 2))
    probs = log_set_probability(logits, torch.tensor(subsets)).exp()
    observed = torch.stack([counts[a * 5 + b] for a, b in subsets]) / copies
    se = (probs * (1 - probs) / copies).sqrt()
    assert bool(((observed - probs).abs() <= 4.5 * se).all())


# -- unbiasedness ------------------------------------------------------------------------------


@DTYPES
@pytest.mark.parametrize("name", ["logits", "probs"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("baseline", [True, False], ids=["baseline", "plain"])
def test_unbiased_for_one_categorical(k, name, dtype, baseline):
    # COPIES independent copies of the one categorical in a plate: one estimate each
    param = _param(name, LOGITS, dtype)
    table = torch.tensor(TABLE, dtype=dtype)
    dist = _build(name, param.expand(COPIES, 5).clone())
    rows = EST(lambda z: table[z], dist, k, plate=True, baseline=baseline, generator=_generator(k))
    estimates = rows[name]
    assert estimates.shape == (1, COPIES, 5) and estimates.dtype == dtype
    exact = _exact_gradient(name, param, table)
    assert_unbiased(estimates[0], exact, atol=_rounding(dtype, exact))


@pytest.mark.parametrize("name", ["logits", "probs"])
def test_unbiased_for_one_categorical_over_independent_calls(name):
    # the same through plate=False, one call per estimate
    param = _param(name, LOGITS, torch.float64)
    table = torch.tensor(TABLE, dtype=torch.float64)
    dist = _build(name, param)
    generator = _generator(5)
    rows = torch.cat(
        [EST(lambda z: table[z], dist, 2, generator=generator)[name] for _ in range(400)]
    )
    assert_unbiased(rows, _exact_gradient(name, param, table))


@DTYPES
@pytest.mark.parametrize("kind", [Categorical, OneHotCategorical], ids=["index", "one-hot"])
@pytest.mark.parametrize("name", ["logits", "probs"])
def test_unbiased_for_a_plate_of_categoricals(name, kind, dtype):
    param = _param(name, PLATE_LOGITS, dtype)
    table = torch.tensor(PLATE_TABLE, dtype=dtype)

    def f(z: Tensor) -> Tensor:  # one cost per categorical, (k, copies, 3)
        if kind is OneHotCategorical:
            assert bool((z.sum(-1) == 1).all())
            return (z * table).sum(-1)
        return table[torch.arange(3), z]

    dist = _build(name, param.expand(COPIES, 3, 5).clone(), kind)
    rows = EST(f, dist, 3, plate=True, generator=_generator(7))[name]
    assert rows.shape == (1, COPIES, 3, 5)
    exact = _exact_gradient(name, param, table)
    assert_unbiased(rows[0], exact, atol=_rounding(dtype, exact))


@DTYPES
def test_expectation_is_unbiased_with_gradients_inside_f(dtype):
    logits = torch.tensor(PLATE_LOGITS, dtype=dtype).expand(COPIES, 3, 5).clone()
    logits.requires_grad_()
    # a "decoder" parameter inside f, one copy per estimate: d E[f] / d table = p
    table = torch.tensor(PLATE_TABLE, dtype=dtype).expand(COPIES, 3, 5).clone()
    table.requires_grad_()

    def f(z: Tensor) -> Tensor:
        return table.expand(z.shape[0], *table.shape).gather(-1, z.unsqueeze(-1)).squeeze(-1)

    value = gk.expectation(
        f, Categorical(logits=logits), 2, estimator="unordered_set", plate=True,
        generator=_generator(3),
    )  # fmt: skip
    assert value.shape == (COPIES, 3)
    value.sum().backward()
    p = torch.tensor(PLATE_LOGITS, dtype=torch.float64).softmax(-1)
    plate_table = torch.tensor(PLATE_TABLE, dtype=torch.float64)
    exact = _exact_gradient("logits", torch.tensor(PLATE_LOGITS, dtype=torch.float64), plate_table)
    assert_unbiased(value.detach().reshape(COPIES, 3), (p * plate_table).sum(-1))
    assert_unbiased(logits.grad, exact, atol=_rounding(dtype, exact))
    assert_unbiased(table.grad, p, atol=_rounding(dtype, p))


def test_expectation_gives_the_per_sample_rows():
    # the same generator state: the same set, and the backward pass is the one row
    leaf = torch.tensor(PLATE_LOGITS, dtype=torch.float64, requires_grad=True)
    table = torch.tensor(PLATE_TABLE, dtype=torch.float64)

    def f(z: Tensor) -> Tensor:
        return table[torch.arange(3), z] ** 2

    rows = EST(f, Categorical(logits=leaf.detach()), 3, plate=True, generator=_generator(9))
    value = gk.expectation(
        f, Categorical(logits=leaf), 3, estimator="unordered_set", plate=True,
        generator=_generator(9),
    )  # fmt: skip
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    torch.testing.assert_close(grad, rows["logits"][0])
    # a single categorical with a vector-valued cost (plate=False): the signal sums T
    single = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    two = torch.tensor([TABLE, [0.5, 0.0, -1.0, 2.0, 1.0]], dtype=torch.float64)

    def g(z: Tensor) -> Tensor:
        return torch.stack([two[0][z], two[1][z]], -1)

    rows = EST(g, Categorical(logits=single.detach()), 2, generator=_generator(4))
    value = gk.expectation(
        g, Categorical(logits=single), 2, estimator="unordered_set", generator=_generator(4)
    )
    assert value.shape == (2,)
    (grad,) = torch.autograd.grad(value.sum(), single)
    torch.testing.assert_close(grad, rows["logits"][0])


# -- exactness, variance, the first draw ------------------------------------------------------


@DTYPES
@pytest.mark.parametrize("name", ["logits", "probs"])
@pytest.mark.parametrize("baseline", [True, False], ids=["baseline", "plain"])
def test_the_whole_set_gives_the_exact_gradient(name, baseline, dtype):
    param = _param(name, PLATE_LOGITS, dtype)
    table = torch.tensor(PLATE_TABLE, dtype=dtype)
    exact = _exact_gradient(name, param, table)
    expected = (torch.tensor(PLATE_LOGITS, dtype=torch.float64).softmax(-1) * table.double()).sum(
        -1
    )
    tol = 100 * _rounding(dtype, exact)
    for seed in range(3):
        rows = EST(
            lambda z: table[torch.arange(3), z], _build(name, param), 5, plate=True,
            baseline=baseline, generator=_generator(seed),
        )[name]  # fmt: skip
        torch.testing.assert_close(rows[0].double(), exact, rtol=0, atol=tol)
        leaf = param.clone().requires_grad_()
        value = gk.expectation(
            lambda z: table[torch.arange(3), z], _build(name, leaf), 5,
            estimator="unordered_set", plate=True, generator=_generator(seed),
        )  # fmt: skip
        torch.testing.assert_close(value.detach().double(), expected, rtol=0, atol=tol)
    # a single categorical, plate=False
    single = _param(name, LOGITS, dtype)
    cost = torch.tensor(TABLE, dtype=dtype)
    rows = EST(lambda z: cost[z], _build(name, single), 5, baseline=baseline)[name]
    exact = _exact_gradient(name, single, torch.tensor(TABLE, dtype=torch.float64))
    torch.testing.assert_close(rows[0].double(), exact, rtol=0, atol=tol)


@pytest.mark.parametrize("baseline", [True, False], ids=["baseline", "plain"])
def test_a_set_as_large_as_the_support_is_exact(baseline):
    # categories of probability zero fill the set once the support is exhausted
    logits = torch.tensor(
        [[0.0, -math.inf, 1.0, -math.inf], [0.5, -math.inf, -math.inf, -math.inf]]
    )
    table = torch.tensor([[1.0, 2.0, -3.0, 4.0], [2.0, -1.0, 0.5, 3.0]])
    dist = Categorical(logits=logits.double())
    for k in (2, 3, 4):
        rows = EST(
            lambda z: table.double()[torch.arange(2), z], dist, k, plate=True,
            baseline=baseline, generator=_generator(k),
        )["logits"]  # fmt: skip
        p = logits.double().softmax(-1)
        exact = p * (table.double() - (p * table.double()).sum(-1, keepdim=True))
        torch.testing.assert_close(rows[0], exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_the_baseline_lowers_the_variance_and_ignores_a_constant(k):
    logits = torch.tensor(LOGITS, dtype=torch.float64).expand(COPIES, 5).clone()
    table = torch.tensor(TABLE, dtype=torch.float64)

    def rows(offset: float, baseline: bool) -> Tensor:
        return EST(
            lambda z: table[z] + offset, Categorical(logits=logits), k, plate=True,
            baseline=baseline, generator=_generator(12),
        )["logits"][0]  # fmt: skip

    with_baseline, plain = rows(10.0, True), rows(10.0, False)
    # the same sets: the baseline estimate does not see the offset (its weights sum to one
    # exactly), while without it the offset's score-function noise grows with its square
    assert bool((with_baseline.var(0) < 0.5 * plain.var(0)).all())
    torch.testing.assert_close(with_baseline, rows(0.0, True), rtol=0, atol=1e-12)


def test_one_draw_is_the_score_function():
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    table = torch.tensor(TABLE, dtype=torch.float64)
    seen: list[Tensor] = []

    def f(z: Tensor) -> Tensor:
        seen.append(z)
        return table[z]

    for baseline in (True, False):  # with one draw there is no other for a baseline
        seen.clear()
        rows = EST(f, Categorical(logits=logits), 1, baseline=baseline, generator=_generator(2))
        (x,) = seen[0]
        score = torch.nn.functional.one_hot(x, 5).double() - logits.softmax(-1)
        torch.testing.assert_close(rows["logits"][0], table[x] * score)


def test_the_generator_fixes_the_set_and_leaves_the_global_stream_alone():
    dist = Categorical(logits=torch.tensor(PLATE_LOGITS))
    table = torch.tensor(PLATE_TABLE)

    def f(z: Tensor) -> Tensor:
        return table[torch.arange(3), z]

    state = torch.get_rng_state()
    first = EST(f, dist, 2, plate=True, generator=_generator(8))["logits"]
    assert torch.equal(torch.get_rng_state(), state)
    again = EST(f, dist, 2, plate=True, generator=_generator(8))["logits"]
    other = EST(f, dist, 2, plate=True, generator=_generator(9))["logits"]
    assert torch.equal(first, again) and not torch.equal(first, other)


# -- refusals ----------------------------------------------------------------------------------


def test_errors_name_the_fix():
    dist = Categorical(logits=torch.tensor(LOGITS))
    with pytest.raises(ValueError, match=r"at most the number of categories K = 5, got 6"):
        EST(lambda z: z.float(), dist, 6)
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        EST(lambda z: z.float(), dist, 0)
    with pytest.raises(ValueError, match="got Bernoulli; for Bernoulli variables use 'disarm'"):
        EST(lambda z: z, Bernoulli(torch.tensor(0.3)), 2)
    with pytest.raises(ValueError, match="got Normal; .*'pathwise'"):
        EST(lambda x: x, Normal(torch.zeros(()), torch.ones(())), 2)
    batch = Categorical(logits=torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"couples 3 categorical variables.*declare plate=True"):
        EST(lambda z: z.float().sum(-1), batch, 2)
    with pytest.raises(ValueError, match="'indecater' or 'score_function'"):
        gk.expectation(lambda z: z.float().sum(-1), batch, 2, estimator="unordered_set")
    inner = Independent(Categorical(logits=torch.zeros(2, 3, 4)), 1)  # 3 per plate element
    with pytest.raises(ValueError, match=r"couples 3 categorical variables.*plate=True\)"):
        EST(lambda z: z.float().sum(-1), inner, 2, plate=True)
    with pytest.raises(TypeError, match="baseline must be True or False"):
        EST(lambda z: z.float(), dist, 2, baseline="yes")
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['coupling'\]"):
        EST(lambda z: z.float(), dist, 2, coupling=True)


def test_registered_with_its_properties():
    assert EST.name == "unordered_set" and not EST.biased
    assert EST.families == (Categorical, OneHotCategorical)
    assert EST.options == ("baseline",)
    # a batch of one categorical is one variable: accepted without a plate
    rows = EST(lambda z: z.double().sum(-1), Categorical(logits=torch.zeros(1, 4)), 2)
    assert rows["logits"].shape == (1, 1, 4)
    # Independent with one categorical per plate element is one variable per cost
    nested = Independent(Categorical(logits=torch.zeros(2, 1, 4, dtype=torch.float64)), 1)
    rows = EST(lambda z: z.double().sum(-1), nested, 3, plate=True)
    assert rows["logits"].shape == (1, 2, 1, 4)
    assert math.isfinite(float(rows["logits"].sum()))
