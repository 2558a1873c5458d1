"""gradkit against Pyro and Storchastic: mean, variance and wall time on three problems.

For each problem of :mod:`benchmarks.problems` every library draws ``copies`` (1,000)
independent gradient estimates of ``samples`` (100) samples each, in two ways:

* ``batched`` — one call with a plate of ``copies`` independent parameter copies (the point of a
  batched library; gradkit's estimators take the copies as a batch dimension, Pyro a
  ``pyro.plate``, Storchastic ``storch.denote_independent``);
* ``per_call`` — ``copies`` calls, one estimate each.

A moving-average baseline is sequential by construction (each estimate's baseline averages the
earlier estimates), so it is only run per call. Each row gives the mean against the exact
gradient (its z-score, and "WRONG MEAN" beyond 5 standard errors), the variance of one
estimate, the wall time, and both ratios to gradkit's same estimator: time (how many times
slower than gradkit's fastest way of computing it, and than gradkit in the same mode) and
variance. Writes ``peers_<problem>.csv/.png/.json``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import Tensor

import gradkit as gk
from benchmarks import peers as peer_lib
from benchmarks import problems
from benchmarks.common import main_for, summarise, verdict, write_results

__all__ = [
    "COLUMNS",
    "ESTIMATORS",
    "compare",
    "measure_valued_missing",
    "open_workers",
    "plot",
    "run",
]

# The estimators compared on each problem (gradkit's names; peers map them to their own).
ESTIMATORS = {
    "bernoulli": (
        "score_function",
        "score_function+moving_average",
        "score_function+leave_one_out",
        "measure_valued",
    ),
    "factorised": (
        "score_function",
        "score_function+moving_average",
        "score_function+leave_one_out",
        "measure_valued",
    ),
    "gaussian": ("pathwise", "score_function", "measure_valued"),
}
# The table's columns, in order.
COLUMNS = [
    "problem",
    "library",
    "estimator",
    "mode",
    "parameter",
    "mean",
    "exact",
    "max_abs_error",
    "max_abs_z",
    "variance",
    "variance_vs_gradkit",
    "seconds",
    "ms_per_estimate",
    "times_gradkit_best",
    "times_gradkit_same_mode",
    "verdict",
    "note",
    "estimates",
    "samples",
]
_NOTES = {
    ("pyro", "score_function+moving_average"): "Pyro's decaying average: one per sample slot",
    ("pyro", "score_function+leave_one_out"): "not offered by Pyro's TraceGraph_ELBO",
    ("storchastic", "score_function+moving_average"): "Storchastic's average includes the "
    "current batch",
    ("storchastic", "score_function+leave_one_out"): "Storchastic's batch_average baseline",
    ("storchastic", "GumbelSoftmax-ST"): "a relaxation: biased by design",
    ("storchastic", "ScoreFunctionWOR"): "k = 2 without replacement (enumerates z)",
    ("storchastic", "RaoBlackwellSF"): "2 samples, Rao-Blackwellised (enumerates z)",
}


def measure_valued_missing() -> str | None:
    """Why ``gk.measure_valued`` cannot run here, or ``None`` when it works.

    Example:
        >>> measure_valued_missing() is None
        True
    """
    try:
        gk.measure_valued(lambda x: x**2, torch.distributions.Normal(0.0, 1.0), 4)
    except Exception as err:  # the engine is optional for this benchmark
        return f"gk.measure_valued is not available ({type(err).__name__}: {err})"
    return None


def _gradkit_runner(problem: problems.Problem, estimator: str, copies: int | None, samples: int):
    """``(run, reset)`` for gradkit, in the form :func:`benchmarks.peers.measure` takes."""
    name, _, baseline_name = estimator.partition("+")
    if name not in gk.ESTIMATORS:
        raise NotImplementedError(f"gradkit has no {estimator} estimator")
    if name == "pathwise" and problem.name != "gaussian":
        raise NotImplementedError("Bernoulli latents have no reparameterisation")
    fn = gk.ESTIMATORS[name]
    state: dict[str, Any] = {}

    def reset() -> None:
        options: dict[str, Any] = {}
        if baseline_name == "moving_average":
            options["baseline"] = gk.baselines.ExponentialMovingAverage(peer_lib.DECAY)
        elif baseline_name == "leave_one_out":
            options["baseline"] = gk.baselines.LeaveOneOut()
        state["options"] = options

    def run() -> dict[str, Tensor]:
        dist = problem.distribution(problem.parameters(copies))
        grads = fn(problem.cost, dist, samples, plate=copies is not None, **state["options"])
        return {k: v.mean(0) for k, v in grads.items()}

    reset()
    return run, reset


def _modes(estimator: str) -> tuple[str, ...]:
    if estimator.endswith("moving_average"):
        return ("per_call",)
    return ("batched", "per_call")


def _rows(
    library: str,
    problem: problems.Problem,
    estimator: str,
    mode: str,
    result: dict[str, Any],
    copies: int,
    samples: int,
) -> list[dict[str, Any]]:
    exact = problem.exact()
    base = {
        "problem": problem.name,
        "library": library,
        "estimator": estimator,
        "mode": mode,
        "estimates": copies,
        "samples": samples,
        "seconds": result["seconds"],
        "ms_per_estimate": 1e3 * result["seconds"] / copies,
        "note": _NOTES.get((library, estimator), ""),
    }
    if result["error"]:
        nan = math.nan
        return [
            {
                **base,
                "parameter": name,
                "mean": nan,
                "exact": exact[name].reshape(-1)[0].item(),
                "max_abs_error": nan,
                "max_abs_z": nan,
                "variance": nan,
                "verdict": "not offered"
                if result["error"] == "not offered"
                else verdict(nan, result["error"]),
            }
            for name in exact
        ]
    rows = []
    for name, estimates in result["estimates"].items():
        stats = summarise(estimates, exact[name])
        size = exact[name].numel()
        label = name if size == 1 else f"{name} ({size})"
        scalar = {"mean": stats["mean"], "exact": stats["exact"]} if size == 1 else {}
        rows.append(
            {**base, "parameter": label, **stats, "verdict": verdict(stats["max_abs_z"], **scalar)}
        )
    return rows


def _add_ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Times and variances relative to gradkit's same estimator (and same mode)."""
    ours = table[(table.library == "gradkit") & table.verdict.eq("ok")]
    best = ours.groupby(["estimator", "parameter"]).seconds.min()
    same = ours.set_index(["estimator", "mode", "parameter"])
    slower_best, slower_same, var_ratio = [], [], []
    for row in table.itertuples():
        key = (row.estimator, row.mode, row.parameter)
        slower_best.append(_ratio(row.seconds, best.get((row.estimator, row.parameter))))
        matched = same.loc[key] if key in same.index else None
        slower_same.append(_ratio(row.seconds, None if matched is None else matched.seconds))
        var_ratio.append(_ratio(row.variance, None if matched is None else matched.variance))
    table = table.assign(
        times_gradkit_best=slower_best,
        times_gradkit_same_mode=slower_same,
        variance_vs_gradkit=var_ratio,
    )
    return table[COLUMNS]


def _ratio(a: float, b: float | None) -> float:
    """``a / b``, or NaN when ``b`` is missing, zero or NaN."""
    if b is None or not math.isfinite(b) or b == 0 or not math.isfinite(a):
        return math.nan
    return a / b


def compare(
    problem: str,
    *,
    copies: int = 1000,
    samples: int = 100,
    repeats: int = 5,
    peers: Sequence[str] | None = None,
    seed: int = 0,
    workers: Mapping[str, peer_lib.PeerWorker] | None = None,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Run every library's estimators on ``problem``; one row per (library, estimator, mode).

    Args:
        problem: ``"bernoulli"``, ``"factorised"`` or ``"gaussian"``.
        copies: independent estimates per row (>= 2).
        samples: samples per estimate (>= 2; leave-one-out needs 2).
        repeats: timed repeats of a batched call (median).
        peers: which peers to run; ``None`` runs every installed one.
        seed: torch seed for every row.
        workers: already started peer processes to use (see :func:`open_workers`); a peer
            without one gets a process of its own for this call.

    Returns:
        the table, and ``{what: reason}`` for everything skipped (peers not installed,
        the measure-valued engine missing).

    Raises:
        ValueError: for ``copies < 2`` or ``samples < 2``.

    Example:
        >>> table, skipped = compare("gaussian", copies=4, samples=4, repeats=1, peers=())
        >>> sorted(set(table.estimator)), len(table)  # 3 estimators x 2 modes x 2 parameters
        (['measure_valued', 'pathwise', 'score_function'], 12)
    """
    if copies < 2 or samples < 2:
        raise ValueError(
            f"need copies >= 2 (to measure a variance) and samples >= 2 (leave-one-out), "
            f"got copies={copies}, samples={samples}"
        )
    spec = problems.get(problem)
    skipped: dict[str, str] = {}
    reason = measure_valued_missing()
    estimators = ESTIMATORS[problem]
    if reason:
        skipped["gradkit measure_valued"] = reason
        estimators = tuple(e for e in estimators if e != "measure_valued")
    rows: list[dict[str, Any]] = []
    for estimator in estimators:
        for mode in _modes(estimator):
            torch.manual_seed(seed)
            result = peer_lib.measure(
                _gradkit_runner, spec, estimator, mode, copies, samples, repeats
            )
            rows += _rows("gradkit", spec, estimator, mode, result, copies, samples)
    for peer in peer_lib.PEERS if peers is None else peers:
        reason = peer_lib.missing(peer)
        if reason:
            skipped[peer] = reason
            continue
        wanted = [e for e in estimators if e != "measure_valued"]
        if problem == "bernoulli" and peer == "storchastic":
            wanted += list(peer_lib.STORCH_EXTRAS)
        given = (workers or {}).get(peer)
        with contextlib.nullcontext(given) if given else peer_lib.PeerWorker(peer) as worker:
            for estimator in wanted:
                for mode in _modes(estimator):
                    if estimator in peer_lib.ESTIMATORS[peer]:
                        result = worker.estimate(
                            problem, estimator, mode, copies, samples, repeats=repeats, seed=seed
                        )
                    else:
                        result = {"estimates": {}, "seconds": math.nan, "error": "not offered"}
                    rows += _rows(peer, spec, estimator, mode, result, copies, samples)
    return _add_ratios(pd.DataFrame(rows)), skipped


@contextlib.contextmanager
def open_workers(peers: Sequence[str] | None = None) -> Iterator[dict[str, peer_lib.PeerWorker]]:
    """One :class:`~benchmarks.peers.PeerWorker` per installed peer, shared by several calls.

    Example:
        >>> with open_workers([]) as workers:
        ...     workers
        {}
    """
    wanted = peer_lib.PEERS if peers is None else peers
    with contextlib.ExitStack() as stack:
        yield {
            peer: stack.enter_context(peer_lib.PeerWorker(peer))
            for peer in wanted
            if peer_lib.missing(peer) is None
        }


_COLOURS = {"gradkit": "tab:blue", "pyro": "tab:orange", "storchastic": "tab:green"}


def plot(table: pd.DataFrame, title: str = "") -> Any:
    """Time per estimate and variance per row, as points on log axes; wrong means as red crosses.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"library": ["gradkit"], "estimator": ["pathwise"],
        ...     "mode": ["batched"], "parameter": ["loc"], "ms_per_estimate": [0.01],
        ...     "variance": [0.1], "verdict": ["ok"]})
        >>> fig = plot(t)
        >>> len(fig.axes)
        2
    """
    from matplotlib.ticker import LogLocator, NullFormatter

    rows = table[table.variance.notna()]
    grouped = (
        rows.groupby(["library", "estimator", "mode"], sort=False)
        .agg(ms=("ms_per_estimate", "first"), var=("variance", "sum"), ok=("verdict", "first"))
        .reset_index()
    )
    labels = [f"{r.library} · {r.estimator} · {r.mode}" for r in grouped.itertuples()]
    colours = [_COLOURS.get(lib, "grey") for lib in grouped.library]
    wrong = (grouped.ok != "ok").to_numpy()
    # a (numerically) zero variance, e.g. exact enumeration, cannot sit on a log axis: draw it
    # at a floor below the others, marked "0"
    zero = (grouped["var"] <= 1e-9 * grouped["var"].max()).to_numpy()
    floor = grouped["var"][~zero].min() / 10 if (~zero).any() else 1e-12
    grouped["var"] = grouped["var"].where(~zero, floor)
    height = max(2.5, 0.3 * len(grouped) + 1.0)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    y = list(range(len(grouped)))
    for ax, column, xlabel in (
        (axes[0], "ms", "time per estimate (ms)"),
        (axes[1], "var", "variance of one estimate"),
    ):
        values = grouped[column].to_numpy()
        ax.scatter(
            values[~wrong],
            [i for i, w in zip(y, wrong, strict=True) if not w],
            c=[c for c, w in zip(colours, wrong, strict=True) if not w],
            s=30,
            zorder=3,
        )
        ax.scatter(
            values[wrong],
            [i for i, w in zip(y, wrong, strict=True) if w],
            c="red",
            marker="x",
            s=40,
            zorder=3,
            label="wrong mean",
        )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(numticks=12))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, axis="both", alpha=0.3)
        ax.set_xlabel(xlabel + ", log scale")
    for i in [i for i, z in zip(y, zero, strict=True) if z]:
        axes[1].annotate("0", (floor, i), xytext=(5, 0), textcoords="offset points", va="center")
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    if wrong.any():
        axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def run(out: Path, *, quick: bool = False, peers: Sequence[str] | None = None) -> None:
    """Run the three comparisons and write ``peers_<problem>`` CSV, PNG and JSON to ``out``.

    ``quick`` runs 10 estimates of 10 samples; ``peers`` as in :func:`compare`.
    """
    sizes = {"copies": 10, "samples": 10, "repeats": 1} if quick else {}
    with open_workers(peers) as workers:
        for name, spec in problems.PROBLEMS.items():
            table, skipped = compare(name, peers=peers, workers=workers, **sizes)
            for what, reason in skipped.items():
                print(f"[bench_peers] skipped {what}: {reason}", flush=True)
            fig = plot(table, f"{name}: {spec.title}")
            meta = {
                "quick": quick,
                "problem": spec.title,
                "sizes": {"copies": 1000, "samples": 100, "repeats": 5, **sizes},
                "skipped": skipped,
            }
            write_results(out, f"peers_{name}", table, fig=fig, meta=meta)
            plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main_for(run, __doc__.splitlines()[0]))
