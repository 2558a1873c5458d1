r"""Stochastic triples on the random walk: time per estimate against the score function.

The walk of :func:`gradkit.models.programs.random_walk` (``steps`` moves of ±1, up with
probability :math:`e^{-x/\theta}`, cost :math:`x_n^2`, :math:`\theta = 2n`), for 10, 30 and 100
steps and ``runs`` runs per estimate. Four ways to get one estimate (the mean of ``runs``
per-run derivatives), all timed in the same process:

* ``stochastic_ad``: :func:`gradkit.stochastic_ad.derivative_estimates`, the program written
  for one run;
* ``score_function``: :func:`gradkit.stochastic_ad.score_function_estimates` on the same
  program (leave-one-out baseline);
* ``hand_stochastic_ad`` and ``hand_score_function``: the same two estimators written by hand
  for this walk as batched tensor code (:func:`hand_stochastic_ad`,
  :func:`hand_score_function`): no triples, no dispatch, the floor any general implementation
  can approach.

For each: seconds per estimate, per-run variance, z-score against the exact derivative (dynamic
programming, :func:`gradkit.models.programs.random_walk_exact`), the ratio of its time to the
score function's, to its hand-written counterpart's, and the *work-normalised variance*
(variance × seconds, the cost of reaching a given standard error; lower is better).

``PYTHONPATH=. python -m benchmarks.bench_programs --out DIR [--quick]`` writes
``programs_walk`` (CSV, PNG, JSON).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import Tensor

from benchmarks.common import main_for, summarise, time_call, verdict, write_results
from gradkit import stochastic_ad as sad
from gradkit.models import programs

__all__ = ["LENGTHS", "compare", "hand_score_function", "hand_stochastic_ad", "plot", "run"]

LENGTHS = (10, 30, 100)


def _walk_probability(position: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """The up-probability :math:`e^{-x/\\theta}` and its derivative in :math:`\\theta`."""
    p = torch.exp(-position / theta)
    return p, p * position / theta**2


def hand_stochastic_ad(theta: float, steps: int, runs: int, generator: torch.Generator) -> Tensor:
    """The pruned stochastic derivative of the walk, written by hand for all runs at once.

    Each step's Bernoulli has :math:`\\partial_\\theta p \\ge 0`, so a run that steps down
    offers the jump "up instead" with weight :math:`\\partial_\\theta p/(1-p)`; the run keeps
    one alternative walk, coupled through the same uniforms, and switches to the new jump with
    probability :math:`w/(W+w)`.

    Example:
        >>> g = hand_stochastic_ad(20.0, 10, 5, torch.Generator().manual_seed(0))
        >>> g.shape
        torch.Size([5])
    """
    dtype = torch.float64
    x = torch.zeros(runs, dtype=dtype)
    alt = torch.zeros(runs, dtype=dtype)
    weight = torch.zeros(runs, dtype=dtype)
    for _ in range(steps):
        u, v = torch.rand((2, runs), generator=generator, dtype=dtype)
        p, dp = _walk_probability(x, theta)
        up = u > 1 - p
        up_alt = u > 1 - torch.exp(-alt / theta)
        w = torch.where(up, 0.0, dp / (1 - p).clamp_min(torch.finfo(dtype).tiny))
        take = v * (weight + w) < w
        x_next = x + 2.0 * up - 1.0
        alt = torch.where(take, x_next + 2.0, alt + 2.0 * up_alt - 1.0)
        weight = weight + w
        x = x_next
    return weight * (alt**2 - x**2)


def hand_score_function(theta: float, steps: int, runs: int, generator: torch.Generator) -> Tensor:
    """The score-function estimate of the walk with a leave-one-out baseline, by hand.

    Example:
        >>> g = hand_score_function(20.0, 10, 5, torch.Generator().manual_seed(0))
        >>> g.shape
        torch.Size([5])
    """
    dtype = torch.float64
    x = torch.zeros(runs, dtype=dtype)
    score = torch.zeros(runs, dtype=dtype)
    for _ in range(steps):
        u = torch.rand(runs, generator=generator, dtype=dtype)
        p, dp = _walk_probability(x, theta)
        up = (u > 1 - p).to(dtype)
        inside = p < 1  # at p = 1 the step is sure and carries no score
        safe = torch.where(inside, p, 0.5)
        score = score + torch.where(inside, (up - safe) / (safe * (1 - safe)) * dp, 0.0)
        x = x + 2.0 * up - 1.0
    cost = x**2
    baseline = (cost.sum() - cost) / (runs - 1)
    return (cost - baseline) * score


def _ways(steps: int) -> dict[str, Callable[[float, int, torch.Generator], Tensor]]:
    program = functools.partial(programs.random_walk, steps=steps)

    def triples(theta: float, runs: int, g: torch.Generator) -> Tensor:
        t = torch.tensor(theta, dtype=torch.float64)
        return sad.derivative_estimates(program, t, runs, generator=g)

    def score(theta: float, runs: int, g: torch.Generator) -> Tensor:
        t = torch.tensor(theta, dtype=torch.float64)
        return sad.score_function_estimates(program, t, runs, generator=g)

    return {
        "stochastic_ad": triples,
        "score_function": score,
        "hand_stochastic_ad": lambda t, r, g: hand_stochastic_ad(t, steps, r, g),
        "hand_score_function": lambda t, r, g: hand_score_function(t, steps, r, g),
    }


def compare(
    lengths: Sequence[int] = LENGTHS, runs: int = 10_000, *, repeats: int = 3, seed: int = 0
) -> pd.DataFrame:
    """Time and check the four ways at each length.

    Returns:
        one row per (steps, way): ``steps``, ``way``, ``runs``, ``seconds``, ``mean``,
        ``exact``, ``z``, ``variance``, ``verdict``, ``vs_score_function`` (this way's time
        over the score function's, the triples compared with the triples' score function and
        the hand-written with the hand-written), ``vs_hand`` (over its hand-written
        counterpart, for the two library ways) and ``work_variance`` (variance × seconds).

    Example:
        >>> t = compare((5,), runs=200, repeats=1)
        >>> sorted(t.way)[:2], bool((t.verdict == "ok").all())
        (['hand_score_function', 'hand_stochastic_ad'], True)
    """
    rows = []
    for steps in lengths:
        theta = 2.0 * steps
        _, exact = programs.random_walk_exact(theta, steps)
        for way, call in _ways(steps).items():
            generator = torch.Generator().manual_seed(seed + steps)
            start = time.perf_counter()
            est = call(theta, runs, generator)
            first = time.perf_counter() - start
            seconds = (
                first
                if repeats <= 1
                else time_call(
                    lambda c=call, t=theta: c(t, runs, torch.Generator().manual_seed(seed)),
                    warmup=0,
                    repeats=repeats,
                )
            )
            stats = summarise(est, torch.tensor(exact))
            rows.append(
                {
                    "steps": steps,
                    "way": way,
                    "runs": runs,
                    "seconds": seconds,
                    "mean": stats["mean"],
                    "exact": exact,
                    "z": stats["max_abs_z"],
                    "variance": stats["variance"],
                    "verdict": verdict(stats["max_abs_z"], mean=stats["mean"], exact=exact),
                }
            )
    table = pd.DataFrame(rows)
    seconds = table.set_index(["steps", "way"]).seconds
    partner = {
        "stochastic_ad": ("score_function", "hand_stochastic_ad"),
        "score_function": ("score_function", "hand_score_function"),
        "hand_stochastic_ad": ("hand_score_function", None),
        "hand_score_function": ("hand_score_function", None),
    }
    table["vs_score_function"] = [
        r.seconds / seconds[(r.steps, partner[r.way][0])] for r in table.itertuples()
    ]
    table["vs_hand"] = [
        r.seconds / seconds[(r.steps, partner[r.way][1])] if partner[r.way][1] else math.nan
        for r in table.itertuples()
    ]
    table["work_variance"] = table.variance * table.seconds
    return table


def plot(table: pd.DataFrame) -> Any:
    """Seconds per estimate and work-normalised variance against the walk's length.

    Example:
        >>> len(plot(compare((5,), runs=100, repeats=1)).axes)
        2
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for way, part in table.groupby("way", sort=False):
        style = "s--" if way.startswith("hand") else "o-"
        left.loglog(part.steps, part.seconds, style, label=way)
        right.loglog(part.steps, part.work_variance, style, label=way)
    left.set_xlabel("steps")
    left.set_ylabel(f"seconds per estimate ({int(table.runs.iloc[0]):,} runs)")
    right.set_xlabel("steps")
    right.set_ylabel("variance × seconds (lower is better)")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(out: Path, *, quick: bool = False) -> None:
    """Run :func:`compare` and write ``programs_walk`` CSV, PNG and JSON to ``out``.

    ``quick`` runs 5 and 10 steps with 200 runs, timed once.
    """
    lengths, runs = ((5, 10), 200) if quick else (LENGTHS, 10_000)
    table = compare(lengths, runs, repeats=1 if quick else 3)
    fig = plot(table)
    meta = {"quick": quick, "lengths": list(lengths), "runs": runs}
    write_results(out, "programs_walk", table, fig=fig, meta=meta)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main_for(run, __doc__.splitlines()[0]))
