r"""Tuning a Monte Carlo algorithm through its own estimate: importance sampling of a tail.

Chapter support for the comparison chapter's section on common random numbers; it lives with
the compendium, not in the library, and uses only gradkit's public API.

The probability :math:`I = P(x > a)` of :math:`x \sim \mathcal N(0, 1)` is estimated by
importance sampling from the shifted proposal :math:`q_\theta = \mathcal N(\theta, 1)`, with
weights :math:`w(x;\theta) = p(x)/q_\theta(x) = e^{-\theta x + \theta^2/2}`. The estimate's
variance is :math:`(M(\theta) - I^2)/n`, where the second moment has a closed form,

.. math::
    M(\theta) = \mathbb{E}_{q_\theta}\big[w^2\, \mathbb 1[x > a]\big]
    = \mathbb{E}_{p}\big[w\, \mathbb 1[x > a]\big] = e^{\theta^2}\, \bar\Phi(a + \theta),

so the best shift :math:`\theta^\star` (:func:`optimal_shift`) and the exact gradient
:math:`M'(\theta)` are known. Tuning :math:`\theta` by differentiating a Monte Carlo estimate of
:math:`M` with its random numbers held fixed (:func:`gradkit.sampling.common_random_numbers`)
works or fails depending on how the estimate is computed:

* :func:`from_target` draws :math:`y \sim p`, which does not depend on :math:`\theta`; only the
  weight does, smoothly, so the derivative with fixed draws is unbiased for :math:`M'`.
* :func:`from_proposal` draws :math:`x = \theta + \epsilon` from :math:`q_\theta`, so the
  samples move with :math:`\theta` and cross the indicator's jump at :math:`a`. With fixed
  :math:`\epsilon` the derivative of each piece misses the mass that crosses, the
  :func:`jump_term` :math:`w(a;\theta)^2 \varphi(a - \theta)`, and its mean is
  :math:`M'(\theta)` minus that term.

:func:`gradient_table` measures both against :math:`M'`; :func:`saa_shifts` minimises one fixed
sample's estimate (sample-average approximation) for many independent samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradkit.diagnostics import results_table
from gradkit.sampling import common_random_numbers

__all__ = [
    "ALGORITHMS",
    "from_proposal",
    "from_target",
    "gradient_table",
    "jump_term",
    "optimal_shift",
    "saa_shifts",
    "second_moment",
]

Estimate = Callable[..., Tensor]


def _check(threshold: float, num_samples: int) -> None:
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")


def _standard_draws(
    theta: Tensor, num_samples: int, threshold: float, generator: torch.Generator | None
) -> Tensor:
    """``num_samples`` standard normal draws per element of ``theta``, on its device and dtype."""
    _check(threshold, num_samples)
    return torch.randn(
        (*theta.shape, num_samples), generator=generator, dtype=theta.dtype, device=theta.device
    )


def _log_weight(x: Tensor, theta: Tensor) -> Tensor:
    """log p(x) - log q_theta(x) for p = N(0, 1), q_theta = N(theta, 1)."""
    return -theta * x + theta**2 / 2


def second_moment(theta: Tensor, threshold: float = 3.0) -> Tensor:
    r"""The exact second moment :math:`M(\theta) = e^{\theta^2}\bar\Phi(a + \theta)`.

    Computed in logs (``log_ndtr``), so it is accurate far in the tail and differentiable by
    autograd: its gradient is the exact :math:`M'(\theta)`.

    Args:
        theta: the proposal's shift, any shape, floating.
        threshold: :math:`a`.

    Returns:
        :math:`M(\theta)`, shaped like ``theta``.

    Example:
        >>> import torch
        >>> from compendium.tail_sampling import second_moment
        >>> round(float(second_moment(torch.tensor(0.0, dtype=torch.float64))), 10)  # P(x > 3)
        0.001349898
    """
    return torch.exp(theta**2 + torch.special.log_ndtr(-(threshold + theta)))


def jump_term(theta: Tensor, threshold: float = 3.0) -> Tensor:
    r"""The part of :math:`M'(\theta)` that :func:`from_proposal`'s fixed-draw derivative misses.

    With :math:`x = \theta + \epsilon`, the estimate is :math:`\int_{a - \theta}^\infty
    w(\theta + \epsilon; \theta)^2 \varphi(\epsilon)\, d\epsilon` in expectation; moving the
    lower limit contributes :math:`w(a;\theta)^2\varphi(a - \theta) = e^{\theta^2}\varphi(a +
    \theta)`, which no sample's derivative contains.

    Args:
        theta: the proposal's shift, any shape, floating.
        threshold: :math:`a`.

    Returns:
        the term, shaped like ``theta``.
    """
    return torch.exp(
        2 * _log_weight(torch.as_tensor(threshold, dtype=theta.dtype), theta)
        - (threshold - theta) ** 2 / 2
    ) / math.sqrt(2 * math.pi)


def from_proposal(
    theta: Tensor,
    num_samples: int,
    threshold: float = 3.0,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The estimate :math:`\frac1n \sum_i w(x_i;\theta)^2\, \mathbb 1[x_i > a]`, :math:`x_i =
    \theta + \epsilon_i` drawn from the proposal.

    Args:
        theta: the shifts, any shape; each element gets its own ``num_samples`` draws.
        num_samples: :math:`n`.
        threshold: :math:`a`.
        generator: the source of the draws :math:`\epsilon`.

    Returns:
        the estimates, shaped like ``theta``.

    Raises:
        ValueError: for a bad ``num_samples`` or ``threshold``.
    """
    x = theta.unsqueeze(-1) + _standard_draws(theta, num_samples, threshold, generator)
    inside = (x > threshold).to(theta.dtype)
    return (torch.exp(2 * _log_weight(x, theta.unsqueeze(-1))) * inside).mean(-1)


def from_target(
    theta: Tensor,
    num_samples: int,
    threshold: float = 3.0,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The estimate :math:`\frac1n \sum_i w(y_i;\theta)\, \mathbb 1[y_i > a]`, :math:`y_i \sim
    \mathcal N(0, 1)` drawn from the target (the draws do not depend on :math:`\theta`).

    Args:
        theta: the shifts, any shape; each element gets its own ``num_samples`` draws.
        num_samples: :math:`n`.
        threshold: :math:`a`.
        generator: the source of the draws :math:`y`.

    Returns:
        the estimates, shaped like ``theta``.

    Raises:
        ValueError: for a bad ``num_samples`` or ``threshold``.
    """
    y = _standard_draws(theta, num_samples, threshold, generator)
    inside = (y > threshold).to(theta.dtype)
    return (torch.exp(_log_weight(y, theta.unsqueeze(-1))) * inside).mean(-1)


#: The two estimates of :math:`M`, by the name the chapter gives them.
ALGORITHMS: dict[str, Estimate] = {
    "draws from the proposal": from_proposal,
    "draws from the target": from_target,
}


def optimal_shift(threshold: float = 3.0) -> float:
    r"""The shift :math:`\theta^\star` that minimises :math:`M`: the root of :math:`2\theta =
    \varphi(a + \theta)/\bar\Phi(a + \theta)`.

    :math:`\log M` is convex in :math:`\theta` (the inverse Mills ratio has slope below 1), so
    the root is unique; it is found by Brent's method to float64 precision.

    Example:
        >>> from compendium.tail_sampling import optimal_shift
        >>> round(optimal_shift(3.0), 4)
        3.1548
    """
    import scipy.optimize
    import scipy.special

    def slope(t: float) -> float:  # d/dtheta log M
        z = threshold + t
        return 2 * t - math.exp(-(z**2) / 2 - scipy.special.log_ndtr(-z)) / math.sqrt(2 * math.pi)

    return float(
        scipy.optimize.brentq(slope, -abs(threshold) - 10, abs(threshold) + 10, xtol=1e-14)
    )


def gradient_table(
    thetas: Sequence[float],
    num_samples: int,
    repeats: int,
    threshold: float = 3.0,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Any:
    r"""Fixed-draw derivatives of both estimates of :math:`M` against the exact :math:`M'`.

    For every shift and algorithm, ``repeats`` independent fixed samples of ``num_samples``
    draws each (one call of :func:`~gradkit.sampling.common_random_numbers` per algorithm, the
    shifts and repeats vectorised) give ``repeats`` derivatives by autograd, summarised by
    :func:`gradkit.diagnostics.results_table` against :math:`M'(\theta)`, with the
    :func:`jump_term` beside them.

    Args:
        thetas: the shifts.
        num_samples: draws per estimate.
        repeats: independent estimates per shift (at least 2).
        threshold: :math:`a`.
        seed: the seed of the draws.
        device: where the draws are made.

    Returns:
        a pandas DataFrame indexed by (θ, algorithm), with the columns of
        :func:`~gradkit.diagnostics.results_table` and ``jump term``.
    """
    at = torch.tensor([float(t) for t in thetas], dtype=torch.float64, device=device)
    at.requires_grad_()
    (slopes,) = torch.autograd.grad(second_moment(at, threshold).sum(), at)
    derivatives = {}  # algorithm -> (shifts, repeats), all shifts in one call
    for name, algorithm in ALGORITHMS.items():
        shifts = at.detach()[:, None].expand(-1, repeats).clone().requires_grad_()
        fixed = common_random_numbers(algorithm, seed, device=device)
        (derivatives[name],) = torch.autograd.grad(
            fixed(shifts, num_samples, threshold).sum(), shifts
        )
    values = at.detach().tolist()
    estimates = {
        (t, name): derivatives[name][i] for i, t in enumerate(values) for name in ALGORITHMS
    }
    exact = {(t, name): slopes[i] for i, t in enumerate(values) for name in ALGORITHMS}
    table = results_table(estimates, exact, variance=False, index=["θ", "algorithm"])
    jumps = dict(zip(values, jump_term(at.detach(), threshold).tolist(), strict=True))
    table["jump term"] = [jumps[t] for t, _ in table.index]
    return table


def saa_shifts(
    algorithm: Estimate,
    num_samples: int,
    repeats: int,
    threshold: float = 3.0,
    *,
    start: float = 1.0,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Minimise :math:`\log \hat M(\theta; u)` for ``repeats`` fixed samples :math:`u`.

    Sample-average approximation: each repeat's draws are held fixed
    (:func:`~gradkit.sampling.common_random_numbers`) and its shift follows Adam on the
    derivative of the log estimate for ``steps`` steps, all repeats in one vectorised call.
    With :func:`from_target` each fixed-sample objective is convex in :math:`\theta`, and the
    minimisers scatter around :math:`\theta^\star` with a spread of order
    :math:`1/\sqrt n`; with :func:`from_proposal` the derivative ignores the samples that cross
    :math:`a`, and the shifts go where that biased derivative leads.

    Args:
        algorithm: :func:`from_target` or :func:`from_proposal` (or any estimate of that form).
        num_samples: draws per fixed sample.
        repeats: independent fixed samples.
        threshold: :math:`a`.
        start: the initial shift.
        steps: Adam steps.
        lr: Adam's learning rate.
        seed: the seed of the draws.
        device: where the draws are made.

    Returns:
        the final shifts ``(repeats,)``, float64.

    Raises:
        ValueError: when a fixed sample's estimate is 0 (no draw beyond the threshold).
    """
    fixed = common_random_numbers(algorithm, seed, device=device)
    shifts = torch.full((repeats,), float(start), dtype=torch.float64, device=device)
    shifts.requires_grad_()
    optimiser = torch.optim.Adam([shifts], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        objective = fixed(shifts, num_samples, threshold).log()
        if not torch.isfinite(objective).all():
            raise ValueError(
                f"{int((~torch.isfinite(objective)).sum())} of the {repeats} fixed samples have no "
                f"draw beyond the threshold {threshold}, so their estimate is 0 and has no "
                "minimiser; raise num_samples or start the shift nearer the threshold"
            )
        objective.sum().backward()
        optimiser.step()
    return shifts.detach()
