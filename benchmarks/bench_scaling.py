r"""How the time of one gradient estimate grows with samples, batch size and parameter count.

The distribution is :math:`B` independent :math:`D`-dimensional diagonal Gaussians,
``Independent(Normal(loc, scale), 1)`` with ``loc`` and ``scale`` of shape ``(B, D)`` (so
:math:`2BD` parameters), and the cost :math:`f(x) = \lVert x\rVert^2`, one value per batch
element (the plate case). One call of each gradkit estimator (score function, score function
with leave-one-out baseline, pathwise, measure-valued) is timed while one size grows and the
others stay fixed: the number of samples :math:`S`, the batch size :math:`B`, or the event
size :math:`D`. With coupling, the measure-valued estimator evaluates the cost :math:`1 + 3D`
times per sample (:func:`cost_evaluations`): once at the sample itself, twice for each of the
:math:`D` location coordinates (:math:`x^+` and :math:`x^-`), and once for each of the :math:`D`
scale coordinates, whose :math:`x^-` is the sample itself and reuses its cost (Mohamed et al.
2020, §6; :mod:`gradkit.weak_derivatives`). Each evaluation covers the whole batch and costs
:math:`O(D)`, so its work grows like :math:`D^2` once the evaluations dominate; every
estimator's work grows linearly in :math:`B` once per-call overhead no longer dominates. Writes
``scaling.csv/.png/.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch.distributions import Independent, Normal

import gradkit as gk
from benchmarks.bench_peers import measure_valued_missing
from benchmarks.common import main_for, time_call, write_results

__all__ = ["QUICK_SWEEPS", "SWEEPS", "cost_evaluations", "estimator_calls", "plot", "run", "sweep"]

# (swept size, values, fixed sizes) for each sweep
SWEEPS = {
    "samples": ((10, 100, 1_000, 10_000, 100_000), {"batch": 1, "dim": 10}),
    "batch": ((1, 10, 100, 1_000, 10_000), {"samples": 100, "dim": 10}),
    "dim": ((1, 10, 100, 1_000), {"samples": 100, "batch": 1}),
}
QUICK_SWEEPS = {
    "samples": ((10, 100), {"batch": 1, "dim": 2}),
    "batch": ((1, 10), {"samples": 10, "dim": 2}),
    "dim": ((1, 4), {"samples": 10, "batch": 1}),
}


def _cost(x: torch.Tensor) -> torch.Tensor:
    return (x**2).sum(-1)


def cost_evaluations(dim: int, *, batch: int = 1, samples: int = 8) -> float:
    r"""Evaluations of the cost per sample in one coupled ``gk.measure_valued`` call.

    Counts the samples that reach the cost :math:`\lVert x\rVert^2` for
    ``Independent(Normal(0, 1), 1)`` with batch shape ``(batch,)`` and event size ``dim``,
    divided by ``samples``: :math:`1 + 3D` for gradkit's Normal weak derivatives, whatever
    the batch size (a plate).

    Raises:
        ValueError: for a non-positive size.

    Example:
        >>> cost_evaluations(10), cost_evaluations(10, batch=4)
        (31.0, 31.0)
    """
    if min(dim, batch, samples) < 1:
        raise ValueError(f"sizes must be positive, got dim={dim}, batch={batch}, samples={samples}")
    rows = 0

    def counted(x: torch.Tensor) -> torch.Tensor:
        nonlocal rows
        rows += x.numel() // (batch * dim)
        return _cost(x)

    dist = Independent(Normal(torch.zeros(batch, dim), torch.ones(batch, dim)), 1)
    gk.measure_valued(counted, dist, samples, plate=True)
    return rows / samples


def estimator_calls() -> dict[str, Any]:
    """The estimators timed, as ``name -> fn(dist, samples)``; measure-valued if it works.

    Example:
        >>> sorted(estimator_calls())[:2]
        ['measure_valued', 'pathwise']
    """
    calls = {
        "score_function": lambda d, s: gk.score_function(_cost, d, s, plate=True),
        "score_function+leave_one_out": lambda d, s: gk.score_function(
            _cost, d, s, baseline=gk.baselines.LeaveOneOut(), plate=True
        ),
        "pathwise": lambda d, s: gk.pathwise(_cost, d, s, plate=True),
    }
    if measure_valued_missing() is None:
        calls["measure_valued"] = lambda d, s: gk.measure_valued(_cost, d, s, plate=True)
    return calls


def sweep(sweeps: dict[str, Any] = SWEEPS, *, repeats: int = 3) -> pd.DataFrame:
    """Time one call of every estimator at every size of every sweep.

    Returns:
        one row per (sweep, size, estimator): ``sweep``, ``value``, ``samples``, ``batch``,
        ``dim``, ``parameters`` (:math:`2BD`), ``estimator``, ``seconds`` (median of
        ``repeats`` calls after one warm-up).

    Example:
        >>> t = sweep({"batch": ((1, 2), {"samples": 4, "dim": 2})}, repeats=1)
        >>> len(t) == 2 * len(estimator_calls()), bool((t.seconds > 0).all())
        (True, True)
    """
    rows = []
    for name, (values, fixed) in sweeps.items():
        for value in values:
            size = {**fixed, name: value}
            loc = torch.zeros(size["batch"], size["dim"])
            scale = torch.ones(size["batch"], size["dim"])
            dist = Independent(Normal(loc, scale), 1)
            for estimator, call in estimator_calls().items():
                seconds = time_call(
                    lambda c=call, d=dist, s=size["samples"]: c(d, s), repeats=repeats
                )
                rows.append(
                    {
                        "sweep": name,
                        "value": value,
                        **size,
                        "parameters": 2 * size["batch"] * size["dim"],
                        "estimator": estimator,
                        "seconds": seconds,
                    }
                )
    return pd.DataFrame(rows)


_LABELS = {
    "samples": "samples S (B = {batch}, D = {dim})",
    "batch": "batch size B (S = {samples}, D = {dim})",
    "dim": "parameters 2BD, growing D (S = {samples}, B = {batch})",
}


def plot(table: pd.DataFrame) -> Any:
    """One log-log panel per sweep: seconds per call against the swept size, per estimator.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"sweep": ["batch"] * 2, "value": [1, 10], "samples": [10, 10],
        ...     "batch": [1, 10], "dim": [2, 2], "parameters": [4, 40],
        ...     "estimator": ["pathwise"] * 2, "seconds": [1e-4, 2e-4]})
        >>> len(plot(t).axes)
        1
    """
    names = list(dict.fromkeys(table.sweep))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        part = table[table.sweep == name]
        x = "parameters" if name == "dim" else name
        for estimator, rows in part.groupby("estimator", sort=False):
            ax.loglog(rows[x], rows.seconds, "o-", label=estimator, markersize=4)
        first = part.iloc[0]
        ax.set_xlabel(_LABELS[name].format(**{k: first[k] for k in ("samples", "batch", "dim")}))
        ax.set_ylabel("seconds per call")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(out: Path, *, quick: bool = False) -> None:
    """Run every sweep and write ``scaling`` CSV, PNG and JSON to ``out``.

    ``quick`` runs :data:`QUICK_SWEEPS`, each size timed once.
    """
    sweeps = QUICK_SWEEPS if quick else SWEEPS
    table = sweep(sweeps, repeats=1 if quick else 3)
    fig = plot(table)
    meta = {"quick": quick, "sweeps": {k: [list(v), f] for k, (v, f) in sweeps.items()}}
    write_results(out, "scaling", table, fig=fig, meta=meta)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main_for(run, __doc__.splitlines()[0]))
