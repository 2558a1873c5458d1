"""``python -m benchmarks --out DIR [--quick] [--only NAME ...] [--no-peers]``: run them all."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import benchmarks
from benchmarks.common import RESULTS


def discover() -> list[str]:
    """Names of the benchmark modules (``benchmarks/bench_*.py``), sorted."""
    return sorted(
        m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")
    )


def run_one(name: str, out: Path, *, quick: bool, peers: bool) -> None:
    """Run benchmark module ``name`` through its ``run`` function, or as ``python -m``."""
    module = importlib.import_module(f"benchmarks.{name}")
    run = getattr(module, "run", None)
    if callable(run):
        options: dict[str, object] = {}
        accepted = inspect.signature(run).parameters
        if "quick" in accepted:
            options["quick"] = quick
        if not peers and "peers" in accepted:
            options["peers"] = ()
        run(out, **options)
        return
    command = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out)]
    if quick:
        command.append("--quick")
    subprocess.run(command, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder for results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (numbers mean nothing)")
    parser.add_argument("--only", nargs="*", default=[], help="benchmark names, e.g. bench_peers")
    parser.add_argument("--no-peers", action="store_true", help="skip Pyro and Storchastic")
    args = parser.parse_args(argv)
    names = discover()
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
    failed = []
    for name in args.only or names:
        started = time.perf_counter()
        print(f"[benchmarks] running {name} ...", flush=True)
        try:
            run_one(name, args.out, quick=args.quick, peers=not args.no_peers)
        except Exception as err:  # report every benchmark, then fail at the end
            print(f"[benchmarks] {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"[benchmarks]   {name} done in {time.perf_counter() - started:.1f} s", flush=True)
    print(f"[benchmarks] results in {args.out}", flush=True)
    if failed:
        print(f"[benchmarks] failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
