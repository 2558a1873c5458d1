"""Stochastic computation graphs (DiCE surrogate) against exact gradients.

Mixed graph: z1 ~ N(mu, sigma) then z2 ~ Bernoulli(sigmoid(a z1 + c)), cost (z1 + z2 - t)^2.
Its expectation is a 1-D Gaussian integral of sum_{z2} p(z2 | z1) f(z1, z2), done by quadrature;
autograd through it gives the exact gradient for all four parameters. Discrete graph: two
categorical stages, enumerated exactly. The per-sample gradients of the surrogate must average
to the exact gradient within a few standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal

from gradkit import quadrature, scg

Z = 4.5
T = 1.2
PARAMS = {"mu": 0.3, "sigma": 0.8, "a": 1.5, "c": -0.5}


def leaves() -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in PARAMS.values()]


def exact_mixed_gradient() -> list[torch.Tensor]:
    mu, sigma, a, c = leaves()

    def h(x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(a * x + c)
        return p * (x + 1 - T) ** 2 + (1 - p) * (x - T) ** 2

    value = quadrature.gaussian_expectation(h, mu, sigma)
    return list(torch.autograd.grad(value, [mu, sigma, a, c]))


def mixed_objective(reparameterize: bool, baseline: float | None = None):
    def objective(mu, sigma, a, c):
        graph = scg.StochasticComputationGraph()
        z1 = graph.sample("z1", Normal(mu, sigma), reparameterize=reparameterize)
        z2 = graph.sample("z2", Bernoulli(logits=a * z1 + c))
        graph.add_cost((z1 + z2 - T) ** 2)
        baselines = None if baseline is None else {"z2": torch.tensor(baseline)}
        return graph.surrogate(baselines=baselines)

    return objective


def assert_unbiased(grads: list[torch.Tensor], exact: list[torch.Tensor]) -> None:
    for g, e in zip(grads, exact, strict=True):
        se = float(g.std()) / math.sqrt(g.shape[0])
        assert abs(float(g.mean()) - float(e)) <= Z * se + 1e-9, (float(g.mean()), float(e), se)


@pytest.mark.parametrize(("reparameterize", "baseline"), [(True, None), (False, None), (True, 1.0)])
def test_mixed_graph_unbiased(reparameterize, baseline):
    exact = exact_mixed_gradient()
    grads = scg.per_sample_estimates(mixed_objective(reparameterize, baseline), leaves(), 100_000)
    assert all(g.shape == (100_000,) and g.dtype == torch.float64 for g in grads)
    assert_unbiased(grads, exact)


def test_pathwise_part_lowers_variance():
    n = 50_000
    mixed = scg.per_sample_estimates(mixed_objective(True), leaves(), n)
    pure = scg.per_sample_estimates(mixed_objective(False), leaves(), n)
    for g_mixed, g_pure in zip(mixed[:2], pure[:2], strict=True):  # mu and sigma
        assert float(g_mixed.var()) < 0.5 * float(g_pure.var())


def test_surrogate_value_is_the_cost():
    torch.manual_seed(1)
    mu, sigma, a, c = leaves()
    graph = scg.StochasticComputationGraph()
    z1 = graph.sample("z1", Normal(mu, sigma), (5,))
    z2 = graph.sample("z2", Bernoulli(logits=a * z1 + c))
    cost = (z1 + z2 - T) ** 2
    graph.add_cost(cost)
    torch.testing.assert_close(graph.surrogate(), cost)


TABLE = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 2.0]], dtype=torch.float64)
EXTRA = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)


def discrete_objective(logits1, logits2):
    graph = scg.StochasticComputationGraph()
    z1 = graph.sample("z1", Categorical(logits=logits1))
    rows = logits2.gather(-2, z1[:, None, None].expand(-1, 1, 1)).squeeze(-1).squeeze(-1)
    z2 = graph.sample("z2", Bernoulli(logits=rows))
    graph.add_cost(TABLE[z1, z2.long()])
    graph.add_cost(EXTRA[z1], depends_on=["z1"])  # does not depend on z2
    return graph.surrogate()


def test_discrete_graph_unbiased_against_enumeration():
    logits1 = torch.tensor([0.2, -0.5, 1.0], dtype=torch.float64, requires_grad=True)
    logits2 = torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    p1 = logits1.softmax(-1)
    p2 = torch.sigmoid(logits2.squeeze(-1))
    expected = (p1 * ((1 - p2) * TABLE[:, 0] + p2 * TABLE[:, 1] + EXTRA)).sum()
    exact = torch.autograd.grad(expected, [logits1, logits2])
    grads = scg.per_sample_estimates(discrete_objective, [logits1, logits2], 100_000)
    for g, e in zip(grads, exact, strict=True):
        se = g.std(0) / math.sqrt(g.shape[0])
        assert torch.all((g.mean(0) - e).abs() <= Z * se), (g.mean(0), e, se)


def test_second_derivative_of_dice_is_unbiased():
    # E[f] = sigmoid(theta) f1 + (1 - sigmoid(theta)) f0 for z ~ Bernoulli(logits=theta)
    f0, f1, theta0, repeats, n = 1.0, 3.0, 0.4, 400, 500
    theta = torch.full((repeats, 1), theta0, dtype=torch.float64, requires_grad=True)
    graph = scg.StochasticComputationGraph()
    z = graph.sample("z", Bernoulli(logits=theta.expand(repeats, n)))
    graph.add_cost(f0 + (f1 - f0) * z)
    estimate = graph.surrogate().mean(1)  # one estimate per repeat
    (first,) = torch.autograd.grad(estimate.sum(), theta, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), theta)
    s = torch.sigmoid(torch.tensor(theta0, dtype=torch.float64))
    exact = (f1 - f0) * s * (1 - s) * (1 - 2 * s)
    se = float(second.std()) / math.sqrt(repeats)
    assert abs(float(second.mean()) - float(exact)) < Z * se


def test_magic_box():
    t = torch.tensor([0.3, -1.0], requires_grad=True)
    box = scg.magic_box(3 * t)
    torch.testing.assert_close(box, torch.ones(2))
    (g,) = torch.autograd.grad(box.sum(), t)
    torch.testing.assert_close(g, torch.full((2,), 3.0))


def test_per_sample_gradients_match_a_loop():
    w = torch.tensor([0.5, -1.0])
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]])
    got = scg.per_sample_estimates(lambda w: torch.sin((x * w).sum(-1)), [w], 3)[0]
    loop = [torch.autograd.functional.jacobian(lambda w, r=r: torch.sin(r @ w), w) for r in x]
    torch.testing.assert_close(got, torch.stack(loop))
    unused = torch.tensor(1.0)
    assert scg.per_sample_estimates(lambda w, u: w.sum(-1), [w, unused], 3)[1].shape == (3,)


def test_errors():
    graph = scg.StochasticComputationGraph()
    with pytest.raises(ValueError, match="no cost"):
        graph.surrogate()
    graph.sample("z", Bernoulli(probs=torch.tensor(0.3)))
    with pytest.raises(ValueError, match="exists already"):
        graph.sample("z", Bernoulli(probs=torch.tensor(0.3)))
    with pytest.raises(ValueError, match="cannot be reparameterised"):
        graph.sample("b", Bernoulli(probs=torch.tensor(0.3)), reparameterize=True)
    with pytest.raises(TypeError, match="Distribution"):
        graph.sample("n", 3.0)
    with pytest.raises(TypeError, match="must be a tensor"):
        graph.add_cost(1.0)
    with pytest.raises(ValueError, match="unknown node"):
        graph.add_cost(torch.tensor(1.0), depends_on=["nope"])
    graph.sample("x", Normal(torch.tensor(0.0), torch.tensor(1.0)))
    graph.add_cost(torch.tensor(1.0))
    with pytest.raises(ValueError, match="non-reparameterised nodes"):
        graph.surrogate(baselines={"x": torch.tensor(0.0)})
    with pytest.raises(ValueError, match=r"one value per sample, shape \(3,\)"):
        scg.per_sample_estimates(lambda w: w, [torch.zeros(2)], 3)
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        scg.per_sample_estimates(lambda w: w, [torch.zeros(())], 0)
