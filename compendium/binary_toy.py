r"""The REBAR/RELAX toy: minimise :math:`\mathbb{E}_{b \sim \mathrm{Bern}(\theta)}[(b - t)^2]`.

Tucker et al. (2017) and Grathwohl et al. (2018) test discrete estimators on one Bernoulli
with the cost :math:`(b - t)^2`. Its expectation :math:`\theta(1 - t)^2 + (1 - \theta)t^2` is
linear in :math:`\theta`, with derivative :math:`1 - 2t`: for :math:`t` near :math:`\tfrac12`
the two costs differ by :math:`|1 - 2t|` only, so the gradient's sign is a small difference
between two nearly equal numbers, buried in the score function's noise. This module is the
discrete-latent chapter's support (beside the book's machinery, not in the installed library,
and using only gradkit's public API); it holds what the chapter measures on the toy: every
estimator's variance against the number of evaluations of ``f``, and optimisation curves.
Everything is vectorised over independent repetitions (a plate of copies of the one-Bernoulli
problem).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Bernoulli

from gradkit.autodiff import expectation
from gradkit.models.sbn import EVALUATIONS_PER_SAMPLE
from gradkit.registry import Estimator, get_estimator

__all__ = [
    "exact_gradient",
    "expected_cost",
    "optimise",
    "tune",
    "variance_by_evaluations",
]


def _per_draw(estimator: str | Estimator) -> int:
    """Evaluations of ``f`` per draw, by the VAE benchmark's rule (REBAR: 3), else 1."""
    return EVALUATIONS_PER_SAMPLE.get(get_estimator(estimator).name, 1)


def _draws(estimator: str | Estimator, evaluations: int) -> int:
    """The draws that cost ``evaluations`` evaluations (even for the antithetic pairs)."""
    draws = max(1, evaluations // _per_draw(estimator))
    if get_estimator(estimator).name in ("arm", "disarm"):
        draws = max(2, draws - draws % 2)
    return draws


def _check_target(t: float) -> float:
    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)):
        raise ValueError(f"the target t must be a finite number, got {t!r}")
    return float(t)


def expected_cost(theta: Tensor | float, t: float) -> Tensor:
    r""":math:`\mathbb{E}[(b - t)^2] = \theta(1 - t)^2 + (1 - \theta)t^2`."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    return theta * (1 - t) ** 2 + (1 - theta) * t**2


def exact_gradient(theta: Tensor | float, t: float, *, wrt: str = "logits") -> Tensor:
    r"""The exact gradient: :math:`1 - 2t` in :math:`\theta`, times :math:`\theta(1 - \theta)`
    in the logit."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    if wrt not in ("logits", "probs"):
        raise ValueError(f"wrt must be 'logits' or 'probs', got {wrt!r}")
    slope = torch.full_like(theta, 1 - 2 * t)
    return slope * theta * (1 - theta) if wrt == "logits" else slope


def _cost(t: float) -> Any:
    return lambda b: (b - t) ** 2


def variance_by_evaluations(
    estimators: Mapping[str, str | Estimator],
    *,
    theta: float,
    t: float,
    evaluations: list[int],
    repeats: int,
    generator: torch.Generator | None = None,
) -> list[dict[str, Any]]:
    r"""Each estimator's gradient in the logit at the cost of ``E`` evaluations of ``f``.

    For every estimator and every budget ``E``, ``repeats`` independent estimates (a plate of
    copies of the problem, one call) give the mean, its standard error, the z-score against
    :func:`exact_gradient` and the variance of one estimate.

    Returns:
        A list with one dict per estimator and budget (``pandas.DataFrame`` takes it), keyed
        ``estimator``, ``evaluations``, ``draws``, ``mean``, ``standard_error``, ``z``,
        ``variance``, ``exact``, ``seconds``.
    """
    t = _check_target(t)
    if not 0 < theta < 1:
        raise ValueError(f"theta must lie in (0, 1), got {theta}")
    exact = float(exact_gradient(theta, t))
    logit = math.log(theta / (1 - theta))
    rows: list[dict[str, Any]] = []
    for label, estimator in estimators.items():
        for budget in evaluations:
            draws = _draws(estimator, budget)
            dist = Bernoulli(logits=torch.full((repeats,), logit, dtype=torch.float64))
            start = time.perf_counter()
            estimates = get_estimator(estimator)(
                _cost(t), dist, draws, plate=True, generator=generator
            )["logits"].mean(0)
            seconds = time.perf_counter() - start
            variance = float(estimates.var())
            mean = float(estimates.mean())
            if variance <= (1e-12 * abs(exact)) ** 2:  # deterministic up to rounding
                variance = 0.0
            se = math.sqrt(variance / repeats)
            if se > 0:
                z = (mean - exact) / se
            else:
                z = (
                    0.0
                    if abs(mean - exact) <= 1e-9 * abs(exact)
                    else math.copysign(math.inf, mean - exact)
                )
            rows.append(
                {
                    "estimator": label,
                    "evaluations": draws * _per_draw(estimator),
                    "draws": draws,
                    "mean": mean,
                    "standard_error": se,
                    "z": z,
                    "variance": variance,
                    "exact": exact,
                    "seconds": seconds,
                }
            )
    return rows


def tune(
    estimator: Estimator,
    *,
    theta: float,
    t: float,
    steps: int,
    draws: int = 1,
    lr: float = 0.01,
    generator: torch.Generator | None = None,
) -> list[float]:
    r"""Train a learnable estimator's control variate (REBAR, RELAX) at a fixed :math:`\theta`.

    Each step estimates the gradient and takes an Adam step on the estimator's parameters
    down the variance objective, which the estimator accumulates itself in training mode.

    Returns:
        the squared estimate of each step (its mean is the variance plus the squared mean).
    """
    t = _check_target(t)
    if not isinstance(estimator, torch.nn.Module):
        raise TypeError(
            f"tune trains an estimator with parameters (gk.discrete.REBAR, RELAX), got "
            f"{type(estimator).__name__}"
        )
    estimator.train()
    opt = torch.optim.Adam(estimator.parameters(), lr=lr)
    logit = torch.tensor(math.log(theta / (1 - theta)), dtype=torch.float64)
    squares = []
    for _ in range(steps):
        opt.zero_grad()
        g = estimator(_cost(t), Bernoulli(logits=logit), draws, generator=generator)["logits"]
        squares.append(float(g.mean(0) ** 2))
        opt.step()
    return squares


def optimise(
    estimators: Mapping[str, str | Estimator],
    *,
    t: float,
    steps: int,
    evaluations: int = 1,
    lr: float = 0.01,
    chains: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    r"""Minimise :math:`\mathbb{E}[(b - t)^2]` in the logit with Adam from :math:`\theta = 0.5`.

    Each estimator runs ``chains`` independent optimisations at once (a plate of copies) through
    :func:`~gradkit.autodiff.expectation`, with ``evaluations`` evaluations of ``f`` per step;
    an estimator that is a ``torch.nn.Module`` (REBAR, RELAX) trains its own parameters in the
    same optimiser. The gradient in :math:`\theta` is :math:`1 - 2t`, so the optimum is
    :math:`\theta = 0` for :math:`t < \tfrac12` and :math:`\theta = 1` for :math:`t > \tfrac12`.

    Returns:
        A list with one dict per estimator and step, keyed ``estimator``, ``step``, ``theta``
        (the mean over chains) and ``expected_cost`` (exact, the mean over chains).
    """
    from tqdm.auto import tqdm

    t = _check_target(t)
    rows: list[dict[str, Any]] = []
    for label, estimator in estimators.items():
        est = get_estimator(estimator)
        draws = _draws(est, evaluations)
        logits = torch.zeros(chains, dtype=torch.float64, requires_grad=True)
        params: list[Tensor] = [logits]
        if isinstance(est, torch.nn.Module):
            est.train()
            params += list(est.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        for step in tqdm(range(steps), desc=label, disable=not progress, leave=False):
            opt.zero_grad()
            value = expectation(
                _cost(t),
                Bernoulli(logits=logits),
                draws,
                estimator=est,
                plate=True,
                generator=generator,
            )
            value.sum().backward()
            opt.step()
            theta = torch.sigmoid(logits.detach())
            rows.append(
                {
                    "estimator": label,
                    "step": step + 1,
                    "theta": float(theta.mean()),
                    "expected_cost": float(expected_cost(theta, t).mean()),
                }
            )
    return rows
