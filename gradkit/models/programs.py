r"""Programs with discrete randomness and their exact derivatives (for stochastic triples).

Two programs written for one run with :mod:`gradkit.stochastic_ad`'s samplers, each with an
exact reference by dynamic programming over its finite state space, differentiated by
autograd:

* :func:`random_walk`: ``steps`` moves of ±1 from 0; the move is up with probability
  :math:`e^{-x/\theta}` at position :math:`x` (the walk of Arya et al. 2022, pushed back from
  0 and slowed as it climbs), the cost :math:`x_n^2`. The exact value sums over the
  :math:`n+1` positions (:func:`random_walk_exact`).
* :func:`inventory_cost`: a periodic-review inventory with lost sales under Poisson demand
  (the sources name inventory control as a use of gradient estimation, Mohamed et al. 2020,
  §1): each period the demand :math:`D_t \sim \mathrm{Poisson}(\lambda)` is served from stock
  :math:`s_t`, leftover stock costs ``holding`` per unit and lost sales ``lost_sale`` per unit,
  and the stock is replenished towards a base-stock level, at most ``capacity`` units a period.
  The level is :math:`S` or :math:`S + 1`, the latter with probability :math:`\phi`, drawn each
  period: a randomised base-stock policy whose level is continuous in :math:`\phi` (the
  derivative in :math:`\phi` is the slope of the expected cost between the levels
  :math:`S` and :math:`S+1`). :func:`inventory_exact` runs the Markov chain on the stock
  levels :math:`0..S+1`.

The chapter's studies of these programs (the variance of the stochastic derivative against the
score function as the walk gets longer, single draws, the inventory) are chapter support and
live with the compendium, in ``compendium/program_studies.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradkit import stochastic_ad as sad

__all__ = [
    "InventoryPolicy",
    "inventory_cost",
    "inventory_exact",
    "random_walk",
    "random_walk_exact",
]


def random_walk(theta: Any, steps: int) -> Any:
    r"""One run of the walk: ``steps`` moves of ±1 from 0, up with probability
    :math:`e^{-x/\theta}` at position :math:`x \ge 0`; returns :math:`x_n^2`.

    Example:
        >>> import torch
        >>> from gradkit import stochastic_ad as sad
        >>> g = sad.derivative_estimates(lambda t: random_walk(t, 10), torch.tensor(20.0), 4)
        >>> g.shape
        torch.Size([4])
    """
    position = torch.zeros((), dtype=theta.dtype, device=theta.device)
    for _ in range(steps):
        up = sad.bernoulli(torch.exp(-position / theta))
        position = position + 2.0 * up - 1.0
    return position**2


def random_walk_exact(theta: float | Tensor, steps: int) -> tuple[float, float]:
    r"""The exact :math:`\mathbb{E}[x_n^2]` of :func:`random_walk` and its derivative in
    :math:`\theta` (float64).

    The walk never goes below 0 (from 0 it moves up surely), so the law of the position is a
    vector over :math:`0..n`, moved one step at a time; autograd differentiates the recursion.

    Example:
        >>> random_walk_exact(5.0, 1)  # the first step is up: x^2 = 1 whatever theta is
        (1.0, 0.0)
    """
    t = torch.tensor(float(theta), dtype=torch.float64, requires_grad=True)
    positions = torch.arange(steps + 1, dtype=torch.float64)
    law = (positions == 0).to(torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    for _ in range(steps):
        up = torch.exp(-positions / t)
        law = torch.cat([zero, (law * up)[:-1]]) + torch.cat([(law * (1.0 - up))[1:], zero])
    value = (law * positions**2).sum()
    (slope,) = torch.autograd.grad(value, t)
    return value.item(), slope.item()


@dataclass(frozen=True)
class InventoryPolicy:
    """The inventory's constants: base-stock level ``S``, capacity, costs and horizon.

    Attributes:
        base_stock: the lower base-stock level :math:`S` (the upper one is :math:`S + 1`).
        capacity: the most units that arrive in one period.
        holding: the cost of a unit left over at the end of a period.
        lost_sale: the cost of a unit of demand that finds no stock.
        periods: the horizon; the cost is the mean over periods, from a full stock.
    """

    base_stock: int = 8
    capacity: int = 6
    holding: float = 1.0
    lost_sale: float = 4.0
    periods: int = 20

    def __post_init__(self) -> None:
        for name in ("base_stock", "capacity", "periods"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


def inventory_cost(theta: Any, policy: InventoryPolicy = InventoryPolicy()) -> Any:
    r"""One run of the inventory: ``theta = (demand rate λ, probability φ of the level S + 1)``;
    returns the mean cost per period.

    Example:
        >>> import torch
        >>> from gradkit import stochastic_ad as sad
        >>> g = sad.derivative_estimates(inventory_cost, torch.tensor([5.0, 0.5]), 3)
        >>> g.shape
        torch.Size([3, 2])
    """
    rate, upper = theta[0], theta[1]
    stock = torch.full((), float(policy.base_stock), dtype=rate.dtype, device=rate.device)
    total = torch.zeros((), dtype=rate.dtype, device=rate.device)
    for _ in range(policy.periods):
        demand = sad.poisson(rate)
        sold = torch.minimum(stock, demand)
        left = stock - sold
        total = total + policy.holding * left + policy.lost_sale * (demand - sold)
        level = policy.base_stock + sad.bernoulli(upper)
        stock = torch.minimum(left + policy.capacity, level)
    return total / policy.periods


def inventory_exact(
    theta: Sequence[float] | Tensor, policy: InventoryPolicy = InventoryPolicy()
) -> tuple[float, Tensor]:
    r"""The exact expected mean cost and its gradient in :math:`(\lambda, \phi)` (float64).

    The stock :math:`s \in \{0, .., S+1\}` is a Markov chain. From stock :math:`s` the leftover
    is :math:`s - k` with probability :math:`p_\lambda(k)` for :math:`k < s` and 0 with the
    rest, the expected cost is :math:`h\,\mathbb{E}[\text{left}] + c\,(\lambda - s +
    \mathbb{E}[\text{left}])` (because :math:`\max(D-s,0) - \max(s-D,0) = D - s`), and the next
    stock is :math:`\min(\text{left} + C, S + B)` with :math:`B \sim \mathrm{Bern}(\phi)`.
    Nothing is truncated: the result is exact up to rounding.

    Example:
        >>> value, grad = inventory_exact([5.0, 0.5])
        >>> grad.shape
        torch.Size([2])
    """
    t = torch.as_tensor(theta, dtype=torch.float64).detach().clone().requires_grad_(True)
    rate, upper = t[0], t[1]
    top = policy.base_stock + 1
    states = torch.arange(top + 1, dtype=torch.float64)
    k = torch.arange(top + 1, dtype=torch.float64)
    pmf = torch.exp(torch.xlogy(k, rate) - rate - torch.lgamma(k + 1.0))  # P(D = k), k <= S+1
    # left[s, j] = P(leftover j | stock s)
    gap = (states.unsqueeze(1) - k.unsqueeze(0)).long()  # s - j: the demand that leaves j
    inside = (gap >= 0) & (k.unsqueeze(0) >= 1)
    left = torch.where(inside, pmf[gap.clamp(0, top)], torch.zeros(()))
    left = torch.cat([1.0 - left[:, 1:].sum(1, keepdim=True), left[:, 1:]], 1)
    mean_left = (left * k).sum(1)
    cost = policy.holding * mean_left + policy.lost_sale * (rate - states + mean_left)

    def moves(level: int) -> Tensor:
        after = torch.clamp(k + policy.capacity, max=level).long()
        return torch.nn.functional.one_hot(after, top + 1).to(torch.float64)

    transition = left @ ((1.0 - upper) * moves(policy.base_stock) + upper * moves(top))
    law = (states == policy.base_stock).to(torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for _ in range(policy.periods):
        total = total + law @ cost
        law = law @ transition
    value = total / policy.periods
    (grad,) = torch.autograd.grad(value, t)
    return value.item(), grad
