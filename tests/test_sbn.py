"""The sigmoid-belief-net VAE (gradkit.models.sbn).

Exactness is checked by enumeration on a model small enough to sum its latent states (3
latents, 4 pixels): the ELBO and its gradient, including the entropy term that the learning
signal treats as a constant, and log p(x) for the multi-sample bound. Statistical checks use
the one tolerance rule of tests/stats.py.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Independent

import gradkit as gk
import gradkit.data
from compendium import sbn_studies
from gradkit.models import sbn
from gradkit.models.sbn import SBNVAE
from tests.stats import Z, assert_unbiased

# ---------------------------------------------------------------------------------------------
# Helpers: a tiny model, its exact ELBO and evidence, synthetic data from a random SBN
# ---------------------------------------------------------------------------------------------


def tiny(variant: str = "linear") -> SBNVAE:
    model = SBNVAE(x_dim=4, z_dim=3, variant=variant, hidden_dim=5).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
        model.input_mean.copy_(torch.tensor([0.2, 0.5, 0.1, 0.7], dtype=torch.float64))
    return model


TINY_X = torch.tensor(
    [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64
)


def states(k: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=k)), dtype=torch.float64)


def exact(model: SBNVAE, x: torch.Tensor, logits: torch.Tensor | None = None):
    """Exact ELBO and log p(x) per data point by summing the 2^K latent states."""
    zs = states(model.z_dim)[:, None, :].expand(-1, len(x), -1)  # (2^K, B, K)
    if logits is None:
        logits = model.encoder(x - model.input_mean)
    log_q = Independent(Bernoulli(logits=logits), 1).log_prob(zs)
    log_joint = Independent(Bernoulli(logits=model.prior_logits), 1).log_prob(zs) + Independent(
        Bernoulli(logits=model.decoder(zs)), 1
    ).log_prob(x)
    elbo = (log_q.exp() * (log_joint - log_q)).sum(0)
    return elbo, torch.logsumexp(log_joint, 0)


def synthetic(n: int, x_dim: int = 64, z_dim: int = 10, seed: int = 0) -> torch.Tensor:
    """Binary images drawn from a random sigmoid belief net with strong weights."""
    g = torch.Generator().manual_seed(seed)
    weights = 3.0 * torch.randn(z_dim, x_dim, generator=g)
    bias = torch.randn(x_dim, generator=g) - 1.0
    z = torch.bernoulli(torch.full((n, z_dim), 0.3), generator=g)
    return torch.bernoulli(torch.sigmoid(z @ weights + bias), generator=g)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["linear", "nonlinear"])
def test_shapes_of_both_variants(variant):
    model = SBNVAE(x_dim=64, variant=variant)
    linears = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    decoder = [m for m in model.decoder if isinstance(m, torch.nn.Linear)]
    if variant == "linear":
        assert [(m.in_features, m.out_features) for m in linears] == [(64, 200)]
        assert [(m.in_features, m.out_features) for m in decoder] == [(200, 64)]
    else:
        assert [(m.in_features, m.out_features) for m in linears] == [
            (64, 200),
            (200, 200),
            (200, 200),
        ]
        assert [(m.in_features, m.out_features) for m in decoder] == [
            (200, 200),
            (200, 200),
            (200, 64),
        ]
        slopes = [m.negative_slope for m in model.encoder if isinstance(m, torch.nn.LeakyReLU)]
        assert slopes == [0.3, 0.3]
    assert model.prior_logits.shape == (200,)
    x = torch.bernoulli(torch.full((5, 64), 0.3))
    q = model.posterior(x)
    assert tuple(q.batch_shape) == (5,) and tuple(q.event_shape) == (200,)
    z = q.sample((7,))
    assert model.decode(z).shape == (7, 5, 64)
    assert model.log_weights(x, z).shape == (7, 5)
    assert model.sample(3).shape == (3, 64) and model.reconstruct(x).shape == (5, 64)


def test_input_mean_centres_the_encoder():
    model = SBNVAE(x_dim=4, z_dim=3)
    data = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    model.set_input_mean(data)
    assert torch.equal(model.input_mean, torch.tensor([1.0, 0.5, 0.5, 0.0]))
    expected = model.encoder[0](data - model.input_mean)
    assert torch.allclose(model.encode(data), expected)


@pytest.mark.parametrize("variant", ["linear", "nonlinear"])
def test_elbo_equals_the_enumerated_elbo(variant):
    model = tiny(variant)
    exact_elbo, log_px = exact(model, TINY_X)
    with torch.no_grad():
        z = model.posterior(TINY_X).sample((20_000,))
        rows = model.log_weights(TINY_X, z)  # (S, B)
    assert_unbiased(rows, exact_elbo)
    assert bool((exact_elbo < log_px).all())
    # the training objective's value is the same Monte Carlo mean, for every estimator
    se = rows.std(0) / math.sqrt(20_000)
    for name in ("disarm", "score_function"):
        value = sbn.elbo(model, TINY_X, estimator=name, num_samples=20_000, generator=gen(1))
        assert bool(((value.detach() - exact_elbo).abs() <= Z * se).all()), name


@pytest.mark.parametrize("name", ["disarm", "score_function", "rebar"])
def test_detached_entropy_gives_the_exact_elbo_gradient(name):
    # f treats log q as a constant; the estimators' mean must still be the gradient of the
    # exact ELBO, entropy included (E[grad log q] = 0)
    model = tiny()
    logits = model.encode(TINY_X).detach().requires_grad_(True)
    exact_elbo, _ = exact(model, TINY_X, logits)
    (exact_grad,) = torch.autograd.grad(exact_elbo.sum(), logits)
    q = Independent(Bernoulli(logits=logits.detach()), 1)
    rows = gk.ESTIMATORS[name](
        lambda z: model.log_weights(TINY_X, z, logits),
        q,
        20_000,
        plate=True,
        generator=gen(2),
    )["logits"]
    assert_unbiased(rows, exact_grad)


def test_heldout_bound_rises_to_log_px_from_below():
    model = tiny()
    x = TINY_X.repeat(20, 1)
    _, log_px = exact(model, x)
    target = float(log_px.detach().mean())
    bounds = {k: sbn.heldout_bound(model, x, k, generator=gen(3)) for k in (1, 10, 2000)}
    exact_elbo, _ = exact(model, x)
    assert abs(bounds[1] - float(exact_elbo.detach().mean())) < 0.5  # one sample: the ELBO
    assert bounds[1] < bounds[10] < bounds[2000] <= target + 1e-3
    assert target - bounds[2000] < 0.01
    # batched passes estimate the same bound
    batched = sbn.heldout_bound(model, x, 2000, generator=gen(3), batch_size=7)
    assert abs(batched - target) < 0.01


# ---------------------------------------------------------------------------------------------
# Cost rule
# ---------------------------------------------------------------------------------------------


def test_num_samples_for_arithmetic():
    assert sbn.evaluations_per_sample("rebar") == 3
    assert sbn.evaluations_per_sample(gk.ESTIMATORS["disarm"]) == 1
    assert sbn.evaluations_per_sample(gk.discrete.REBAR()) == 3  # unregistered instance
    cases = {
        ("disarm", 2): 2,
        ("disarm", 5): 4,
        ("arm", 7): 6,
        ("score_function", 2): 2,
        ("score_function", 5): 5,
        ("rebar", 6): 2,
        ("rebar", 7): 2,
        ("rebar", 3): 1,
        ("relax", 4): 4,
        ("straight_through", 1): 1,
        ("gumbel_rao", 3): 3,
        ("unordered_set", 4): 4,
    }
    for (name, budget), expected in cases.items():
        assert sbn.num_samples_for(name, budget) == expected, (name, budget)


@pytest.mark.parametrize("name", ["disarm", "score_function", "straight_through", "rebar"])
def test_recorded_decoder_passes_follow_the_rule(name):
    model = SBNVAE(x_dim=16, z_dim=6)
    x = torch.bernoulli(torch.full((50, 16), 0.4))
    num = sbn.num_samples_for(name, 6)
    records = sbn.train_sbn(
        model,
        x,
        estimator=name,
        steps=2,
        evaluations=6,
        batch_size=10,
        variance_repeats=0,
        progress=False,
    )
    assert records[-1]["decoder_evaluations"] == 2 * num * sbn.evaluations_per_sample(name)
    assert records[-1]["decoder_evaluations"] <= 2 * 6
    default = sbn.train_sbn(
        model, x, estimator=name, steps=1, batch_size=10, variance_repeats=0, progress=False
    )
    assert default[-1]["decoder_evaluations"] == (3 if name == "rebar" else 2)


def test_score_function_gets_the_leave_one_out_baseline():
    options = sbn.estimator_options("score_function")
    assert isinstance(options["baseline"], gk.baselines.LeaveOneOut)
    assert sbn.estimator_options("score_function", baseline=None) == {"baseline": None}
    assert sbn.estimator_options("disarm") == {}


# ---------------------------------------------------------------------------------------------
# Gradient variance
# ---------------------------------------------------------------------------------------------


def test_encoder_gradients_are_training_step_gradients():
    # enumeration is exact: every repeat equals the gradient of the exact loss, variance 0
    model = tiny()
    grads = sbn._encoder_gradients(
        model, TINY_X, gk.ESTIMATORS["enumerate"], 1, 4, gen(4), options={}
    )
    exact_elbo, _ = exact(model, TINY_X)
    params = list(model.encoder.parameters())
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(-exact_elbo.mean(), params)])
    assert grads.shape == (4, expected.numel())
    assert torch.allclose(grads, expected.expand_as(grads), atol=1e-10)
    variance = sbn.encoder_gradient_variance(model, TINY_X, "enumerate", 1, 4)
    assert variance < 1e-20
    # and the model's own gradients are left alone
    assert all(p.grad is None for p in model.parameters())


def test_gradient_variance_falls_with_more_samples():
    model = tiny()
    v2 = sbn.encoder_gradient_variance(model, TINY_X, "disarm", 2, 400, generator=gen(5))
    v8 = sbn.encoder_gradient_variance(model, TINY_X, "disarm", 8, 400, generator=gen(5))
    assert v8 < v2 / 2  # 1/S: a quarter, up to the variance estimates' own noise
    again = sbn.encoder_gradient_variance(model, TINY_X, "disarm", 2, 400, generator=gen(5))
    assert again == v2


def test_module_estimators_are_measured_frozen_and_trained_in_the_optimiser():
    model = SBNVAE(x_dim=16, z_dim=6)
    x = torch.bernoulli(torch.full((60, 16), 0.4))
    rebar = gk.discrete.REBAR()
    sbn.encoder_gradient_variance(model, x[:10], rebar, 2, 3)
    assert rebar.training and all(p.grad is None for p in rebar.parameters())
    start = [p.detach().clone() for p in rebar.parameters()]
    sbn.train_sbn(
        model, x, estimator=rebar, steps=3, batch_size=20, lr=1e-2, num_samples=2, progress=False
    )
    assert all(not torch.equal(a, p) for a, p in zip(start, rebar.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["disarm", "score_function"])
def test_short_training_raises_the_elbo(name):
    data = synthetic(300)
    model = SBNVAE(x_dim=64, z_dim=10)
    records = sbn.train_sbn(
        model,
        data[:250],
        heldout=data[250:],
        estimator=name,
        steps=30,
        eval_every=10,
        lr=3e-3,
        variance_repeats=0,
        progress=False,
    )
    assert [r["step"] for r in records] == [0, 10, 20, 30]
    assert math.isnan(records[0]["train_elbo"])
    assert records[-1]["train_elbo"] > records[1]["train_elbo"] + 1.0
    assert records[-1]["heldout_bound"] > records[0]["heldout_bound"] + 1.0
    assert all(r["seconds"] >= 0 for r in records)


def _numbers(records):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


def test_same_seed_same_records():
    grey = torch.rand(120, 16, generator=gen(6))
    model = SBNVAE(x_dim=16, z_dim=6, variant="nonlinear", hidden_dim=8)

    def run(seed):
        return sbn.train_sbn(
            copy.deepcopy(model),
            grey[:100],
            heldout=grey[100:],
            steps=6,
            eval_every=3,
            batch_size=20,
            variance_repeats=3,
            eval_samples=5,
            dynamic_binarization=True,
            seed=seed,
            progress=False,
        )

    first, second, other = run(0), run(0), run(1)
    assert _numbers(first) == _numbers(second)
    assert _numbers(first) != _numbers(other)
    assert all(math.isfinite(r["gradient_variance"]) for r in first)


def test_training_keeps_dtype_and_leaves_the_global_stream():
    model = SBNVAE(x_dim=16, z_dim=6).double()
    x = torch.bernoulli(torch.full((40, 16), 0.4, dtype=torch.float64))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    records = sbn.train_sbn(
        model, x, heldout=x[:10], steps=2, batch_size=20, variance_repeats=2, progress=False
    )
    assert torch.equal(torch.rand(3), expected)
    assert model.prior_logits.dtype == torch.float64
    assert all(math.isfinite(r["heldout_bound"]) for r in records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda():
    model = SBNVAE(x_dim=64, z_dim=20).cuda()
    data = synthetic(200).cuda()
    records = sbn.train_sbn(
        model,
        data[:150],
        heldout=data[150:],
        steps=10,
        eval_every=5,
        variance_repeats=3,
        progress=False,
    )
    assert all(math.isfinite(r["heldout_bound"]) for r in records)
    again = sbn.train_sbn(
        copy.deepcopy(model), data[:150], steps=2, variance_repeats=0, progress=False
    )
    assert len(again) == 2


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_intensities_threshold_to_the_binarised_digits():
    grey = sbn.load_mnist_intensities(source="digits", seed=3, dtype=torch.float64)
    binary = gradkit.data.load_binarized_mnist(source="digits", seed=3, dtype=torch.float64)
    assert grey.image_shape == (8, 8) and grey.dim == 64 and grey.source == "digits"
    assert 0.0 <= float(grey.train.min()) and float(grey.train.max()) <= 1.0
    assert len(grey.train.unique()) > 2
    assert torch.equal((grey.train > 0.5).double(), binary.train)
    assert torch.equal((grey.test > 0.5).double(), binary.test)
    x = sbn.binarize(grey.train, gen(8))
    assert set(x.unique().tolist()) <= {0.0, 1.0} and x.dtype == torch.float64
    assert torch.equal(x, sbn.binarize(grey.train, gen(8)))


# ---------------------------------------------------------------------------------------------
# Errors name the problem and the fix
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"unknown variant 'deep'.*'linear'.*'nonlinear'"):
        SBNVAE(x_dim=64, variant="deep")
    model = SBNVAE(x_dim=64, z_dim=8)
    with pytest.raises(ValueError, match=r"last dimension 64.*x_dim=63"):
        model.encode(torch.zeros(2, 63))
    grey = torch.full((60, 64), 0.3)
    with pytest.raises(ValueError, match=r"must be binary.*dynamic_binarization=True"):
        sbn.elbo(model, grey)
    with pytest.raises(ValueError, match=r"train must be binary.*binarize"):
        sbn.train_sbn(model, grey, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"heldout must be binary"):
        sbn.train_sbn(model, torch.ones(60, 64), heldout=grey, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"grey levels in \[0, 1\].*divide bytes by 255"):
        sbn.train_sbn(model, 255 * grey, dynamic_binarization=True, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"float64.*model.to"):
        sbn.train_sbn(model, torch.ones(60, 64, dtype=torch.float64), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"not both"):
        sbn.train_sbn(model, torch.ones(60, 64), evaluations=2, num_samples=2, progress=False)
    with pytest.raises(ValueError, match=r"fewer than batch_size=50"):
        sbn.train_sbn(model, torch.ones(10, 64), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"'measure_valued'.*not known.*num_samples="):
        sbn.evaluations_per_sample("measure_valued")
    with pytest.raises(ValueError, match=r"buy 0 sample.*'disarm'.*at least 2 evaluations"):
        sbn.num_samples_for("disarm", 1)
    with pytest.raises(ValueError, match=r"buy 1 sample.*fewer than the 2"):
        sbn.num_samples_for("score_function", 1)
    with pytest.raises(ValueError, match=r"unknown estimator 'nope'"):
        sbn.train_sbn(model, torch.ones(60, 64), estimator="nope", progress=False)
    with pytest.raises(ValueError, match=r"at least 2"):
        sbn.encoder_gradient_variance(model, torch.ones(4, 64), "disarm", 2, 1)
    with pytest.raises(ValueError, match=r"num_samples.*even"):
        sbn.elbo(model, torch.ones(4, 64), estimator="disarm", num_samples=3)


def test_bernoulli_log_prob_matches_torch():
    logits = torch.randn(4, 5, dtype=torch.float64)
    z = torch.bernoulli(torch.sigmoid(logits))
    ours = sbn._bernoulli_log_prob(z, logits)
    assert torch.allclose(ours, Bernoulli(logits=logits).log_prob(z).sum(-1))
    # relaxed points (REBAR evaluates f there): the same linear-in-z formula
    u = torch.rand(4, 5, dtype=torch.float64)
    assert torch.allclose(
        sbn._bernoulli_log_prob(u, logits), (u * logits - F.softplus(logits)).sum(-1)
    )


def test_compare_estimators_trains_every_pair_alike_and_reproducibly():
    data = synthetic(60)
    kwargs = dict(
        estimators=["disarm", "relax"],
        variants=["linear"],
        options={"relax": {"leave_one_out": True}},
        steps=3,
        evaluations=4,
        batch_size=10,
        variance_repeats=2,
        heldout=data[:10],
        progress=False,
    )
    state = torch.random.get_rng_state()
    first = sbn_studies.compare_estimators(data, **kwargs)
    assert torch.equal(state, torch.random.get_rng_state())  # the global stream untouched
    pairs = [(r["variant"], r["estimator"]) for r in first]
    assert list(dict.fromkeys(pairs)) == [("linear", "disarm"), ("linear", "relax")]
    # the same initialisation for both estimators: the step-0 held-out bounds agree (the
    # gradient variances differ, by estimator); a second call repeats every number
    start = [r for r in first if r["step"] == 0]
    assert start[0]["heldout_bound"] == start[1]["heldout_bound"]
    assert start[0]["gradient_variance"] != start[1]["gradient_variance"]
    again = sbn_studies.compare_estimators(data, **kwargs)
    assert _numbers(first) == _numbers(again)
    with pytest.raises(ValueError, match="unknown variant"):
        sbn_studies.compare_estimators(data, variants=["deep"], steps=1)
