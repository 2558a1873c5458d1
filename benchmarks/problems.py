r"""The three problems on which gradkit is compared with its peers, with exact gradients.

Each problem is :math:`\nabla_\theta \mathbb{E}_{p(z;\theta)}[f(z)]` for a fixed
:math:`\theta`; the benchmark draws ``copies`` independent estimates, each from ``num_samples``
samples. Every library builds the same distribution from :meth:`Problem.parameters` and uses
the same cost :meth:`Problem.cost`, so the estimates are comparable. The module is imported
both by the benchmark and by the peers' worker processes; the neural cost's weights come from
a fixed seed, so they are identical in both.

* ``bernoulli`` — one latent :math:`z \sim \mathrm{Bern}(\sigma(\theta))`, :math:`\theta = 0`,
  cost :math:`(z - 0.45)^2` (the toy problem of Tucker et al. 2017). Exact gradient
  :math:`\sigma'(\theta)\,[(1 - 0.45)^2 - 0.45^2] = 0.025`.
* ``factorised`` — 64 independent bits :math:`z_j \sim \mathrm{Bern}(\sigma(\theta_j))`
  (``Independent``, event size 64) and a neural cost that sums a small tanh network applied to
  each of 8 blocks of 8 bits; the exact gradient sums 8 enumerations over 256 states.
* ``gaussian`` — :math:`x \sim \mathcal{N}(\mu, \sigma^2)`, :math:`\mu = 1`,
  :math:`\sigma = 1.5`, cost :math:`x^2`; exact gradient :math:`(2\mu, 2\sigma) = (2, 3)`.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal

__all__ = ["PROBLEMS", "Problem", "get"]

_BLOCKS, _BLOCK = 8, 8
_WEIGHT_SEED = 20_240_817


@functools.lru_cache(maxsize=8)
def _block_net(dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The cost's block network, 8 -> 16 -> 1 with tanh, weights from a fixed seed."""
    generator = torch.Generator().manual_seed(_WEIGHT_SEED)
    first = nn.Linear(_BLOCK, 16)
    last = nn.Linear(16, 1)
    with torch.no_grad():
        for layer in (first, last):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))
    net = nn.Sequential(first, nn.Tanh(), last).to(device=device, dtype=dtype)
    net.requires_grad_(False)
    return net


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: a distribution family, its parameter values, a cost.

    Attributes:
        name: ``"bernoulli"``, ``"factorised"`` or ``"gaussian"``.
        title: a one-line description for tables.
        values: the parameter values, keyed by torch's parameter names.

    Example:
        >>> p = get("gaussian")
        >>> d = p.distribution(p.parameters(copies=3))
        >>> d.batch_shape, p.cost(torch.tensor([2.0])).item()
        (torch.Size([3]), 4.0)
    """

    name: str
    title: str
    values: dict[str, Tensor]

    def parameters(self, copies: int | None = None) -> dict[str, Tensor]:
        """Fresh parameter tensors; with ``copies``, stacked ``copies`` times along dim 0."""
        if copies is None:
            return {k: v.clone() for k, v in self.values.items()}
        return {k: v.expand(copies, *v.shape).clone() for k, v in self.values.items()}

    def distribution(self, params: dict[str, Tensor]) -> Distribution:
        """The distribution at ``params`` (as returned by :meth:`parameters`)."""
        if self.name == "bernoulli":
            return Bernoulli(logits=params["logits"])
        if self.name == "factorised":
            return Independent(Bernoulli(logits=params["logits"]), 1)
        return Normal(params["loc"], params["scale"])

    def cost(self, z: Tensor) -> Tensor:
        """The cost of samples ``z``: one value per sample (and per copy)."""
        if self.name == "bernoulli":
            return (z - 0.45) ** 2
        if self.name == "factorised":
            blocks = z.reshape(*z.shape[:-1], _BLOCKS, _BLOCK)
            return _block_net(z.dtype, str(z.device))(blocks).squeeze(-1).sum(-1)
        return z**2

    def exact(self) -> dict[str, Tensor]:
        """The exact gradient of :math:`\\mathbb{E}[f]` with respect to each parameter."""
        if self.name == "bernoulli":
            p = torch.sigmoid(self.values["logits"].double())
            return {"logits": p * (1 - p) * ((1 - 0.45) ** 2 - 0.45**2)}
        if self.name == "factorised":
            return {"logits": _factorised_exact(self.values["logits"])}
        return {"loc": 2 * self.values["loc"].double(), "scale": 2 * self.values["scale"].double()}


def _factorised_exact(logits: Tensor) -> Tensor:
    """Exact gradient for ``factorised``: 8 enumerations over the 256 states of a block."""
    theta = logits.detach().double().clone().requires_grad_()
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=_BLOCK)), dtype=torch.float64)
    values = _block_net(torch.float64)(states).squeeze(-1)  # (256,)
    p = torch.sigmoid(theta).reshape(_BLOCKS, 1, _BLOCK)
    prob = (states * p + (1 - states) * (1 - p)).prod(-1)  # (8, 256)
    (grad,) = torch.autograd.grad((prob * values).sum(), theta)
    return grad


def _problems() -> dict[str, Problem]:
    generator = torch.Generator().manual_seed(_WEIGHT_SEED + 1)
    return {
        "bernoulli": Problem(
            "bernoulli",
            "one Bernoulli latent, cost (z - 0.45)^2",
            {"logits": torch.tensor(0.0)},
        ),
        "factorised": Problem(
            "factorised",
            "64 independent Bernoulli latents, neural cost",
            {"logits": torch.randn(_BLOCKS * _BLOCK, generator=generator)},
        ),
        "gaussian": Problem(
            "gaussian",
            "Gaussian N(1, 1.5^2), cost x^2",
            {"loc": torch.tensor(1.0), "scale": torch.tensor(1.5)},
        ),
    }


PROBLEMS: dict[str, Problem] = _problems()


def get(name: str) -> Problem:
    """The problem called ``name``.

    Raises:
        KeyError: for an unknown name; the message lists the known ones.

    Example:
        >>> round(get("bernoulli").exact()["logits"].item(), 4)
        0.025
    """
    if name not in PROBLEMS:
        raise KeyError(f"unknown problem {name!r}; choose one of {sorted(PROBLEMS)}")
    return PROBLEMS[name]
