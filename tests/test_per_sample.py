"""gk.per_sample_grads: equal to a Python loop of backward passes, and its error paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradkit as gk
from tests.stats import Z


def loop_grads(module, loss_fn, *batch):
    """The reference: one backward pass per example, stacked."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    rows = []
    for b in range(batch[0].shape[0]):
        inputs, *targets = (t[b : b + 1] for t in batch)
        rows.append(torch.autograd.grad(loss_fn(module(inputs), *targets), params))
    return {n: torch.stack([r[i] for r in rows]) for i, n in enumerate(names)}


def mlp(dtype=torch.float64, out=3):
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, out)).to(dtype)


def assert_same(got, want, atol=1e-12):
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert torch.allclose(got[name], want[name], rtol=0, atol=atol), name


def test_mse_matches_loop_and_shapes():
    net = mlp()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    got = gk.per_sample_grads(net, F.mse_loss, x, y)
    assert_same(got, loop_grads(net, F.mse_loss, x, y))
    for name, p in net.named_parameters():
        assert got[name].shape == (7, *p.shape)
        assert got[name].dtype == torch.float64 and not got[name].requires_grad


def test_cross_entropy_with_integer_targets_matches_loop():
    net = mlp(out=5)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 5, (6,))
    assert_same(
        gk.per_sample_grads(net, F.cross_entropy, x, y), loop_grads(net, F.cross_entropy, x, y)
    )


def test_several_targets_and_float32():
    net = mlp(torch.float32)
    x, y, w = torch.randn(5, 4), torch.randn(5, 3), torch.rand(5)

    def weighted(out, target, weight):
        return (weight[:, None] * (out - target) ** 2).sum()

    got = gk.per_sample_grads(net, weighted, x, y, w)
    assert got["0.weight"].dtype == torch.float32
    assert_same(got, loop_grads(net, weighted, x, y, w), atol=1e-5)


def test_sum_over_examples_is_the_batch_gradient():
    net = mlp()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    got = gk.per_sample_grads(net, F.mse_loss, x, y)
    # mse_loss averages over the 3 outputs of one example; summing examples gives the batch sum
    total = F.mse_loss(net(x), y, reduction="sum") / 3
    batch = torch.autograd.grad(total, list(net.parameters()))
    for (name, _), g in zip(net.named_parameters(), batch, strict=True):
        assert torch.allclose(got[name].sum(0), g, atol=1e-12)


def test_frozen_parameters_are_left_out_and_held_fixed():
    net = mlp()
    net[0].weight.requires_grad_(False)
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    got = gk.per_sample_grads(net, F.mse_loss, x, y)
    assert set(got) == {"0.bias", "2.weight", "2.bias"}
    assert_same(got, loop_grads(net, F.mse_loss, x, y))


def test_batchnorm_in_eval_mode_uses_running_statistics():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    net(torch.randn(32, 4, dtype=torch.float64))  # move the running statistics off 0/1
    net.eval()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    assert_same(gk.per_sample_grads(net, F.mse_loss, x, y), loop_grads(net, F.mse_loss, x, y))


def test_chunk_size_and_loss_of_shape_one():
    net = mlp()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)

    def per_row(out, target):  # shape (1,): reduction over outputs only
        return ((out - target) ** 2).sum(-1)

    want = loop_grads(net, lambda o, t: per_row(o, t).sum(), x, y)
    assert_same(gk.per_sample_grads(net, per_row, x, y, chunk_size=3), want)


def test_dropout_needs_eval_or_a_randomness_choice():
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    with pytest.raises(ValueError, match=r"dropout.*module\.eval\(\).*randomness='different'"):
        gk.per_sample_grads(net, F.mse_loss, x, y)
    g = gk.per_sample_grads(net, F.mse_loss, x, y, randomness="different")
    assert g["0.weight"].shape == (6, 8, 4)
    net.eval()
    assert_same(gk.per_sample_grads(net, F.mse_loss, x, y), loop_grads(net, F.mse_loss, x, y), 1e-6)


def test_per_sample_scores_of_a_policy_have_mean_zero():
    # E_{z ~ q(.|x; w)}[grad_w log q(z|x; w)] = 0 for every weight: the score identity, per weight.
    net = mlp(torch.float32, out=4)
    n = 4000
    x = torch.randn(1, 4).expand(n, 4)
    with torch.no_grad():
        z = torch.distributions.Categorical(logits=net(x)).sample()

    def log_q(logits, zb):
        return torch.distributions.Categorical(logits=logits).log_prob(zb).sum()

    scores = gk.per_sample_grads(net, log_q, x, z)
    for name, s in scores.items():
        se = s.std(0) / math.sqrt(n)
        assert torch.all(s.mean(0).abs() <= Z * se + 1e-6), name


def test_keeps_device_and_dtype_of_parameters():
    net = mlp(torch.float64)
    got = gk.per_sample_grads(
        net, F.mse_loss, torch.randn(2, 4).double(), torch.randn(2, 3).double()
    )
    assert all(g.dtype == torch.float64 and g.device == net[0].weight.device for g in got.values())


# --- error paths -------------------------------------------------------------------------------


def test_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module, got function"):
        gk.per_sample_grads(lambda x: x, F.mse_loss, torch.zeros(2, 4), torch.zeros(2, 3))


def test_rejects_a_non_callable_loss():
    with pytest.raises(TypeError, match=r"loss_fn must be callable"):
        gk.per_sample_grads(mlp(), "mse", torch.zeros(2, 4).double())


def test_rejects_an_empty_call():
    with pytest.raises(ValueError, match=r"needs a batch: call per_sample_grads\(module, loss_fn"):
        gk.per_sample_grads(mlp(), F.mse_loss)


def test_rejects_non_tensor_batch_arguments():
    with pytest.raises(TypeError, match=r"batch argument 1 must be a torch\.Tensor, got list"):
        gk.per_sample_grads(mlp(), F.mse_loss, torch.zeros(2, 4).double(), [[0.0] * 3] * 2)


def test_rejects_zero_dim_batch_tensors():
    with pytest.raises(ValueError, match=r"batch argument 1 is a 0-dim tensor.*unsqueeze\(0\)"):
        gk.per_sample_grads(mlp(), F.mse_loss, torch.zeros(2, 4).double(), torch.tensor(1.0))


def test_rejects_batch_sizes_that_disagree():
    with pytest.raises(ValueError, match=r"disagree on the batch size.*\(3, 4\), \(2, 3\)"):
        gk.per_sample_grads(mlp(), F.mse_loss, torch.zeros(3, 4).double(), torch.zeros(2, 3))


def test_rejects_an_empty_batch():
    with pytest.raises(ValueError, match=r"batch is empty"):
        gk.per_sample_grads(mlp(), F.mse_loss, torch.zeros(0, 4).double(), torch.zeros(0, 3))


def test_rejects_a_batch_on_another_device():
    with pytest.raises(ValueError, match=r"batch argument 0 is on meta.*\.to\('cpu'\)"):
        gk.per_sample_grads(mlp(), F.mse_loss, torch.zeros(2, 4, device="meta"))


def test_rejects_a_module_without_trainable_parameters():
    net = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameters with requires_grad=True"):
        gk.per_sample_grads(net, F.mse_loss, torch.zeros(2, 4).double(), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"no parameters with requires_grad=True"):
        gk.per_sample_grads(nn.ReLU(), F.mse_loss, torch.zeros(2, 4), torch.zeros(2, 4))


def test_rejects_batchnorm_in_training_mode():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match=r"BatchNorm1d \('1'\) in training mode.*module\.eval\(\)"):
        gk.per_sample_grads(net, F.mse_loss, torch.zeros(2, 4), torch.zeros(2, 6))


def test_rejects_a_loss_with_several_values():
    def no_reduction(out, target):
        return (out - target) ** 2

    with pytest.raises(
        ValueError, match=r"loss_fn returned shape \(1, 3\).*\.sum\(\) or \.mean\(\)"
    ):
        gk.per_sample_grads(mlp(), no_reduction, torch.zeros(2, 4).double(), torch.zeros(2, 3))


def test_rejects_a_loss_that_is_not_a_tensor():
    with pytest.raises(TypeError, match=r"loss_fn must return a torch\.Tensor, got float"):
        gk.per_sample_grads(mlp(), lambda out: 1.0, torch.zeros(2, 4).double())


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True])
def test_rejects_a_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int or None"):
        gk.per_sample_grads(mlp(), F.mse_loss, torch.zeros(2, 4).double(), chunk_size=chunk_size)


def test_rejects_an_unknown_randomness_mode():
    with pytest.raises(ValueError, match=r"randomness must be one of \('error', 'different'"):
        gk.per_sample_grads(mlp(), F.mse_loss, torch.zeros(2, 4).double(), randomness="loop")
