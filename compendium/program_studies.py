r"""The stochastic-programs chapter's studies of :mod:`gradkit.models.programs`.

Chapter support, beside the book's machinery (not in the installed library): the per-run
variance of the stochastic derivative against the score function (leave-one-out baseline) as
the random walk gets longer (:func:`variance_by_length`), programs with a single draw against
the measure-valued estimator too (:func:`single_draw_table`), and the inventory
(:func:`inventory_table`). They use only gradkit's public API.
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
from gradkit.models.programs import (
    InventoryPolicy,
    inventory_cost,
    inventory_exact,
    random_walk,
    random_walk_exact,
)

__all__ = [
    "PROGRAM_ESTIMATORS",
    "SINGLE_DRAWS",
    "SingleDraw",
    "estimator_rows",
    "inventory_table",
    "single_draw_table",
    "summary_rows",
    "variance_by_length",
]

Program = Callable[[Any], Any]
_DEFAULT_POLICY = InventoryPolicy()
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
    policy: InventoryPolicy = _DEFAULT_POLICY,
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
