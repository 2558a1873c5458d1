"""Bayesian logistic regression: data, likelihood, KL, ELBO and its gradients.

On a tiny two-feature problem the expected log-likelihood is a 2-D Gaussian integral, done by
quadrature; autograd through it gives the exact gradient with respect to the posterior's means
and scales. Every estimator (and control variate) must match it within a few standard errors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

import gradkit as gk
from gradkit import quadrature
from gradkit.models import logistic as L
from tests.stats import Z, assert_unbiased

X = torch.tensor([[1.0, 0.5], [1.0, -1.2], [1.0, 2.0], [1.0, 0.1], [1.0, -0.7], [1.0, 1.3]])
Y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])


def tiny_model() -> L.BayesianLogisticRegression:
    model = L.BayesianLogisticRegression(2, prior_scale=1.5)
    with torch.no_grad():
        model.loc.copy_(torch.tensor([0.2, 0.8]))
        model.raw_scale.copy_(torch.tensor([-0.5, 0.3]))
    return model


def exact_gradient(model) -> dict[str, torch.Tensor]:
    """d/d(loc, scale) of E_q[log p(y | X, w)] by 2-D quadrature and autograd."""
    loc = model.loc.detach().double().requires_grad_()
    scale = model.scale.detach().double().requires_grad_()
    value = quadrature.gaussian_expectation(
        lambda w: model.log_likelihood(w, X.double(), Y.double()), loc, scale, num_nodes=96
    )
    g_loc, g_scale = torch.autograd.grad(value, [loc, scale])
    return {"loc": g_loc.float(), "scale": g_scale.float()}


def test_data():
    data = L.load_breast_cancer_data(test_fraction=0.25, seed=1, dtype=torch.float64)
    assert data.train_x.shape[1] == 31 and data.train_x.dtype == torch.float64
    assert len(data.train_y) + len(data.test_y) == 569
    torch.testing.assert_close(
        data.train_x[:, 0], torch.ones(len(data.train_y), dtype=torch.float64)
    )
    torch.testing.assert_close(data.train_x[:, 1:].mean(0), torch.zeros(30, dtype=torch.float64))
    torch.testing.assert_close(data.train_x[:, 1:].std(0), torch.ones(30, dtype=torch.float64))
    assert set(data.test_y.tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="test_fraction"):
        L.load_breast_cancer_data(test_fraction=1.0)


def test_log_likelihood_and_kl_against_torch():
    model = tiny_model()
    w = torch.randn(7, 2)
    want = Bernoulli(logits=w @ X.T).log_prob(Y).sum(-1)
    torch.testing.assert_close(model.log_likelihood(w, X, Y), want)
    q = Normal(model.loc, model.scale)
    prior = Normal(torch.zeros(2), torch.full((2,), 1.5))
    torch.testing.assert_close(model.kl(), kl_divergence(q, prior).sum())
    assert model.log_likelihood(torch.randn(3, 4, 2), X, Y).shape == (3, 4)


def test_pathwise_elbo_and_gradient_equal_autograd_on_the_same_draws():
    model = tiny_model()
    torch.manual_seed(3)
    elbo = model.elbo(X, Y, 5)
    elbo.backward()
    torch.manual_seed(3)
    loc = model.loc.detach().clone().requires_grad_()
    raw = model.raw_scale.detach().clone().requires_grad_()
    w = Normal(loc, torch.nn.functional.softplus(raw)).rsample((5,))
    q = Normal(loc, torch.nn.functional.softplus(raw))
    manual = (
        model.log_likelihood(w, X, Y).mean()
        - kl_divergence(q, Normal(torch.zeros(2), torch.full((2,), 1.5))).sum()
    )
    manual.backward()
    torch.testing.assert_close(elbo, manual)
    torch.testing.assert_close(model.loc.grad, loc.grad)
    torch.testing.assert_close(model.raw_scale.grad, raw.grad)


CONFIGS = {
    "pathwise": ("pathwise", {}),
    "score_function": ("score_function", {}),
    "score_function+ema": (
        "score_function",
        {"baseline": gk.baselines.ExponentialMovingAverage(0.0)},
    ),
    "score_function+delta": (
        "score_function",
        {"control_variate": gk.control_variates.DeltaMethod()},
    ),
    "pathwise+delta": ("pathwise", {"control_variate": gk.control_variates.DeltaMethod()}),
    "measure_valued": ("measure_valued", {}),
    "measure_valued+delta": (
        "measure_valued",
        {"control_variate": gk.control_variates.DeltaMethod()},
    ),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_estimator_matches_the_exact_gradient(config):
    estimator, options = CONFIGS[config]
    model = tiny_model()
    exact = exact_gradient(model)
    g = L.gradient_estimates(model, X, Y, 40_000, estimator=estimator, **options)
    assert_unbiased(g, exact, atol=1e-6)


def test_elbo_backward_gives_the_estimators_gradient():
    model = tiny_model()
    exact = exact_gradient(model)
    n = 40_000
    g = L.gradient_estimates(model, X, Y, n, estimator="score_function")
    model.elbo(X, Y, n, estimator="score_function").backward()
    # d ELBO / d loc = estimate of d E[log lik] / d loc - d KL / d loc, KL'(m) = m / tau^2
    se = g["loc"].std(0) / math.sqrt(n)
    want = exact["loc"] - model.loc.detach() / 1.5**2
    assert torch.all((model.loc.grad - want).abs() <= Z * se)


def test_gradient_estimates_read_a_moving_average_without_updating_it():
    model = tiny_model()
    ema = gk.baselines.ExponentialMovingAverage(0.5)
    ema.update(torch.full((4,), -3.0))  # a history: the baseline is -3, not 0
    before = copy.deepcopy(vars(ema))
    g = L.gradient_estimates(
        model, X, Y, 4, estimator="score_function", baseline=ema,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert vars(ema) == before
    want = L.gradient_estimates(
        model, X, Y, 4, estimator="score_function", baseline=-3.0,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    for name in ("loc", "scale"):
        torch.testing.assert_close(g[name], want[name])


def test_training_updates_a_moving_average_once_per_step():
    ema = gk.baselines.ExponentialMovingAverage(0.9)
    L.train(
        L.LogisticData(X, Y, X, Y), estimator="score_function", options={"baseline": ema},
        steps=3, eval_every=1, eval_samples=8, variance_samples=8, progress=False,
    )  # fmt: skip
    assert ema.steps == 3  # the four variance measurements read it without updating it


def test_training_raises_the_elbo():
    data = L.LogisticData(X, Y, X, Y)
    run = L.train(
        data,
        estimator="pathwise",
        steps=60,
        lr=0.05,
        eval_every=30,
        eval_samples=64,
        variance_samples=16,
        progress=False,
    )
    assert run.steps == [0, 30, 60] and len(run.column("loc_variance")) == 3
    assert run[-1]["elbo"] > run[0]["elbo"]
    assert 0.0 <= run[-1]["test_accuracy"] <= 1.0 and run[-1]["seconds"] > 0
    assert len(run.step_seconds) == 60 and min(run.step_seconds) > 0
    assert sum(run.step_seconds) == pytest.approx(run[-1]["seconds"])
    assert isinstance(run.model, L.BayesianLogisticRegression) and run.label == "pathwise"


def test_errors():
    data = L.LogisticData(X, Y, X, Y)
    with pytest.raises(ValueError, match="unknown estimator"):
        L.train(data, estimator="reinforce", progress=False)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        L.train(data, estimator="pathwise", steps=0, progress=False)
    with pytest.raises(ValueError, match="unknown estimator"):
        L.gradient_estimates(tiny_model(), X, Y, 4, estimator="reinforce")
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        L.BayesianLogisticRegression(0)
    with pytest.raises(ValueError, match="must be positive"):
        L.BayesianLogisticRegression(2, prior_scale=0.0)
    with pytest.raises(ValueError, match=r"features \(6, 2\) must be \(N, D\) with D = 3"):
        L.BayesianLogisticRegression.log_likelihood(torch.zeros(4, 3), X, Y)
    with pytest.raises(ValueError, match="labels"):
        L.BayesianLogisticRegression.log_likelihood(torch.zeros(4, 2), X, Y[:3])
