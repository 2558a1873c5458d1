r"""The core's speed per call and its cost at scale, side by side with hand-written torch.

Two measurements of the per-sample engine and the registry behind every estimator:

* **Per call** (``core_per_call``): the one-Bernoulli problem of :mod:`benchmarks.problems`
  (cost :math:`(z - 0.45)^2`, 100 samples, leave-one-out baseline), 1,000 calls in a row, one
  estimate each, as a training loop makes them. gradkit's per-sample interface
  (``gk.score_function``) and ``gk.expectation`` followed by ``backward()`` are timed against
  the same estimate written by hand in plain torch (sample, cost, leave-one-out, the score
  :math:`z - \sigma(\theta)` written out; for ``expectation``, the surrogate
  :math:`\overline{(f - b)\log p} + \bar f` and its backward pass) and, when it is installed,
  Storchastic's ``ScoreFunction(baseline_factory="batch_average")`` in its own process (which
  also differentiates a surrogate, so it is compared with ``gk.expectation``). Each loop is
  timed three times, round-robin; the fastest of the three counts. Targets: within 2x of the
  hand-written code, and at least 10x faster than Storchastic.
* **At scale** (``core_scale``): REINFORCE with a leave-one-out baseline through
  ``gk.expectation`` on ``Categorical(logits)`` of shape (64, 10000) (a policy over a large
  action space, a language model's vocabulary), 512 and 4,096 samples, one cost per context
  (``plate=True``), against the same surrogate written by hand (gather the sampled
  log-probabilities, weight, backward). Each runs in a fresh process, which reports its wall
  time per step and its peak resident memory above what it held before the timed steps (after
  one warm-up step; on Linux the peak is reset through ``/proc/self/clear_refs``).
  Target: memory ``O(parameter size + samples x batch)`` and time within 2x of the
  hand-written surrogate.
"""

from __future__ import annotations

import math
import multiprocessing
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

import gradkit as gk
from benchmarks import peers as peer_lib
from benchmarks import problems
from benchmarks.common import RESULTS, main_for, write_results

__all__ = ["per_call_rows", "run", "scale_rows"]

_COST_CENTRE = 0.45


def _cost(z: torch.Tensor) -> torch.Tensor:
    return (z - _COST_CENTRE) ** 2


def _per_call_functions(samples: int) -> dict[str, Callable[[], Any]]:
    theta = problems.get("bernoulli").parameters()["logits"]
    leaf = theta.clone().requires_grad_()
    loo = gk.baselines.LeaveOneOut()

    def gradkit_rows() -> torch.Tensor:
        dist = torch.distributions.Bernoulli(logits=theta)
        return gk.score_function(_cost, dist, samples, baseline=loo)["logits"].mean(0)

    def gradkit_expectation() -> torch.Tensor:
        leaf.grad = None
        dist = torch.distributions.Bernoulli(logits=leaf)
        gk.expectation(_cost, dist, samples, estimator="score_function", baseline=loo).backward()
        assert leaf.grad is not None
        return leaf.grad

    def by_hand() -> torch.Tensor:
        dist = torch.distributions.Bernoulli(logits=theta)
        z = dist.sample((samples,))
        f = _cost(z)
        baseline = (f.sum() - f) / (samples - 1)
        return ((f - baseline) * (z - torch.sigmoid(theta))).mean(0)

    def surrogate_by_hand() -> torch.Tensor:
        leaf.grad = None
        dist = torch.distributions.Bernoulli(logits=leaf)
        with torch.no_grad():
            z = dist.sample((samples,))
            f = _cost(z)
            weight = f - (f.sum() - f) / (samples - 1)
        ((weight * dist.log_prob(z)).mean() + f.mean()).backward()
        assert leaf.grad is not None
        return leaf.grad

    return {
        "gradkit, gk.score_function": gradkit_rows,
        "plain torch, estimate by hand": by_hand,
        "gradkit, gk.expectation + backward": gradkit_expectation,
        "plain torch, surrogate + backward by hand": surrogate_by_hand,
    }


# each implementation's hand-written reference
_REFERENCE = {
    "gradkit, gk.score_function": "plain torch, estimate by hand",
    "plain torch, estimate by hand": "plain torch, estimate by hand",
    "gradkit, gk.expectation + backward": "plain torch, surrogate + backward by hand",
    "plain torch, surrogate + backward by hand": "plain torch, surrogate + backward by hand",
    "Storchastic, ScoreFunction(batch_average)": "plain torch, surrogate + backward by hand",
}


def per_call_rows(
    calls: int = 1000, samples: int = 100, *, repeats: int = 3, peers: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Milliseconds per call of each implementation, ``calls`` calls in a row.

    Example:
        >>> rows = per_call_rows(calls=5, samples=10, repeats=1, peers=())
        >>> sorted(r["implementation"] for r in rows)[0]
        'gradkit, gk.expectation + backward'
    """
    functions = _per_call_functions(samples)
    for fn in functions.values():  # warm up
        for _ in range(10):
            fn()
    best = dict.fromkeys(functions, math.inf)
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], time.perf_counter() - start)
    rows = [
        {"implementation": name, "ms_per_call": 1e3 * seconds / calls, "error": ""}
        for name, seconds in best.items()
    ]
    label = "Storchastic, ScoreFunction(batch_average)"
    wanted = ["storchastic"] if peers is None else [p for p in peers if p == "storchastic"]
    for peer in wanted:
        reason = peer_lib.missing(peer)
        if reason is not None:
            rows.append({"implementation": label, "ms_per_call": math.nan, "error": reason})
            continue
        with peer_lib.PeerWorker(peer) as worker:
            result = worker.estimate(
                "bernoulli", "score_function+leave_one_out", "per_call", calls, samples
            )
        rows.append(
            {
                "implementation": label,
                "ms_per_call": 1e3 * result["seconds"] / calls,
                "error": result["error"] or "",
            }
        )
    ms = {row["implementation"]: row["ms_per_call"] for row in rows}
    for row in rows:
        reference = _REFERENCE[row["implementation"]]
        row["reference"] = reference
        row["times_reference"] = row["ms_per_call"] / ms[reference]
        row["gradkit_speedup"] = (
            row["ms_per_call"] / ms["gradkit, gk.expectation + backward"]
            if row["implementation"] == label
            else math.nan
        )
    return rows


def _scale_worker(method: str, samples: int, steps: int) -> dict[str, float]:
    """One measurement in a fresh process: seconds per step and peak memory above the start."""
    torch.manual_seed(0)
    logits = torch.randn(64, 10_000, requires_grad=True)
    reward = torch.randn(10_000)

    def cost(a: torch.Tensor) -> torch.Tensor:
        return reward[a]

    def gradkit_step() -> None:
        dist = torch.distributions.Categorical(logits=logits)
        value = gk.expectation(
            cost,
            dist,
            samples,
            estimator="score_function",
            baseline=gk.baselines.LeaveOneOut(),
            plate=True,
        )
        value.sum().backward()

    def hand_step() -> None:
        with torch.no_grad():
            actions = torch.distributions.Categorical(logits=logits).sample((samples,))
            r = cost(actions)
            weight = r - (r.sum(0) - r) / (samples - 1)
        log_probs = torch.log_softmax(logits, -1).gather(-1, actions.T).T
        ((weight * log_probs).sum() / samples).backward()

    step = gradkit_step if method == "gradkit" else hand_step
    step()  # warm up: the allocator's first growth is not the step's own cost
    logits.grad = None
    before = _reset_peak()
    times = []
    for _ in range(steps):
        logits.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_mb": (_peak_kib() - before) / 1024}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> int:
    """Reset the peak resident memory (Linux) and return the current resident memory, KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak
    except OSError:
        pass
    current = _status_kib("VmRSS")
    return current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib() -> int:
    """The peak resident memory since :func:`_reset_peak`, KiB."""
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def scale_rows(sizes: Sequence[int] = (512, 4096), *, steps: int = 3) -> list[dict[str, Any]]:
    """Time and peak memory of the score function at scale, each in a fresh process."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for samples in sizes:
        measured = {}
        for method in ("gradkit", "hand"):
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                measured[method] = pool.submit(_scale_worker, method, samples, steps).result()
        for method, label in (
            ("gradkit", "gradkit, gk.expectation"),
            ("hand", "plain torch, written by hand"),
        ):
            rows.append(
                {
                    "samples": samples,
                    "implementation": label,
                    "ms_per_step": 1e3 * measured[method]["seconds"],
                    "peak_mb_above_start": measured[method]["peak_mb"],
                    "times_hand_written": measured[method]["seconds"] / measured["hand"]["seconds"],
                }
            )
    return rows


def plot(per_call: Any, scale: Any) -> Any:
    """Milliseconds per call, and time and memory at scale, as one figure."""
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.6))
    done = per_call.dropna(subset=["ms_per_call"])
    left.barh(done["implementation"], done["ms_per_call"], color="tab:blue")
    left.set(xlabel="ms per call (one Bernoulli, 100 samples, leave-one-out)")
    left.invert_yaxis()
    sizes = sorted(scale["samples"].unique())
    for label, rows in scale.groupby("implementation", sort=False):
        middle.plot(rows["samples"], rows["ms_per_step"], "o-", label=label)
        right.plot(rows["samples"], rows["peak_mb_above_start"], "o-", label=label)
    for ax in (middle, right):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("samples")
    middle.set(ylabel="ms per step", title="REINFORCE on Categorical (64, 10000)")
    right.set(ylabel="peak MB above start")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(out: Path = RESULTS, *, quick: bool = False, peers: Sequence[str] | None = None) -> None:
    """Run both measurements and write ``core_per_call`` and ``core_scale`` under ``out``."""
    import pandas as pd

    calls = 50 if quick else 1000
    per_call = pd.DataFrame(per_call_rows(calls, 100, repeats=1 if quick else 3, peers=peers))
    write_results(
        Path(out),
        "core_per_call",
        per_call,
        meta={
            "quick": quick,
            "calls": calls,
            "samples": 100,
            "torch_threads": torch.get_num_threads(),
        },
    )
    sizes = (64,) if quick else (512, 4096)
    scale = pd.DataFrame(scale_rows(sizes, steps=1 if quick else 3))
    fig = plot(per_call, scale)
    write_results(
        Path(out),
        "core_scale",
        scale,
        fig=fig,
        meta={"quick": quick, "logits_shape": [64, 10_000], "sizes": list(sizes)},
    )
    import matplotlib.pyplot as plt

    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main_for(run, __doc__.splitlines()[0]))
