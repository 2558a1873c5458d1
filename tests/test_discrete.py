"""Discrete-latent estimators beyond the conformance matrix: variance, exactness, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, Normal, OneHotCategorical

import gradkit as gk
from tests.stats import assert_unbiased


def _nonlinear(z):
    return torch.sin(3 * z.sum(-1)) + (z[..., 0] - 0.3 * z[..., 1]) ** 2


@pytest.mark.parametrize("logits", [[0.3, -1.2, 2.0], [-3.0, 0.0, 0.5], [4.0, 4.0, -4.0]])
def test_disarm_variance_is_no_larger_than_arm(logits):
    dist = Bernoulli(logits=torch.tensor(logits, dtype=torch.float64))
    rows = {
        name: gk.ESTIMATORS[name](
            _nonlinear, dist, 40_000, generator=torch.Generator().manual_seed(1)
        )["logits"]
        for name in ("arm", "disarm")
    }
    # the same pairs (same generator): DisARM is ARM conditioned on the pair, coordinate by
    # coordinate, so its variance is smaller in every coordinate (up to sampling noise of the
    # two variance estimates, which share the pairs)
    assert torch.all(rows["disarm"].var(0) <= 1.05 * rows["arm"].var(0))


def test_arm_and_disarm_share_the_pairs_and_the_value():
    probs = torch.tensor([0.2, 0.7], requires_grad=True)
    values = [
        gk.expectation(
            _nonlinear,
            Bernoulli(probs),
            64,
            estimator=n,
            generator=torch.Generator().manual_seed(2),
        )
        for n in ("arm", "disarm")
    ]
    assert values[0] == values[1]  # the same antithetic pairs, so the same value


def test_enumerate_gives_exact_gradients_inside_f_too():
    logits = torch.tensor([0.4, -0.3], requires_grad=True)
    weight = torch.tensor(1.5, requires_grad=True)

    def f(z):  # a "decoder" with a parameter of its own; the cost couples the two bits
        return (weight * z[..., 0] - z[..., 1] - 0.2) ** 2

    value = gk.expectation(f, Bernoulli(logits=logits), 1, estimator="enumerate")
    value.backward()
    states = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    leaf_logits = logits.detach().clone().requires_grad_()
    leaf_weight = weight.detach().clone().requires_grad_()
    p = torch.sigmoid(leaf_logits)
    probs = (states * p + (1 - states) * (1 - p)).prod(-1)
    exact = (probs * (leaf_weight * states[:, 0] - states[:, 1] - 0.2) ** 2).sum()
    grads = torch.autograd.grad(exact, [leaf_logits, leaf_weight])
    torch.testing.assert_close(value.detach(), exact.detach())
    torch.testing.assert_close(logits.grad, grads[0])
    torch.testing.assert_close(weight.grad, grads[1])


def test_enumerate_a_plate_of_categoricals_is_exact_per_element():
    logits = torch.randn(5, 3, dtype=torch.float64)
    table = torch.randn(5, 3, dtype=torch.float64)
    rows = gk.ESTIMATORS["enumerate"](
        lambda z: table[torch.arange(5), z], Categorical(logits=logits), 1, plate=True
    )
    p = logits.softmax(-1)
    torch.testing.assert_close(rows["logits"][0], p * (table - (p * table).sum(-1, keepdim=True)))


def test_straight_through_is_the_mean_gradient():
    # f linear in z: straight-through is exact, d/dp E[3 z] = 3 for every row
    rows = gk.ESTIMATORS["straight_through"](lambda z: 3 * z, Bernoulli(torch.tensor(0.3)), 8)
    torch.testing.assert_close(rows["probs"], torch.full((8,), 3.0))
    onehot = OneHotCategorical(logits=torch.zeros(3))
    g = gk.ESTIMATORS["straight_through"](lambda y: y @ torch.tensor([1.0, 2.0, 4.0]), onehot, 4)
    p = torch.full((3,), 1 / 3)
    exact = p * (torch.tensor([1.0, 2.0, 4.0]) - 7 / 3)  # d/dlogits of sum_k p_k c_k
    torch.testing.assert_close(g["logits"].mean(0), exact)


def test_errors_name_the_fix():
    normal = Normal(torch.zeros(2), torch.ones(2))
    bern = Bernoulli(torch.tensor([0.3, 0.6]))
    with pytest.raises(ValueError, match="defined for Bernoulli variables, got Normal"):
        gk.ESTIMATORS["disarm"](lambda z: z, normal, 4)
    with pytest.raises(ValueError, match="got Categorical.*'rao_blackwell' or 'enumerate'"):
        gk.ESTIMATORS["arm"](lambda z: z.float(), Categorical(logits=torch.zeros(3)), 4)
    with pytest.raises(ValueError, match="must be even, got 5; use 6"):
        gk.ESTIMATORS["arm"](lambda z: z, bern, 5)
    with pytest.raises(ValueError, match="num_samples must be at least 2"):
        gk.ESTIMATORS["disarm"](lambda z: z, bern, 1)
    with pytest.raises(ValueError, match="build OneHotCategorical"):
        gk.ESTIMATORS["straight_through"](
            lambda z: z.float(), Categorical(logits=torch.zeros(3)), 4
        )
    many = Independent(Bernoulli(torch.full((17,), 0.5)), 1)
    with pytest.raises(ValueError, match=r"2\^17 = 131072 joint states is too many"):
        gk.ESTIMATORS["enumerate"](lambda z: z.sum(-1), many, 1)
    with pytest.raises(ValueError, match="sums over the states"):
        gk.ESTIMATORS["enumerate"](lambda z: z, normal, 1)


def _vimco_exact(theta: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """E[log mean_k exp f(z_k)] by enumerating the 2^K joint states, f(z) = w z - 1."""
    states = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * k)
    p = torch.sigmoid(theta)
    probs = (states * p + (1 - states) * (1 - p)).prod(-1)
    bounds = torch.logsumexp(w * states - 1.0, -1) - math.log(k)
    return (probs * bounds).sum()


def test_vimco_value_and_gradients_are_unbiased():
    copies, k, theta0, w0 = 20_000, 3, 0.4, 1.7
    theta = torch.full((copies,), theta0, dtype=torch.float64, requires_grad=True)
    w = torch.full((copies,), w0, dtype=torch.float64, requires_grad=True)
    bound = gk.vimco(
        lambda z: w * z - 1.0,
        Bernoulli(logits=theta),
        k,
        plate=True,
        generator=torch.Generator().manual_seed(4),
    )
    bound.sum().backward()  # one independent estimate per copy
    leaf_theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    leaf_w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    exact = _vimco_exact(leaf_theta, leaf_w, k)
    d_theta, d_w = torch.autograd.grad(exact, [leaf_theta, leaf_w])
    assert_unbiased(bound.detach()[:, None], exact.detach())
    assert_unbiased(theta.grad[:, None], d_theta)
    assert_unbiased(w.grad[:, None], d_w)


def test_vimco_errors():
    with pytest.raises(ValueError, match="at least 2"):
        gk.vimco(lambda z: z, Bernoulli(torch.tensor(0.3)), 1)
    with pytest.raises(ValueError, match="plate=True declares"):
        gk.vimco(lambda z: z.sum(-1), Bernoulli(torch.full((3,), 0.3)), 4, plate=True)


@pytest.mark.parametrize("kind", ["one-hot", "bernoulli"])
def test_gumbel_rao_has_the_straight_through_bias_and_less_variance(kind):
    logits = torch.tensor([0.5, -0.3, 1.2, 0.0], dtype=torch.float64)
    dist = OneHotCategorical(logits=logits) if kind == "one-hot" else Bernoulli(logits=logits)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)

    def f(y):
        return (y * c).sum(-1) ** 2

    st = gk.ESTIMATORS["straight_through_gumbel"](
        f, dist, 40_000, temperature=0.5, generator=torch.Generator().manual_seed(5)
    )["logits"]
    rao = gk.ESTIMATORS["gumbel_rao"](
        f,
        dist,
        40_000,
        temperature=0.5,
        num_relaxations=20,
        generator=torch.Generator().manual_seed(6),
    )["logits"]
    # the same expectation: conditioning on the sample only averages the noise out
    se = (st.var(0) / st.shape[0] + rao.var(0) / rao.shape[0]).sqrt()
    assert torch.all((st.mean(0) - rao.mean(0)).abs() <= 4.5 * se)
    assert torch.all(rao.var(0) < st.var(0))


def test_gumbel_rao_errors():
    dist = OneHotCategorical(logits=torch.zeros(3))
    with pytest.raises(ValueError, match="num_relaxations must be at least 1"):
        gk.ESTIMATORS["gumbel_rao"](lambda y: y.sum(-1), dist, 4, num_relaxations=0)
    with pytest.raises(ValueError, match="temperature"):
        gk.ESTIMATORS["gumbel_rao"](lambda y: y.sum(-1), dist, 4, temperature=0.0)
    with pytest.raises(ValueError, match="build OneHotCategorical"):
        gk.ESTIMATORS["gumbel_rao"](lambda z: z.float(), Categorical(logits=torch.zeros(3)), 4)


# -- REBAR and RELAX: the learnable control variates ------------------------------------------

TOY = 0.45


def _toy(b):
    return (b - TOY) ** 2


def _toy_dist():
    return Bernoulli(logits=torch.tensor([0.0], dtype=torch.float64))


def _rebar(scale, temperature):
    est = gk.discrete.REBAR().double()
    with torch.no_grad():  # set in float64 (the constructor rounds through float32)
        est.scale.fill_(scale)
        est.log_temperature.fill_(math.log(temperature))
    return est


def _rebar_variance(scale, temperature, seed=3):
    est = _rebar(scale, temperature).eval()
    g = est(_toy, _toy_dist(), 50_000, generator=torch.Generator().manual_seed(seed))["logits"]
    return (g**2).mean().item()


def test_rebar_variance_gradient_matches_finite_differences():
    est = _rebar(1.0, 0.5)
    assert est.tuning
    est(_toy, _toy_dist(), 50_000, generator=torch.Generator().manual_seed(3))
    h = 1e-4
    # the same random numbers at every point, so the difference is the derivative itself
    by_scale = (_rebar_variance(1 + h, 0.5) - _rebar_variance(1 - h, 0.5)) / (2 * h)
    by_log_t = (
        _rebar_variance(1.0, 0.5 * math.exp(h)) - _rebar_variance(1.0, 0.5 * math.exp(-h))
    ) / (2 * h)
    assert est.scale.grad.item() == pytest.approx(by_scale, rel=1e-4)
    assert est.log_temperature.grad.item() == pytest.approx(by_log_t, rel=1e-4)
    assert est.temperature.item() == pytest.approx(0.5)


def test_relax_variance_gradient_matches_finite_differences():
    surrogate = torch.nn.Linear(1, 1).double()

    def variance_at(bias, grad=False):
        net = torch.nn.Linear(1, 1).double()
        net.load_state_dict(surrogate.state_dict())
        with torch.no_grad():
            net.bias.fill_(bias)
        est = gk.discrete.RELAX(net)
        if not grad:
            est.eval()
        g = est(_toy, _toy_dist(), 50_000, generator=torch.Generator().manual_seed(5))["logits"]
        return (g**2).mean().item(), net

    _, net = variance_at(0.1, grad=True)
    h = 1e-5
    numeric = (variance_at(0.1 + h)[0] - variance_at(0.1 - h)[0]) / (2 * h)
    assert net.bias.grad.item() == pytest.approx(numeric, rel=1e-4)
    assert net.weight.grad is not None


def test_trained_relax_beats_the_plain_score_function():
    # c(z) = 0 at the start: RELAX is then the score function without a baseline
    torch.manual_seed(0)
    est = gk.discrete.RELAX().double()
    opt = torch.optim.Adam(est.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        opt.zero_grad()
        est(_toy, _toy_dist(), 64, generator=gen)
        opt.step()
    est.eval()
    dist = _toy_dist()
    rows = {
        "relax": est(_toy, dist, 40_000, generator=torch.Generator().manual_seed(1))["logits"],
        "sf": gk.ESTIMATORS["score_function"](
            _toy, dist, 40_000, generator=torch.Generator().manual_seed(1)
        )["logits"],
    }
    # the untrained variance is about 0.016; a learned constant alone removes most of it
    assert rows["relax"].var() < 0.25 * rows["sf"].var()
    exact = 0.25 * (1 - 2 * TOY)
    assert_unbiased(rows["relax"], torch.tensor([exact], dtype=torch.float64))


def test_a_trainable_rebar_learns_through_expectation_and_the_registered_one_is_fixed():
    logits = torch.zeros(4, requires_grad=True)
    est = gk.discrete.REBAR()
    value = gk.expectation(_toy, Bernoulli(logits=logits), 8, estimator=est, plate=True)
    value.sum().backward()
    assert logits.grad is not None and est.scale.grad is not None
    assert est.log_temperature.grad is not None
    fixed = gk.ESTIMATORS["rebar"]
    assert not fixed.tuning and fixed.scale.item() == 1.0
    gk.expectation(
        _toy, Bernoulli(logits=logits), 8, estimator="rebar", plate=True
    ).sum().backward()
    assert fixed.scale.grad is None
    assert isinstance(gk.ESTIMATORS["relax"].surrogate, gk.discrete.AdditiveSurrogate)


def test_rebar_and_relax_refuse_what_they_cannot_do():
    cat = Categorical(logits=torch.zeros(3))
    with pytest.raises(ValueError, match="REBAR evaluates f at relaxed points.*OneHotCategorical"):
        gk.ESTIMATORS["rebar"](lambda z: z.float(), cat, 4)
    with pytest.raises(ValueError, match="supports Bernoulli"):
        gk.ESTIMATORS["relax"](lambda x: x, Normal(torch.zeros(2), 1.0), 4)
    with pytest.raises(ValueError, match="temperature must be positive"):
        gk.discrete.REBAR(temperature=0.0)
    with pytest.raises(TypeError, match="surrogate must be a torch.nn.Module"):
        gk.discrete.RELAX(surrogate=3)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        gk.discrete.AdditiveSurrogate(hidden=0)
    batch = Bernoulli(logits=torch.zeros(5))
    wrong = gk.discrete.RELAX(lambda z: z.sum(-1)).eval()  # one value per sample, not per element
    with pytest.raises(ValueError, match=r"surrogate returned \(4,\).*shape \(4, 5\)"):
        wrong(lambda z: z, batch, 4, plate=True)


def test_relax_runs_on_categorical_indices_and_its_surrogate_sees_perturbed_logits():
    seen = []

    def surrogate(z):
        seen.append(tuple(z.shape))
        return z.sum(-1)

    est = gk.discrete.RELAX(surrogate)
    table = torch.tensor([1.0, -2.0, 0.5])
    rows = est(lambda k: table[k], Categorical(logits=torch.zeros(2, 3)), 6, plate=True)
    assert rows["logits"].shape == (6, 2, 3)
    assert seen == [(6, 2, 3), (6, 2, 3)]


# -- the multi-sample bound: local DisARM against VIMCO ----------------------------------------


def _log_weight(z):
    w = torch.tensor([1.5, -2.0], dtype=z.dtype)
    return torch.sin(2 * (z * w).sum(-1)) + 0.5 * z[..., 0] * z[..., 1]


def _exact_bound_gradient(logits, k):
    """d/dlogits E[log mean_k exp f(b_k)], every joint state of the K draws enumerated."""
    leaf = logits.clone().requires_grad_()
    p = leaf.sigmoid()
    d = logits.shape[-1]
    states = torch.tensor(
        list(itertools.product([0.0, 1.0], repeat=d * k)), dtype=logits.dtype
    ).reshape(-1, k, d)
    log_p = (states * p.log() + (1 - states) * torch.log1p(-p)).sum((-1, -2))
    bound = torch.logsumexp(_log_weight(states.transpose(0, 1)), 0) - math.log(k)
    return torch.autograd.grad((log_p.exp() * bound).sum(), leaf)[0]


@pytest.mark.parametrize("bound", ["disarm_bound", "vimco"])
def test_multi_sample_bounds_are_unbiased_by_enumeration(bound):
    k, copies = 3, 20_000
    logits = torch.tensor([0.4, -0.8], dtype=torch.float64)
    leaf = logits.expand(copies, 2).clone().requires_grad_()
    q = Independent(Bernoulli(logits=leaf), 1)  # independent copies of one problem
    value = getattr(gk, bound)(
        _log_weight, q, k, plate=True, generator=torch.Generator().manual_seed(1)
    )
    value.sum().backward()
    assert_unbiased(leaf.grad, _exact_bound_gradient(logits, k))


def test_local_disarm_has_less_variance_than_vimco():
    logits = torch.tensor([0.4, -0.8], dtype=torch.float64)
    grads = {}
    for bound in ("disarm_bound", "vimco"):
        leaf = logits.expand(5_000, 2).clone().requires_grad_()
        q = Independent(Bernoulli(logits=leaf), 1)
        gen = torch.Generator().manual_seed(2)
        getattr(gk, bound)(_log_weight, q, 3, plate=True, generator=gen).sum().backward()
        grads[bound] = leaf.grad
    assert torch.all(grads["disarm_bound"].var(0) < 0.5 * grads["vimco"].var(0))
    # f's own parameters: the gradient of the bound at the draws, as for VIMCO
    scale = torch.tensor(1.0, requires_grad=True)
    q = Bernoulli(logits=torch.zeros(2))
    gk.disarm_bound(lambda z: scale * z.sum(-1), q, 4).backward()
    assert scale.grad is not None


def test_disarm_bound_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="defined for Bernoulli"):
        gk.disarm_bound(lambda z: z, Normal(torch.zeros(2), 1.0), 4)
    with pytest.raises(ValueError, match="K >= 2 draws"):
        gk.disarm_bound(lambda z: z, Bernoulli(logits=torch.zeros(2)), 1)
    with pytest.raises(ValueError, match="plate=True declares"):
        gk.disarm_bound(lambda z: z.sum(-1), Bernoulli(logits=torch.zeros(2)), 4, plate=True)


def _fixed_rebar(scale):
    est = gk.discrete.REBAR(scale=scale)
    return est.requires_grad_(False)


@pytest.mark.parametrize("name", ["rebar", "rebar_off", "relax"])
def test_the_leave_one_out_baseline_keeps_rebar_and_relax_unbiased_and_helps(name):
    logits = torch.tensor([0.4, -1.1, 0.7], dtype=torch.float64)
    leaf = logits.clone().requires_grad_()
    p = leaf.sigmoid()
    # f = 10 + z0 z1 + z2: a large offset, which only a baseline removes
    (exact,) = torch.autograd.grad(10 + p[0] * p[1] + p[2], leaf)

    def cost(z):
        return 10 + z[..., 0] * z[..., 1] + z[..., 2]

    dist = Bernoulli(logits=logits)
    # REBAR's own control variate f(sigma(z / lambda)) already carries the offset; with its
    # scale at zero it is the score function, which the baseline helps
    est = _fixed_rebar(0.0) if name == "rebar_off" else gk.ESTIMATORS[name]
    rows = {
        loo: est(cost, dist, 8, leave_one_out=loo, generator=torch.Generator().manual_seed(4))
        for loo in (False, True)
    }
    many = est(cost, dist, 40_000, leave_one_out=True, generator=torch.Generator().manual_seed(5))
    assert_unbiased(many["logits"], exact)
    ratio = rows[True]["logits"].var(0) / rows[False]["logits"].var(0)
    assert torch.all(ratio < (1.5 if name == "rebar" else 0.2))
    with pytest.raises(ValueError, match="at least 2, got 1"):
        est(cost, dist, 1, leave_one_out=True)
    with pytest.raises(TypeError, match="leave_one_out must be True or False"):
        est(cost, dist, 4, leave_one_out="yes")


def test_importing_gradkit_leaves_the_global_random_stream_alone():
    import subprocess
    import sys

    code = "import torch; torch.manual_seed(0); {}; print(torch.rand(1).item())"
    out = [
        subprocess.run(
            [sys.executable, "-c", code.format(extra)], capture_output=True, text=True, check=True
        ).stdout
        for extra in ("pass", "import gradkit")
    ]
    assert out[0] == out[1]


def test_a_control_variate_copy_does_not_tune_the_estimator():
    est = gk.discrete.REBAR().double()
    problem = est.problem(
        _toy, _toy_dist(), 16, plate=False, generator=torch.Generator().manual_seed(0), options={}
    )
    est.estimate(problem.with_signal(lambda x, lead: problem.cost(x, lead) * 0.5))
    assert est.scale.grad is None
    est.estimate(problem)
    assert est.scale.grad is not None
