"""What the appendix chapter shows: results from ``make bench``, or a small run made on the spot.

:func:`obtain` returns a benchmark's table from ``benchmarks/results`` when ``make bench`` wrote
it there, and otherwise runs the same benchmark function at a size the chapter can afford
(:data:`SIZES`), saying which it did. :func:`headline` condenses a peer comparison into the
targets the benchmarks check: for every estimator and peer, how many times slower the peer is
than gradkit, and how its variance compares.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import bench_per_sample, bench_scaling
from benchmarks.common import RESULTS, load_results, machine_info

__all__ = [
    "SIZES",
    "Result",
    "headline",
    "machines",
    "obtain",
    "other_results",
    "slopes",
]

# Sizes for running the benchmarks inside the chapter, by the chapter's scale.
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        "peers": {"copies": 20, "samples": 20, "repeats": 1},
        "per_sample": (10, 100),
        "scaling": bench_scaling.QUICK_SWEEPS,
    },
    "default": {
        "peers": {"copies": 100, "samples": 100, "repeats": 3},
        "per_sample": (10, 100, 1_000),
        "scaling": {
            "samples": ((10, 100, 1_000, 10_000), {"batch": 1, "dim": 10}),
            "batch": ((1, 10, 100, 1_000), {"samples": 100, "dim": 10}),
            "dim": ((1, 10, 100), {"samples": 100, "batch": 1}),
        },
    },
    "paper": {
        "peers": {"copies": 1000, "samples": 100, "repeats": 5},
        "per_sample": bench_per_sample.SIZES,
        "scaling": bench_scaling.SWEEPS,
    },
}
# The results each of gradkit's own benchmarks writes.
OWN = ("peers_bernoulli", "peers_factorised", "peers_gaussian", "per_sample", "scaling")


@dataclass
class Result:
    """A benchmark's table, its metadata (with the machine) and where it came from."""

    name: str
    table: pd.DataFrame
    meta: dict[str, Any]
    origin: str
    figure: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def obtain(
    name: str,
    scale: str,
    *,
    directory: Path = RESULTS,
    workers: Mapping[str, Any] | None = None,
) -> Result:
    """The result called ``name``: read from ``directory``, else run now at ``SIZES[scale]``.

    Args:
        name: one of ``peers_bernoulli``, ``peers_factorised``, ``peers_gaussian``,
            ``per_sample``, ``scaling``.
        scale: ``"smoke"``, ``"default"`` or ``"paper"``; only used when running.
        directory: where ``make bench`` writes results.
        workers: started peer processes (:func:`benchmarks.bench_peers.open_workers`); when
            ``None``, a peer comparison run here uses none (gradkit only).

    Raises:
        ValueError: for an unknown name or scale.

    Example:
        >>> import tempfile
        >>> r = obtain("scaling", "smoke", directory=Path(tempfile.mkdtemp()))
        >>> r.origin, r.meta["quick"]
        ("run now, inside this chapter, at its 'smoke' size", True)
    """
    if name not in OWN or scale not in SIZES:
        raise ValueError(f"name must be one of {OWN} and scale one of {sorted(SIZES)}")
    loaded = load_results(name, directory)
    if loaded is not None:
        table, meta = loaded
        quick = " (a --quick run: its numbers mean nothing)" if meta.get("quick") else ""
        png = Path(directory) / f"{name}.png"
        return Result(
            name, table, meta, f"read from {directory}{quick}", png if png.exists() else None
        )
    sizes = SIZES[scale]
    skipped: dict[str, str] = {}
    if name.startswith("peers_"):
        from benchmarks import bench_peers

        peers = list(workers) if workers is not None else []
        table, skipped = bench_peers.compare(
            name.removeprefix("peers_"), peers=peers, workers=workers, **sizes["peers"]
        )
        meta = {"sizes": sizes["peers"]}
    elif name == "per_sample":
        table = bench_per_sample.compare(sizes["per_sample"], repeats=3)
        meta = {"sizes": list(sizes["per_sample"])}
    else:
        table = bench_scaling.sweep(sizes["scaling"], repeats=3)
        meta = {"sizes": {k: list(v) for k, (v, _) in sizes["scaling"].items()}}
    meta = {"name": name, "machine": machine_info(), "quick": scale == "smoke", **meta}
    origin = f"run now, inside this chapter, at its {scale!r} size"
    return Result(name, table, meta, origin, None, skipped)


def headline(table: pd.DataFrame) -> pd.DataFrame:
    """For each estimator and peer: times slower than gradkit, variance ratio, peer's verdict.

    ``slower_best`` compares each library's fastest way (batched or per call) of computing the
    estimator; ``slower_same_mode`` the peer's batched call with gradkit's batched call (per
    call for a moving average); ``per_call_vs_gradkit_best`` the peer called once per estimate
    (how its tutorials use it) with gradkit's fastest way. Variance ratios are peer / gradkit
    in the same mode.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"library": ["gradkit", "pyro"], "estimator": ["pathwise"] * 2,
        ...     "mode": ["batched"] * 2, "parameter": ["loc"] * 2, "seconds": [0.01, 0.2],
        ...     "variance": [1.0, 1.1], "verdict": ["ok", "ok"]})
        >>> headline(t)[["peer", "slower_best", "variance_ratio"]].values.tolist()
        [['pyro', 20.0, 1.1]]
    """
    rows = []
    ours = table[table.library == "gradkit"]
    for (estimator, peer), part in table[table.library != "gradkit"].groupby(
        ["estimator", "library"], sort=False
    ):
        mine = ours[ours.estimator == estimator]
        part = part[part.seconds.notna()]
        if mine.empty or part.empty:
            continue
        mode = "batched" if "batched" in set(part["mode"]) & set(mine["mode"]) else "per_call"
        same_peer = part[part["mode"] == mode]
        same_mine = mine[mine["mode"] == mode]
        variance_ratio = (
            same_peer.groupby("parameter").variance.sum()
            / same_mine.groupby("parameter").variance.sum()
        ).max()
        per_call = part[part["mode"] == "per_call"].seconds
        rows.append(
            {
                "estimator": estimator,
                "peer": peer,
                "slower_best": part.seconds.min() / mine.seconds.min(),
                "slower_same_mode": same_peer.seconds.min() / same_mine.seconds.min(),
                "per_call_vs_gradkit_best": per_call.min() / mine.seconds.min()
                if len(per_call)
                else float("nan"),
                "mode_compared": mode,
                "variance_ratio": variance_ratio,
                "peer_verdict": "; ".join(sorted(set(part.verdict))),
            }
        )
    return pd.DataFrame(rows)


def machines(results: list[Result]) -> pd.DataFrame:
    """One row per result: where it came from and the machine, device and versions.

    Example:
        >>> r = Result("demo", pd.DataFrame(), {"machine": {"cpu_count": 2}}, "run now")
        >>> machines([r])[["result", "origin", "cpus"]].values.tolist()
        [['demo', 'run now', 2]]
    """
    rows = []
    for r in results:
        m = r.meta.get("machine", {})
        rows.append(
            {
                "result": r.name,
                "origin": r.origin,
                "created": m.get("created", ""),
                "platform": m.get("platform", ""),
                "cpus": m.get("cpu_count", ""),
                "torch threads": m.get("torch_threads", ""),
                "device": m.get("device", ""),
                "versions": ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
                "commit": m.get("git_commit", ""),
                "sizes": json.dumps(r.meta.get("sizes", "")),
            }
        )
    return pd.DataFrame(rows)


def other_results(directory: Path = RESULTS) -> dict[str, list[Path]]:
    """Result files in ``directory`` that gradkit's own benchmarks did not write (e.g. the
    measure-valued VAE benchmark's), grouped by kind: ``csv``, ``png``, ``json``.

    Example:
        >>> other_results(Path("/no/such/folder"))
        {'csv': [], 'png': [], 'json': []}
    """
    found: dict[str, list[Path]] = {"csv": [], "png": [], "json": []}
    if not Path(directory).is_dir():
        return found
    for kind in found:
        found[kind] = sorted(p for p in Path(directory).glob(f"*.{kind}") if p.stem not in OWN)
    return found


def slopes(table: pd.DataFrame) -> pd.DataFrame:
    """Log-log slope of time against the swept size, per estimator and sweep.

    Fitted by least squares over the larger half of each sweep's sizes (where fixed per-call
    overhead no longer dominates): a slope near 1 means time proportional to the size, near 0
    means the size is nearly free.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"sweep": ["batch"] * 3, "value": [1, 10, 100],
        ...     "estimator": ["pathwise"] * 3, "seconds": [1e-3, 1e-2, 1e-1]})
        >>> round(float(slopes(t).loc["pathwise", "batch"]), 2)
        1.0
    """
    out: dict[str, dict[str, float]] = {}
    for (sweep, estimator), part in table.groupby(["sweep", "estimator"], sort=False):
        part = part.sort_values("value")
        upper = part.iloc[(len(part) - 1) // 2 :]
        x, y = np.log(upper.value.to_numpy(float)), np.log(upper.seconds.to_numpy(float))
        out.setdefault(sweep, {})[estimator] = float(np.polyfit(x, y, 1)[0])
    return pd.DataFrame(out)
