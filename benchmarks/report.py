"""What the appendix chapter shows: results from ``make bench``, or a small run made on the spot.

:func:`obtain` returns a benchmark's table from ``benchmarks/results`` when ``make bench`` wrote
it there, and otherwise runs the same benchmark function at a size the chapter can afford
(:data:`SIZES`), saying which it did. :func:`headline` condenses a peer comparison into the
targets the benchmarks check: for every estimator and peer, how many times slower the peer is
than gradkit, and how its variance compares. :func:`discrete_findings` does the same for the
discrete-latent estimators on the REBAR toy (:mod:`benchmarks.bench_discrete`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import bench_core, bench_discrete, bench_per_sample, bench_programs, bench_scaling
from benchmarks.common import RESULTS, Z_THRESHOLD, load_results, machine_info, verdict

__all__ = [
    "SAME_ESTIMATORS",
    "SIZES",
    "Result",
    "core_targets",
    "discrete_findings",
    "findings",
    "headline",
    "machines",
    "obtain",
    "other_results",
    "provenance",
    "slopes",
]

# Sizes for running the benchmarks inside the chapter, by the chapter's scale.
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        "peers": {"copies": 20, "samples": 20, "repeats": 1},
        "per_sample": (10, 100),
        "scaling": bench_scaling.QUICK_SWEEPS,
        "core_per_call": {"calls": 50, "repeats": 1},
        "core_scale": {"sizes": (64,), "steps": 1},
        "mvd_vae_encoder_gradient": {"batch_sizes": [8], "hidden_dim": 32, "repeats": 1},
        "discrete_toy": {"ts": bench_discrete.T_VALUES, "copies": 50, "samples": 4},
        "discrete_per_call": {"calls": 5, "batch": 50, "repeats": 1, "samples": 4},
        "programs_walk": {"lengths": (5, 10), "runs": 200, "repeats": 1},
    },
    "default": {
        "peers": {"copies": 100, "samples": 100, "repeats": 3},
        "per_sample": (10, 100, 1_000),
        "core_per_call": {"calls": 1000, "repeats": 3},
        "core_scale": {"sizes": (512, 4096), "steps": 3},
        "mvd_vae_encoder_gradient": {"batch_sizes": [128], "hidden_dim": 400, "repeats": 5},
        "discrete_toy": {"ts": bench_discrete.T_VALUES, "copies": 2000, "samples": 4},
        "discrete_per_call": {"calls": 50, "batch": 1000, "repeats": 3, "samples": 4},
        "programs_walk": {"lengths": bench_programs.LENGTHS, "runs": 10_000, "repeats": 3},
        "scaling": {
            "samples": ((10, 100, 1_000, 10_000), {"batch": 1, "dim": 10}),
            "batch": ((1, 10, 100, 1_000), {"samples": 100, "dim": 10}),
            "dim": ((1, 10, 100), {"samples": 100, "batch": 1}),
        },
    },
    "paper": {
        "peers": {"copies": 1000, "samples": 100, "repeats": 5},
        "per_sample": bench_per_sample.SIZES,
        "core_per_call": {"calls": 1000, "repeats": 5},
        "core_scale": {"sizes": (512, 4096), "steps": 5},
        "mvd_vae_encoder_gradient": {
            "batch_sizes": [8, 32, 128, 512],
            "hidden_dim": 400,
            "repeats": 7,
        },
        "discrete_toy": {"ts": bench_discrete.T_VALUES, "copies": 10_000, "samples": 4},
        "discrete_per_call": {"calls": 1000, "batch": 1000, "repeats": 5, "samples": 4},
        "programs_walk": {"lengths": bench_programs.LENGTHS, "runs": 100_000, "repeats": 5},
        "scaling": bench_scaling.SWEEPS,
    },
}
# The results each of gradkit's own benchmarks writes.
OWN = (
    "peers_bernoulli",
    "peers_factorised",
    "peers_gaussian",
    "per_sample",
    "scaling",
    "core_per_call",
    "core_scale",
    "mvd_vae_encoder_gradient",
    "discrete_toy",
    "discrete_per_call",
    "programs_walk",
)
# Estimators every library computes the same way, from the same random numbers for one seed.
SAME_ESTIMATORS = ("score_function", "score_function+leave_one_out", "pathwise")


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
        name: one of :data:`OWN`: ``peers_bernoulli``, ``peers_factorised``,
            ``peers_gaussian``, ``per_sample``, ``scaling``, ``core_per_call``, ``core_scale``,
            ``mvd_vae_encoder_gradient``, ``discrete_toy``, ``discrete_per_call``,
            ``programs_walk``.
        scale: ``"smoke"``, ``"default"`` or ``"paper"``; only used when running.
        directory: where ``make bench`` writes results.
        workers: started peer processes (:func:`benchmarks.bench_peers.open_workers`); when
            ``None``, a peer comparison run here uses none (gradkit only). A peer named with
            the value ``None`` is run in a process of its own.

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
        if name.startswith("peers_"):
            table = _refresh_verdicts(table)
        quick = " (a --quick run: its numbers mean nothing)" if meta.get("quick") else ""
        png = Path(directory) / f"{name}.png"
        return Result(
            name,
            table,
            meta,
            f"read from {directory}{quick}",
            png if png.exists() else None,
            dict(meta.get("skipped") or {}),
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
    elif name == "core_per_call":
        peers = [] if workers is None else [p for p in workers if p == "storchastic"]
        table = pd.DataFrame(
            bench_core.per_call_rows(
                sizes[name]["calls"], 100, repeats=sizes[name]["repeats"], peers=peers
            )
        )
        meta = {"sizes": dict(sizes[name])}
    elif name == "core_scale":
        table = pd.DataFrame(bench_core.scale_rows(**sizes[name]))
        meta = {"sizes": dict(sizes[name])}
    elif name in ("discrete_toy", "discrete_per_call"):
        wanted = [p for p in (workers or {}) if p == bench_discrete.PEER]
        worker = (workers or {}).get(bench_discrete.PEER)
        make = bench_discrete.toy_rows if name == "discrete_toy" else bench_discrete.toy_per_call
        table = make(**sizes[name], peers=wanted, worker=worker)
        skipped = dict(table.attrs.get("skipped", {}))
        meta = {"sizes": dict(sizes[name]), "skipped": skipped}
    elif name == "programs_walk":
        table = bench_programs.compare(**sizes[name])
        meta = {"sizes": dict(sizes[name])}
    elif name == "mvd_vae_encoder_gradient":
        from benchmarks import bench_mvd_vae

        table = pd.DataFrame(bench_mvd_vae.encoder_gradient_rows(z_dim=20, **sizes[name]))
        meta = {"sizes": dict(sizes[name])}
    else:
        table = bench_scaling.sweep(sizes["scaling"], repeats=3)
        meta = {"sizes": {k: list(v) for k, (v, _) in sizes["scaling"].items()}}
    meta = {"name": name, "machine": machine_info(), "quick": scale == "smoke", **meta}
    origin = f"run now, inside this chapter, at its {scale!r} size"
    return Result(name, table, meta, origin, None, skipped)


def _refresh_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """Wrong means of scalar parameters re-worded by the current :func:`verdict` (with the mean)."""
    wrong = table.verdict.astype(str).str.startswith("WRONG MEAN")
    scalar = ~table.parameter.astype(str).str.contains("(", regex=False)
    table = table.copy()
    table.loc[wrong & scalar, "verdict"] = [
        verdict(r.max_abs_z, mean=r.mean, exact=r.exact) for r in table[wrong & scalar].itertuples()
    ]
    return table


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


def _when(created: str) -> str:
    """``2026-11-23T16:09:17+00:00`` -> ``2026-11-23 16:09 UTC``."""
    return created[:16].replace("T", " ") + " UTC" if created else "an unrecorded date"


def provenance(results: Sequence[Result], commit: str | None = None) -> str:
    """One paragraph on where the results shown come from: their commit and date.

    Results read from disk were made by ``make bench`` at some commit, possibly an older one
    than the checkout's; results run inside the chapter are made now, from the checkout.

    Args:
        results: what :func:`obtain` returned.
        commit: the checkout's commit (default: ``git rev-parse --short HEAD``).

    Example:
        >>> old = Result("scaling", pd.DataFrame(), {"machine": {"git_commit": "abc1234",
        ...     "created": "2026-01-02T03:04:05+00:00"}}, "read from results")
        >>> print(provenance([old], commit="def5678"))  # doctest: +NORMALIZE_WHITESPACE
        scaling: read from the results folder, made by make bench at commit abc1234 on
        2026-01-02 03:04 UTC. This checkout is at commit def5678, so they may not reflect
        the current code; run make bench to refresh them.
    """
    head = machine_info()["git_commit"] if commit is None else commit
    read = [r for r in results if r.origin.startswith("read from")]
    ran = [r for r in results if not r.origin.startswith("read from")]
    parts = []
    if read:
        machines_ = [r.meta.get("machine", {}) for r in read]
        commits = sorted({m.get("git_commit", "unknown") for m in machines_})
        dates = sorted(_when(m.get("created", "")) for m in machines_)
        span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
        plural = "s" if len(commits) > 1 else ""
        parts.append(
            f"{', '.join(r.name for r in read)}: read from the results folder, made by make "
            f"bench at commit{plural} {', '.join(commits)} on {span}."
        )
        if commits != [head]:
            parts.append(
                f"This checkout is at commit {head}, so they may not reflect the current code; "
                "run make bench to refresh them."
            )
        else:
            parts.append(f"That is this checkout's commit, {head}.")
    if ran:
        parts.append(
            f"{', '.join(r.name for r in ran)}: run just now, inside this chapter, from this "
            f"checkout (commit {head}), at the chapter's own small sizes."
        )
    return " ".join(parts)


def _span(values: pd.Series, fmt: str) -> str:
    low, high = float(values.min()), float(values.max())
    return (
        format(low, fmt)
        if format(low, fmt) == format(high, fmt)
        else (f"{format(low, fmt)} to {format(high, fmt)}")
    )


def findings(tables: Mapping[str, pd.DataFrame], *, no_peers: str = "") -> dict[str, Any]:
    """What the peer comparisons show, as numbers and as sentences computed from them.

    Args:
        tables: peer-comparison tables (:func:`benchmarks.bench_peers.compare`) by name.
        no_peers: why no peer ran, for the sentence that says so.

    Returns:
        ``gradkit_rows`` and ``gradkit_ok`` (gradkit's rows, and those with a correct mean);
        ``peers`` (the peers that ran); ``wrong`` (peer estimators with a wrong mean or a
        failure, as ``"library estimator (detail)"``); ``same_variance_deviation`` (the largest
        :math:`|v_{peer}/v_{gradkit} - 1|` over :data:`SAME_ESTIMATORS`, NaN without peers);
        ``moving_average_ratios`` (peer / gradkit variance of the moving averages);
        ``batched_slower`` and ``per_call_slower`` (for the estimators that gradkit and the
        peer both run batched: the peer's batched time over gradkit's batched time, and its
        one-call-per-estimate time over gradkit's fastest, from :func:`headline`); and
        sentences ``correct``, ``same_variance``, ``moving_average``, ``speed``, ``wrong_text``
        and ``summary`` (all of them joined).

    Example:
        >>> t = pd.DataFrame({"library": ["gradkit", "pyro"], "estimator": ["pathwise"] * 2,
        ...     "mode": ["batched"] * 2, "parameter": ["loc"] * 2, "seconds": [0.01, 0.02],
        ...     "variance": [1.0, 1.0], "variance_vs_gradkit": [1.0, 1.0],
        ...     "verdict": ["ok", "ok"]})
        >>> f = findings({"gaussian": t})
        >>> f["gradkit_ok"], f["peers"], f["same_variance_deviation"], f["batched_slower"]
        (1, ['pyro'], 0.0, [2.0])
    """
    table = pd.concat(list(tables.values()), ignore_index=True)
    ours, theirs = table[table.library == "gradkit"], table[table.library != "gradkit"]
    ran = theirs[theirs.seconds.notna()]
    out: dict[str, Any] = {
        "gradkit_rows": len(ours),
        "gradkit_ok": int((ours.verdict == "ok").sum()),
        "peers": sorted(set(ran.library)),
    }
    n, ok = out["gradkit_rows"], out["gradkit_ok"]
    out["correct"] = (
        f"All {n} of gradkit's rows agree with the exact gradient (within "
        f"{Z_THRESHOLD:.0f} standard errors)."
        if ok == n
        else f"{n - ok} of gradkit's {n} rows do NOT agree with the exact gradient."
    )
    wrong = []
    bad = theirs[~theirs.verdict.isin(["ok", "not offered"])]
    for (library, estimator), part in bad.groupby(["library", "estimator"], sort=False):
        modes = set(theirs[(theirs.library == library) & (theirs.estimator == estimator)]["mode"])
        details = []
        if set(part["mode"]) != modes:
            details += sorted(set(part["mode"]))
        if part.verdict.str.contains("returns 0").all():
            details.append("returns 0")
        if part.verdict.str.startswith("fails").all():
            details.append("fails")
        wrong.append(f"{library} {estimator}" + (f" ({', '.join(details)})" if details else ""))
    out["wrong"] = wrong
    same = ran[ran.estimator.isin(SAME_ESTIMATORS)].variance_vs_gradkit.dropna()
    out["same_variance_deviation"] = float((same - 1).abs().max()) if len(same) else math.nan
    average = ran[ran.estimator.str.endswith("moving_average")].variance_vs_gradkit.dropna()
    out["moving_average_ratios"] = [float(v) for v in average]
    heads = [headline(t) for t in tables.values()]
    head = pd.concat(heads, ignore_index=True) if any(len(h) for h in heads) else pd.DataFrame()
    batched = head[head.mode_compared == "batched"] if len(head) else head
    out["batched_slower"] = [float(v) for v in batched.get("slower_same_mode", [])]
    out["per_call_slower"] = [
        float(v) for v in batched.get("per_call_vs_gradkit_best", pd.Series(dtype=float)).dropna()
    ]
    if not out["peers"]:
        out["same_variance"] = out["moving_average"] = out["speed"] = ""
        out["wrong_text"] = (
            "No peer ran for these results"
            + (f" ({no_peers})" if no_peers else "")
            + ", so they compare gradkit with the exact gradients only; make bench installs "
            "Pyro and Storchastic and runs the full comparison."
        )
    else:
        deviation = out["same_variance_deviation"]
        out["same_variance"] = (
            "Where a peer implements the same estimator (plain or leave-one-out score function, "
            "pathwise) it draws the same random numbers for the same seed, and its variance "
            + (
                "matches gradkit's up to rounding (relative difference at most "
                f"{deviation:.1e}): the estimators are the same."
                if deviation < 1e-3
                else f"differs from gradkit's by up to {deviation:.0%}."
            )
            if math.isfinite(deviation)
            else ""
        )
        if average.empty:
            out["moving_average"] = ""
        else:
            lead = (
                "gradkit's, which corrects the bias of its first steps, is the least noisy in "
                "every comparison"
                if average.min() > 1
                else "gradkit's is the noisiest in every comparison"
                if average.max() < 1
                else "none of the three is the least noisy in every comparison"
            )
            out["moving_average"] = (
                f"The peers' moving averages have {_span(average, '.2f')} times the variance of "
                f"gradkit's: {lead}."
            )
        speed = []
        if len(out["batched_slower"]):
            met = sum(v >= 10 for v in out["batched_slower"])
            speed.append(
                f"In batched mode the peers take {_span(batched.slower_same_mode, '.1f')} times "
                f"gradkit's time (the tenfold target is met in {met} of "
                f"{len(out['batched_slower'])} comparisons)"
            )
        if len(out["per_call_slower"]):
            speed.append(
                "called once per estimate, as their tutorials use them, they take "
                f"{_span(pd.Series(out['per_call_slower']), '.0f')} times gradkit's fastest way"
            )
        out["speed"] = "; ".join(speed) + "." if speed else ""
        out["wrong_text"] = (
            f"Peer estimators with a wrong mean or a failure: {'; '.join(wrong)}."
            if wrong
            else "No peer estimator has a wrong mean."
        )
    keys = ("correct", "same_variance", "moving_average", "speed", "wrong_text")
    out["summary"] = " ".join(out[k] for k in keys if out[k])
    return out


def discrete_findings(
    toy: pd.DataFrame, per_call: pd.DataFrame, *, no_peer: str = ""
) -> dict[str, Any]:
    """What the REBAR-toy comparison shows (:mod:`benchmarks.bench_discrete`), as numbers and
    sentences computed from its two tables.

    Args:
        toy: :func:`benchmarks.bench_discrete.toy_rows`.
        per_call: :func:`benchmarks.bench_discrete.toy_per_call`.
        no_peer: why Storchastic did not run, for the sentence that says so.

    Returns:
        ``gradkit_rows`` and ``gradkit_ok`` (gradkit's rows of unbiased estimators, and those
        with a correct mean), ``gradkit_biased`` (estimators biased by design, whose means
        differ), ``unavailable`` (gradkit names not registered); ``peer_ran``;
        ``peer_wrong`` and ``peer_fails`` (Storchastic methods with a wrong mean at some t, or
        that raise, each as ``"method: detail"``); ``variance_ratios`` (Storchastic / gradkit
        variance where both are correct and vary); ``ratios`` (``{mode: [Storchastic time /
        gradkit time]}``) and ``met`` (``{mode: (met, compared)}`` for the tenfold target);
        sentences ``correct``, ``peer``, ``speed`` and ``summary`` (all of them joined).

    Example:
        >>> toy = pd.DataFrame({"t": [0.45] * 3, "library": ["gradkit", "storchastic",
        ...     "storchastic"], "estimator": ["arm", "arm", "rebar"], "method": ["gk", "ARM()",
        ...     "REBAR()"], "mean": [0.1, 0.1, 0.27], "exact": [0.1] * 3,
        ...     "variance": [1.0, 2.0, 1.0], "variance_vs_gradkit": [1.0, 2.0, float("nan")],
        ...     "verdict": ["ok", "ok", "WRONG MEAN (mean 0.27, exact 0.1, |z| = 19)"]})
        >>> calls = pd.DataFrame({"estimator": ["arm"], "mode": ["per_call"],
        ...     "storchastic_vs_gradkit": [4.0]})
        >>> f = discrete_findings(toy, calls)
        >>> f["gradkit_ok"], f["met"]
        (1, {'per_call': (0, 1)})
        >>> f["peer_wrong"]
        ['REBAR(): wrong at t = 0.45 (at t = 0.45: mean 0.27, exact 0.1)']
    """
    verdicts = toy.verdict.astype(str)
    ours = toy[toy.library == "gradkit"]
    theirs = toy[toy.library != "gradkit"]
    available = ours[~verdicts[ours.index].eq("not available")]
    biased = available[verdicts[available.index].str.startswith("biased by design")]
    unbiased = available.drop(index=biased.index)
    out: dict[str, Any] = {
        "gradkit_rows": len(unbiased),
        "gradkit_ok": int((unbiased.verdict == "ok").sum()),
        "gradkit_biased": sorted(set(biased.estimator)),
        "unavailable": sorted(set(ours[verdicts[ours.index].eq("not available")].estimator)),
        "peer_ran": len(theirs) > 0,
    }
    wrong, fails = [], []
    for method, part in theirs.groupby("method", sort=False):
        said = part.verdict.astype(str)
        if said.str.startswith("fails").any():
            fails.append(f"{method}: {said[said.str.startswith('fails')].iloc[0][7:]}")
        bad = part[said.str.startswith("WRONG MEAN")]
        if len(bad):
            ts = ", ".join(f"{t:g}" for t in bad.t)
            first = bad.iloc[0]
            detail = (
                "returns 0" if "returns 0" in str(first.verdict) else f"mean {first['mean']:.4g}"
            )
            wrong.append(
                f"{method}: wrong at t = {ts} (at t = {first.t:g}: {detail}, exact "
                f"{first['exact']:.4g})"
            )
    out["peer_wrong"], out["peer_fails"] = wrong, fails
    # variance ratios of the methods that are correct at every t (one wrong at some t is noise)
    correct_everywhere = theirs.groupby("method").verdict.transform(lambda v: (v == "ok").all())
    fine = theirs[correct_everywhere.astype(bool) & (theirs.variance > 0)]
    out["variance_ratios"] = [float(v) for v in fine.variance_vs_gradkit.dropna()]
    ratios: dict[str, list[float]] = {}
    for row in per_call.itertuples():
        if math.isfinite(row.storchastic_vs_gradkit):
            ratios.setdefault(row.mode, []).append(float(row.storchastic_vs_gradkit))
    out["ratios"] = ratios
    out["met"] = {mode: (sum(v >= 10 for v in vs), len(vs)) for mode, vs in ratios.items()}
    n, ok = out["gradkit_rows"], out["gradkit_ok"]
    correct = (
        f"All {n} of gradkit's rows for unbiased estimators agree with the exact gradient "
        f"1 - 2t (within {Z_THRESHOLD:.0f} standard errors)"
        if ok == n
        else f"{n - ok} of gradkit's {n} rows for unbiased estimators do NOT agree with the "
        "exact gradient"
    )
    if out["gradkit_biased"]:
        correct += (
            "; the estimators biased by design ("
            + ", ".join(out["gradkit_biased"])
            + ") are not expected to"
        )
    correct += "."
    if out["unavailable"]:
        correct += (
            " Not in this version of gradkit (its rows are empty): "
            + ", ".join(out["unavailable"])
            + "."
        )
    out["correct"] = correct
    if not out["peer_ran"]:
        out["peer"] = (
            "Storchastic did not run for these results"
            + (f" ({no_peer})" if no_peer else "")
            + ", so they compare gradkit with the exact gradient only; make bench (or make "
            "execute) installs it and runs the comparison."
        )
        out["speed"] = ""
    else:
        parts = []
        if wrong:
            parts.append("Storchastic methods with a wrong mean: " + "; ".join(wrong) + ".")
        if fails:
            parts.append("Storchastic methods that raise: " + "; ".join(fails) + ".")
        if not parts:
            parts.append("No Storchastic method has a wrong mean here.")
        ratios_ = out["variance_ratios"]
        if ratios_:
            parts.append(
                "Where both are correct and vary, Storchastic's variance is "
                f"{_span(pd.Series(ratios_), '.2f')} times gradkit's."
            )
        out["peer"] = " ".join(parts)
        speed = []
        for mode, label in (("per_call", "one estimate per call"), ("batched", "batched")):
            if mode in ratios:
                met, total = out["met"][mode]
                speed.append(
                    f"{label}, Storchastic takes {_span(pd.Series(ratios[mode]), '.1f')} times "
                    f"gradkit's time (the tenfold target is met for {met} of {total} "
                    "estimators)"
                )
        sentence = "; ".join(speed) + "."
        out["speed"] = sentence[0].upper() + sentence[1:] if speed else ""
    keys = ("correct", "peer", "speed")
    out["summary"] = " ".join(out[k] for k in keys if out[k])
    return out


def core_targets(per_call: pd.DataFrame, scale: pd.DataFrame, mvd: pd.DataFrame) -> pd.DataFrame:
    """The core's speed and scale targets, each with its measured value and whether it is met.

    Every ratio compares two implementations measured side by side in the same run.

    Example:
        >>> import pandas as pd
        >>> calls = pd.DataFrame({"implementation": [
        ...     "gradkit, gk.score_function", "plain torch, estimate by hand"],
        ...     "ms_per_call": [0.2, 0.1], "times_reference": [2.0, 1.0]})
        >>> empty = pd.DataFrame(columns=["samples", "implementation", "times_hand_written",
        ...                               "peak_mb_above_start"])
        >>> mvd = pd.DataFrame(columns=["batch", "method", "speedup_vs_loop"])
        >>> bool(core_targets(calls, empty, mvd).iloc[0]["met"])
        True
    """
    rows: list[dict[str, Any]] = []
    ratio = per_call.set_index("implementation")["times_reference"]
    ms = per_call.set_index("implementation")["ms_per_call"]
    for name, reference in (
        ("gradkit, gk.score_function", "plain torch, estimate by hand"),
        ("gradkit, gk.expectation + backward", "plain torch, surrogate + backward by hand"),
    ):
        if name in ratio:
            rows.append(
                {
                    "target": f"{name} within 2x of {reference}",
                    "measured": f"{ratio[name]:.2f}x",
                    "met": bool(ratio[name] <= 2.0),
                }
            )
    storch = "Storchastic, ScoreFunction(batch_average)"
    expectation = "gradkit, gk.expectation + backward"
    if storch in ms and expectation in ms and math.isfinite(ms[storch]):
        speedup = ms[storch] / ms[expectation]
        rows.append(
            {
                "target": "gk.expectation at least 10x faster than Storchastic per call",
                "measured": f"{speedup:.1f}x",
                "met": bool(speedup >= 10.0),
            }
        )
    for samples, group in scale.groupby("samples"):
        rows_by = group.set_index("implementation")
        gradkit = rows_by.loc["gradkit, gk.expectation"]
        rows.append(
            {
                "target": f"Categorical (64, 10000), {samples} samples: within 2x of the "
                "hand-written surrogate",
                "measured": f"{gradkit['times_hand_written']:.2f}x, "
                f"{gradkit['peak_mb_above_start']:.0f} MB peak above start",
                "met": bool(gradkit["times_hand_written"] <= 2.0),
            }
        )
    coupled = mvd[mvd["method"] == "gradkit, coupled"]
    for row in coupled.itertuples():
        rows.append(
            {
                "target": f"measure-valued VAE encoder step, batch {row.batch}: at least 2x "
                "faster than the source's loop",
                "measured": f"{row.speedup_vs_loop:.2f}x",
                "met": bool(row.speedup_vs_loop >= 2.0),
            }
        )
    return pd.DataFrame(rows, columns=["target", "measured", "met"])


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
