"""The contextual bandit and its REINFORCE learner (gradkit/models/bandit.py).

Statistical tests compare Monte Carlo estimates with exact values (the bandit has finitely many
contexts, so the expected return and its gradient are finite sums) at the seed fixed in
conftest.py, with tolerances of a few standard errors.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gradkit as gk
from compendium.bandit_studies import compare_baselines, return_curves
from gradkit.models.bandit import (
    BASELINES,
    ContextualBandit,
    PolicyNetwork,
    exact_policy_gradient,
    make_baseline,
    policy_gradients,
    surrogate_return,
    train_reinforce,
)
from tests.stats import Z


@pytest.fixture
def small():
    bandit = ContextualBandit(num_contexts=6, num_features=3, num_arms=4, seed=1)
    policy = PolicyNetwork(3, 4, hidden=3)
    return bandit, policy


def test_bandit_is_reproducible_and_dtype_independent():
    a = ContextualBandit(num_contexts=5, num_features=2, num_arms=3, seed=7)
    b = ContextualBandit(num_contexts=5, num_features=2, num_arms=3, seed=7)
    c = ContextualBandit(num_contexts=5, num_features=2, num_arms=3, seed=8)
    d = ContextualBandit(num_contexts=5, num_features=2, num_arms=3, seed=7, dtype=torch.float64)
    assert torch.equal(a.means, b.means) and not torch.equal(a.means, c.means)
    assert d.means.dtype == torch.float64 and d.features.dtype == torch.float64
    torch.testing.assert_close(d.means.float(), a.means)
    assert bool(((a.means > 0) & (a.means < 1)).all())
    assert (a.num_contexts, a.num_arms) == (5, 3)
    moved = a.to(torch.float64)
    assert moved.means.dtype == torch.float64


def test_exact_returns(small):
    bandit, _ = small
    zero = lambda features: torch.zeros(features.shape[0], bandit.num_arms)  # noqa: E731
    torch.testing.assert_close(bandit.expected_return(zero), bandit.uniform_return())
    greedy = lambda features: 1e4 * bandit.means  # noqa: E731
    torch.testing.assert_close(bandit.expected_return(greedy), bandit.optimal_return())
    assert bandit.optimal_return() >= bandit.expected_return(lambda f: torch.randn(6, 4))


def test_rewards_are_bernoulli_with_the_mean_reward(small):
    bandit, _ = small
    contexts = torch.tensor([0, 3, 5])
    actions = torch.tensor([1, 0, 3]).expand(40_000, 3)
    rewards = bandit.reward(contexts, actions)
    assert rewards.shape == (40_000, 3) and set(rewards.unique().tolist()) <= {0.0, 1.0}
    p = bandit.means[contexts, actions[0]]
    se = (p * (1 - p) / 40_000).sqrt()
    assert bool(((rewards.mean(0) - p).abs() < 4 * se).all())
    assert torch.equal(bandit.mean_reward(contexts, actions[:2].float()), p.expand(2, 3))


def test_surrogate_value_is_the_expected_return(small):
    bandit, policy = small
    contexts = torch.arange(6).repeat(2_000)
    n = contexts.numel() * 4
    value = surrogate_return(bandit, policy, contexts, num_samples=4)
    exact = bandit.expected_return(policy)
    assert abs(float(value.detach() - exact.detach())) < 4 * 0.5 / math.sqrt(n)  # reward sd <= 1/2


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_reinforce_gradient_is_unbiased(small, name):
    bandit, policy = small
    contexts = torch.arange(6).repeat(20)  # each estimate averages 20 copies of every context
    grads = policy_gradients(
        bandit, policy, make_baseline(name), repeats=200, num_samples=4, warmup=5, contexts=contexts
    )
    exact = exact_policy_gradient(bandit, policy)
    # Along the exact gradient, and per coordinate.
    direction = exact / exact.norm()
    along = grads @ direction
    se = along.std() / math.sqrt(along.numel())
    assert abs(float(along.mean() - exact.norm())) < 4 * se
    summary = gk.diagnostics.summarize({"w": grads}, exact={"w": exact})["w"]
    assert float(summary.z_score.abs().max()) < Z  # 31 coordinates


def test_the_contexts_are_declared_a_plate(small, monkeypatch):
    bandit, policy = small
    monkeypatch.setattr(gk.registry, "_hinted", set())  # the hint is issued once per process
    with warnings.catch_warnings():
        warnings.simplefilter("error", gk.PlateHint)
        surrogate_return(bandit, policy, torch.arange(6), 4, make_baseline("loo")).backward()


def test_baselines_reduce_the_gradient_variance(small):
    bandit, policy = small
    variance = {
        name: gk.diagnostics.gradient_variance(
            policy_gradients(bandit, policy, make_baseline(name), repeats=100, warmup=5)
        )
        for name in BASELINES
    }
    assert variance["loo"] < 0.8 * variance["none"]
    assert variance["ema"] < 0.8 * variance["none"]


def test_training_approaches_the_optimal_return():
    bandit = ContextualBandit(num_contexts=16, num_features=4, num_arms=5)
    runs = compare_baselines(bandit, ["loo"], steps=150, batch_size=16, num_samples=4, lr=0.05)
    run = runs["loo"][0]
    returns = run.column("expected_return")
    assert run.steps == list(range(151)) and run.label == "leave-one-out"
    assert abs(returns[0] - float(bandit.uniform_return())) < 0.1
    gap = float(bandit.optimal_return() - bandit.uniform_return())
    optimal = float(bandit.optimal_return())
    assert run[-1]["regret"] == pytest.approx(optimal - returns[-1])
    assert run[-1]["regret"] < 0.25 * gap
    assert returns[-1] <= optimal + 1e-6 and run[-1]["seconds"] > 0
    curves = return_curves(runs)
    assert curves["loo"].shape == (1, 151) and curves["loo"][0, -1].item() == returns[-1]


def test_return_curves_refuse_runs_recorded_at_different_steps(small):
    bandit, policy = small
    short = train_reinforce(bandit, policy, steps=2)
    sparse = train_reinforce(bandit, policy, steps=4, eval_every=2)
    with pytest.raises(ValueError, match="'loo' were recorded at different steps"):
        return_curves({"loo": [short, sparse]})


def test_float64_follows_through():
    bandit = ContextualBandit(8, 3, 4, dtype=torch.float64)
    policy = PolicyNetwork(3, 4, hidden=4, dtype=torch.float64)
    value = surrogate_return(
        bandit, policy, bandit.sample_contexts(5), 3, gk.baselines.LeaveOneOut()
    )
    value.backward()
    assert value.dtype == torch.float64
    assert all(p.grad.dtype == torch.float64 for p in policy.parameters())
    run = train_reinforce(bandit, policy, steps=3, batch_size=4)
    assert run.model is policy and run.steps == [0, 1, 2, 3]
    assert exact_policy_gradient(bandit, policy).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda():
    bandit = ContextualBandit(8, 3, 4, device="cuda")
    policy = PolicyNetwork(3, 4, hidden=4, device="cuda")
    run = train_reinforce(bandit, policy, steps=3, batch_size=4, baseline=make_baseline("loo"))
    assert len(run.step_seconds) == 3 and isinstance(run[-1]["expected_return"], float)
    assert next(policy.parameters()).device.type == "cuda"


def test_bad_environments():
    with pytest.raises(ValueError, match="num_contexts must be a positive int"):
        ContextualBandit(num_contexts=0)
    with pytest.raises(ValueError, match="at least 2 arms"):
        ContextualBandit(num_arms=1)
    with pytest.raises(ValueError, match="sharpness must be positive"):
        ContextualBandit(sharpness=0.0)
    with pytest.raises(TypeError, match="floating dtype"):
        ContextualBandit(dtype=torch.int64)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        PolicyNetwork(3, 4, hidden=0)


def test_bad_indices(small):
    bandit, _ = small
    with pytest.raises(ValueError, match=r"actions must hold arm indices in \[0, 4\)"):
        bandit.reward(torch.tensor([0]), torch.tensor([[4]]))
    with pytest.raises(ValueError, match="contexts must hold context indices"):
        bandit.reward(torch.tensor([-1]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="whole numbers"):
        bandit.reward(torch.tensor([0]), torch.tensor([[0.5]]))
    with pytest.raises(TypeError, match="contexts must be a tensor"):
        bandit.reward([0], torch.tensor([[0]]))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        bandit.sample_contexts(0)
    with pytest.raises(ValueError, match=r"logits of shape \(6, 4\)"):
        bandit.expected_return(lambda features: torch.zeros(6, 3))


def test_bad_training_arguments(small):
    bandit, policy = small
    with pytest.raises(ValueError, match="lr must be positive"):
        train_reinforce(bandit, policy, lr=0.0)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train_reinforce(bandit, policy, steps=0)
    with pytest.raises(ValueError, match="share device and dtype"):
        train_reinforce(bandit, PolicyNetwork(3, 4, dtype=torch.float64), steps=1)
    with pytest.raises(TypeError, match="baseline must be None or a gradkit.baselines.Baseline"):
        surrogate_return(bandit, policy, torch.arange(2), 4, baseline="loo")
    with pytest.raises(ValueError, match="at least 2 samples"):
        surrogate_return(bandit, policy, torch.arange(2), 1, baseline=gk.baselines.LeaveOneOut())
    with pytest.raises(ValueError, match="unknown baseline 'mean'"):
        make_baseline("mean")
    with pytest.raises(ValueError, match=r"unknown baseline\(s\) \['mean'\]"):
        compare_baselines(bandit, ["mean"])
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        policy_gradients(bandit, policy, repeats=0)
    with pytest.raises(ValueError, match="warmup must be a non-negative int"):
        policy_gradients(bandit, policy, warmup=-1)
