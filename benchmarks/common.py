"""What every benchmark shares: timing, statistics against exact values, results on disk.

A benchmark's numbers are only worth something next to the machine that made them, so
:func:`write_results` writes, for a result called ``name``, the table ``name.csv``, the figure
``name.png`` and ``name.json`` with :func:`machine_info` (platform, CPU count, torch threads,
device, package versions, git commit, time, and whether it was a ``--quick`` run).
:func:`load_results` reads them back (the appendix chapter does).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from compendium.book import git_commit

__all__ = [
    "RESULTS",
    "Z_THRESHOLD",
    "load_results",
    "machine_info",
    "main_for",
    "summarise",
    "time_call",
    "verdict",
    "write_results",
]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# A mean further than this many standard errors from the exact value is reported as wrong.
Z_THRESHOLD = 5.0
# Floating-point floor on the standard error, relative to the exact value: an estimator with
# (near) zero variance, such as exact enumeration, should not be flagged for rounding error.
_RELATIVE_FLOOR = 1e-5
_PACKAGES = ("torch", "numpy", "pandas", "gradkit", "pyro-ppl", "storchastic")


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine, device and package versions that produce a benchmark's numbers.

    Args:
        device: the device the benchmark ran on.

    Returns:
        a JSON-serialisable dict: ``platform``, ``processor``, ``cpu_count``,
        ``torch_threads``, ``device`` (with the GPU's name on CUDA), ``python``, ``versions``
        (installed packages among torch, numpy, pandas, gradkit, pyro-ppl, storchastic),
        ``git_commit`` and ``created`` (UTC).

    Example:
        >>> info = machine_info()
        >>> info["device"], info["cpu_count"] >= 1, "torch" in info["versions"]
        ('cpu', True, True)
    """
    device = torch.device(device)
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "device": name,
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": git_commit()[:7],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls.

    Uses :func:`time.perf_counter`; on CUDA it synchronises before reading the clock.

    Raises:
        ValueError: if ``repeats < 1`` or ``warmup < 0``.

    Example:
        >>> time_call(lambda: sum(range(100)), warmup=1, repeats=3) < 1.0
        True
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}"
        )
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def summarise(estimates: Tensor, exact: Tensor) -> dict[str, float]:
    r"""Compare independent gradient estimates with the exact gradient.

    For estimates :math:`g_1..g_n` of a gradient with coordinates :math:`j`, the mean
    :math:`\bar g_j`, the variance :math:`v_j` of one estimate and the z-score
    :math:`z_j = (\bar g_j - g^\star_j) / \sqrt{v_j / n + (10^{-5} g^\star_j)^2}` (the second
    term is a floating-point floor, so an exact estimator is not flagged for rounding).

    Args:
        estimates: shape ``(n, *param_shape)``, one row per independent estimate (n >= 2).
        exact: the exact gradient, shape ``param_shape``.

    Returns:
        ``mean`` and ``exact`` (coordinate 0; the scalar for a scalar parameter),
        ``max_abs_error`` and ``max_abs_z`` (over coordinates), ``variance`` (the variance
        of one estimate, summed over coordinates).

    Raises:
        ValueError: for fewer than 2 estimates or shapes that do not match.

    Example:
        >>> import torch
        >>> s = summarise(torch.tensor([0.9, 1.1, 1.0, 1.0]), torch.tensor(1.0))
        >>> round(s["mean"], 3), round(s["max_abs_z"], 3), round(s["variance"], 4)
        (1.0, 0.0, 0.0067)
    """
    if estimates.dim() < 1 or estimates.shape[0] < 2:
        raise ValueError(
            f"summarise needs at least 2 estimates along dim 0, got shape {tuple(estimates.shape)}"
        )
    exact = torch.as_tensor(exact, dtype=torch.float64)
    estimates = estimates.detach().to("cpu", torch.float64)
    if tuple(estimates.shape[1:]) != tuple(exact.shape):
        raise ValueError(
            f"estimates of shape {tuple(estimates.shape)} do not match the exact gradient of "
            f"shape {tuple(exact.shape)}: pass (num_estimates, *exact.shape)"
        )
    n = estimates.shape[0]
    mean = estimates.mean(0)
    var = estimates.var(0)
    se = (var / n + (_RELATIVE_FLOOR * exact.abs()) ** 2 + 1e-30).sqrt()
    z = (mean - exact) / se
    return {
        "mean": mean.reshape(-1)[0].item(),
        "exact": exact.reshape(-1)[0].item(),
        "max_abs_error": (mean - exact).abs().max().item(),
        "max_abs_z": z.abs().max().item(),
        "variance": var.sum().item(),
    }


def verdict(
    max_abs_z: float,
    error: str | None = None,
    *,
    mean: float | None = None,
    exact: float | None = None,
) -> str:
    """``"ok"``, ``"WRONG MEAN (...)"`` beyond :data:`Z_THRESHOLD`, or ``"fails: ..."``.

    For a scalar parameter pass its ``mean`` and ``exact`` value: a wrong mean is then
    reported with both, and a mean that is zero (to within :math:`10^{-6}` of the exact value)
    as ``returns 0``. An estimator whose estimates do not vary has a standard error at the
    floating-point floor of :func:`summarise`, so its :math:`|z|` is huge (about
    :math:`10^5` for a mean of 0) whatever the size of its error: the mean says more.

    Example:
        >>> verdict(1.2), verdict(26.5), verdict(math.nan, "ValueError: bad shape")
        ('ok', 'WRONG MEAN (|z| = 26.5)', 'fails: ValueError: bad shape')
        >>> verdict(57.7, mean=0.0548, exact=0.025)
        'WRONG MEAN (mean 0.0548, exact 0.025, |z| = 57.7)'
        >>> verdict(1e5, mean=-1.8e-11, exact=0.025)
        'WRONG MEAN (returns 0, exact 0.025)'
    """
    if error:
        return f"fails: {error}"
    if math.isfinite(max_abs_z) and max_abs_z <= Z_THRESHOLD:
        return "ok"
    if mean is None or exact is None or not math.isfinite(mean):
        return f"WRONG MEAN (|z| = {max_abs_z:.1f})"
    if abs(mean) <= 1e-6 * abs(exact):
        return f"WRONG MEAN (returns 0, exact {exact:.3g})"
    return f"WRONG MEAN (mean {mean:.3g}, exact {exact:.3g}, |z| = {max_abs_z:.3g})"


def write_results(
    out: Path,
    name: str,
    table: Any,
    *,
    fig: Any = None,
    meta: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Print ``table`` and write ``name.csv``, ``name.png`` (if ``fig``) and ``name.json``.

    Args:
        out: the output folder (created).
        name: the result's name, a plain file name.
        table: a pandas DataFrame.
        fig: a matplotlib figure, or ``None``.
        meta: what else to record (sizes, the ``quick`` flag, notes).
        device: the device the numbers come from.

    Returns:
        the paths written.

    Example:
        >>> import tempfile, pandas as pd
        >>> folder = Path(tempfile.mkdtemp())
        >>> paths = write_results(folder, "demo", pd.DataFrame({"n": [1]}), meta={"quick": True})
        <BLANKLINE>
        == demo ==
         n
         1
        >>> [p.name for p in paths], load_results("demo", folder)[1]["quick"]
        (['demo.csv', 'demo.json'], True)
    """
    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with pd.option_context(
        "display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format
    ):
        print(f"\n== {name} ==\n{table.to_string(index=False)}", flush=True)
    paths = [out / f"{name}.csv"]
    table.to_csv(paths[0], index=False)
    if fig is not None:
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=150, bbox_inches="tight")
    record = {"name": name, "machine": machine_info(device), **dict(meta or {})}
    paths.append(out / f"{name}.json")
    paths[-1].write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return paths


def load_results(name: str, directory: Path = RESULTS) -> tuple[Any, dict[str, Any]] | None:
    """The table and metadata of result ``name`` in ``directory``, or ``None`` if absent.

    Example:
        >>> load_results("no_such_result") is None
        True
    """
    import pandas as pd

    csv, record = Path(directory) / f"{name}.csv", Path(directory) / f"{name}.json"
    if not (csv.exists() and record.exists()):
        return None
    return pd.read_csv(csv), json.loads(record.read_text())


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, checked without importing it.

    Example:
        >>> installed("torch"), installed("no_such_module_here")
        (True, False)
    """
    return importlib.util.find_spec(module) is not None


def main_for(run: Callable[..., Any], description: str, argv: Sequence[str] | None = None) -> int:
    """A command line ``--out DIR [--quick] [--no-peers]`` for one benchmark's ``run``.

    ``--no-peers`` is passed on as ``peers=()`` to a ``run`` that takes ``peers``.

    Example:
        >>> calls = []
        >>> main_for(lambda out, quick: calls.append((out.name, quick)), "demo",
        ...          ["--out", "/tmp/x", "--quick", "--no-peers"])
        0
        >>> calls
        [('x', True)]
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    parser.add_argument("--no-peers", action="store_true", help="skip Pyro and Storchastic")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {"quick": args.quick}
    if args.no_peers and "peers" in inspect.signature(run).parameters:
        options["peers"] = ()
    run(args.out, **options)
    return 0
