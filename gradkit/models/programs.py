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

:func:`variance_by_length`, :func:`single_draw_table` and :func:`inventory_table` are the
chapter's studies: the per-run variance of the stochastic derivative against the score function
(leave-one-out baseline) as the walk gets longer, on programs with a single draw against the
measure-valued estimator too, and on the inventory.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import gradkit as gk
from gradkit import stochastic_ad as sad

__all__ = [
    "PROGRAM_ESTIMATORS",
    "SINGLE_DRAWS",
    "InventoryPolicy",
    "SingleDraw",
    "estimator_rows",
    "inventory_cost",
    "inventory_exact",
    "inventory_table",
    "random_walk",
    "random_walk_exact",
    "single_draw_table",
    "summary_rows",
    "variance_by_length",
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


# -- the chapter's studies --------------------------------------------------------------------

Program = Callable[[Any], Any]
#: The estimators the studies compare, by name; each maps (program, theta, n, generator) to rows.
PROGRAM_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "stochastic_ad": lambda prog, theta, n, g: sad.derivative_estimates(
        prog, theta, n, generator=g
    ),
    "stochastic_ad (smooth, biased)": lambda prog, theta, n, g: sad.derivative_estimates(
        prog, theta, n, strategy="smooth", generator=g
    ),
    "score_function (LOO)": lambda prog, theta, n, g: sad.score_function_estimates(
        prog, theta, n, generator=g
    ),
}


def summary_rows(
    name: str, estimates: Tensor, exact: Tensor | float, seconds: float
) -> list[dict[str, Any]]:
    """One row per coordinate of ``theta``: mean, standard error, exact value, z-score, per-run
    variance (from :func:`gradkit.diagnostics.summarize`) and the seconds the estimates took.

    Example:
        >>> import torch
        >>> summary_rows("demo", torch.tensor([1.0, 3.0]), 2.0, 0.1)[0]["z"]
        0.0
    """
    rows = estimates.detach().double().cpu().reshape(estimates.shape[0], -1)
    exact_t = torch.as_tensor(exact, dtype=torch.float64).reshape(-1).expand(rows.shape[1])
    summary = gk.diagnostics.summarize({"g": rows}, exact={"g": exact_t})["g"]
    z = summary.z_score
    assert z is not None
    return [
        {
            "estimator": name,
            "coordinate": j,
            "mean": summary.mean[j].item(),
            "standard_error": summary.standard_error[j].item(),
            "exact": exact_t[j].item(),
            "z": z[j].item(),
            "variance": summary.variance[j].item(),
            "seconds": seconds,
        }
        for j in range(rows.shape[1])
    ]


def estimator_rows(
    program: Program,
    theta: Tensor,
    num_samples: int,
    exact: Tensor | float,
    *,
    generator: torch.Generator | None = None,
) -> list[dict[str, Any]]:
    """Every estimator of :data:`PROGRAM_ESTIMATORS` on one program at one ``theta``.

    All start from the same generator state, so they see the same draws.

    Returns:
        the rows of :func:`summary_rows` for each estimator.
    """
    state = None if generator is None else generator.get_state()
    rows = []
    for name, estimates in PROGRAM_ESTIMATORS.items():
        if generator is not None and state is not None:
            generator.set_state(state)
        start = time.perf_counter()
        est = estimates(program, theta, num_samples, generator)
        rows.extend(summary_rows(name, est, exact, time.perf_counter() - start))
    return rows


def variance_by_length(
    lengths: Sequence[int],
    num_samples: int = 10_000,
    *,
    scale: float = 2.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Any:
    r"""Per-run variance of the estimators on :func:`random_walk` for each number of steps
    :math:`n`, at :math:`\theta` = ``scale`` :math:`\cdot\, n` (Arya et al. 2022 keep the
    walk's reach proportional to its length this way).

    Returns:
        a pandas DataFrame, one row per (steps, estimator), with ``steps``, ``theta`` and the
        columns of :func:`summary_rows`.

    Example:
        >>> t = variance_by_length([3], num_samples=50)
        >>> sorted(t.estimator)[0], int(t.steps[0])
        ('score_function (LOO)', 3)
    """
    import pandas as pd

    rows = []
    for steps in lengths:
        theta = scale * steps
        _, slope = random_walk_exact(theta, steps)
        theta_t = torch.tensor(theta, dtype=torch.float64, device=device)
        program = functools.partial(random_walk, steps=steps)
        for row in estimator_rows(program, theta_t, num_samples, slope, generator=generator):
            rows.append({"steps": steps, "theta": theta, **row})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class SingleDraw:
    """A program with one draw: the distribution, the cost and the parameter value.

    Attributes:
        name: a label.
        sampler: the stochastic_ad sampler (``theta -> draw``).
        dist: the same draw as a torch distribution of ``theta``.
        cost: the cost of the draw, in torch operations (works on one run and on a batch).
        theta: the parameter value.
        exact: the exact derivative of the expected cost.
    """

    name: str
    sampler: Callable[[Any], Any]
    dist: Callable[[Tensor], Any]
    cost: Callable[[Any], Any]
    theta: float
    exact: float

    def program(self, theta: Any) -> Any:
        """The program: the cost of one draw."""
        return self.cost(self.sampler(theta))


SINGLE_DRAWS = (
    # d/dλ E[X^2] = d/dλ (λ + λ²) = 1 + 2λ
    SingleDraw("Poisson, x²", sad.poisson, torch.distributions.Poisson, lambda x: x**2, 3.0, 7.0),
    # E[min(X, 4)] for the failures before a success: sum_{k<4} (1-p)^{k+1}
    SingleDraw(
        "Geometric, min(x, 4)",
        sad.geometric,
        torch.distributions.Geometric,
        lambda x: x.clamp(max=4.0),
        0.3,
        -sum((k + 1) * 0.7**k for k in range(4)),
    ),
    # E[3x - 1] for a Bernoulli(p): slope 3
    SingleDraw(
        "Bernoulli, 3x − 1",
        sad.bernoulli,
        torch.distributions.Bernoulli,
        lambda x: 3 * x - 1,
        0.2,
        3.0,
    ),
    # Binomial(10, p): d/dp E[x^2] = d/dp (10p(1-p) + 100p^2) = 10 - 20p + 200p
    SingleDraw(
        "Binomial(10), x²",
        lambda p: sad.binomial(10, p),
        lambda p: torch.distributions.Binomial(10, p),
        lambda x: x**2,
        0.3,
        10 - 6 + 60,
    ),
)


def single_draw_table(
    draws: Sequence[SingleDraw] = SINGLE_DRAWS,
    num_samples: int = 10_000,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Any:
    """Each single-draw program under the program estimators and the measure-valued one.

    The measure-valued estimator (``gk.ESTIMATORS["measure_valued"]``) runs on ``dist(theta)``
    with the same cost (two evaluations per row, against the stochastic derivative's one or
    two).

    Returns:
        a pandas DataFrame, one row per (program, estimator), with ``program`` and the columns
        of :func:`summary_rows`.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for draw in draws:
        theta = torch.tensor(draw.theta, dtype=torch.float64, device=device)
        found = estimator_rows(draw.program, theta, num_samples, draw.exact, generator=generator)
        start = time.perf_counter()
        mvd = gk.ESTIMATORS["measure_valued"](
            draw.cost, draw.dist(theta.clone()), num_samples, generator=generator
        )
        (est,) = mvd.values()
        found += summary_rows("measure_valued", est, draw.exact, time.perf_counter() - start)
        rows.extend({"program": draw.name, **row} for row in found)
    return pd.DataFrame(rows)


def inventory_table(
    theta: Sequence[float] | Tensor,
    policy: InventoryPolicy = InventoryPolicy(),
    num_samples: int = 10_000,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Any:
    """The estimators of :data:`PROGRAM_ESTIMATORS` on :func:`inventory_cost`, both
    coordinates, against :func:`inventory_exact`.

    Returns:
        a pandas DataFrame with ``parameter`` (``"rate"`` or ``"upper level"``) and the
        columns of :func:`summary_rows`.
    """
    import pandas as pd

    _, grad = inventory_exact(theta, policy)
    theta_t = torch.as_tensor(theta, dtype=torch.float64).to(device)
    program = functools.partial(inventory_cost, policy=policy)
    table = pd.DataFrame(estimator_rows(program, theta_t, num_samples, grad, generator=generator))
    table.insert(1, "parameter", table.coordinate.map({0: "rate λ", 1: "upper level φ"}))
    return table.drop(columns="coordinate")
