"""The compendium's machinery: chapter context, figures with provenance, execution, book build.

Chapters call :class:`Context` once (``from compendium import book``), in the cell after their
``parameters`` cell::

    ctx = book.Context("log_derivative", scale=scale, seed=seed, output_dir=output_dir)
    n = ctx.pick(smoke=200, default=20_000, paper=200_000)
    ...
    ctx.savefig(fig, "score_identities")   # PNG + PDF + provenance JSON

``python -m compendium.book execute --scale smoke`` converts every chapter listed in ``_toc.yml``
with jupytext, executes it with papermill and writes executed notebooks and figures under the
build folder; ``python -m compendium.book build`` assembles and builds the Jupyter Book. The
Makefile's ``execute`` and ``book`` targets call these.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "SCALES",
    "ChapterError",
    "Context",
    "build_book",
    "chapter_files",
    "chapter_times",
    "clean_notebook",
    "execute_all",
    "execute_chapter",
    "git_commit",
    "pick_device",
    "provenance_records",
    "record_chapter_time",
    "seed_everything",
]

SCALES = ("smoke", "default", "paper")
ROOT = Path(__file__).resolve().parent.parent


def pick_device() -> torch.device:
    """CUDA when available, else CPU: the one line every chapter uses to choose its device."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so the same seed gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit(root: Path = ROOT) -> str:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    """Versions of the packages that make the numbers."""
    import gradkit

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "gradkit": gradkit.__version__,
    }
    try:
        import scipy

        out["scipy"] = scipy.__version__
    except ImportError:  # scipy is a runtime dependency, but keep provenance robust
        pass
    return out


class Context:
    """Everything a chapter needs to be reproducible: scale, seed, device, figure files.

    Args:
        chapter: the chapter's name (its file name without extension).
        scale: ``"smoke"``, ``"default"`` or ``"paper"``.
        seed: the random seed; set for Python, NumPy and torch here.
        output_dir: where figures go (``<output_dir>/<chapter>/``); default ``_build/figures``.
        **parameters: any further papermill parameters, recorded in the provenance.
    """

    def __init__(
        self,
        chapter: str,
        scale: str = "default",
        seed: int = 0,
        output_dir: str | os.PathLike[str] | None = None,
        **parameters: Any,
    ) -> None:
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        self.chapter = chapter
        self.scale = scale
        self.seed = int(seed)
        self.parameters = {"scale": scale, "seed": self.seed, **parameters}
        self.device = pick_device()
        self.output_dir = Path(output_dir or ROOT / "_build" / "figures") / chapter
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        seed_everything(self.seed)
        # tqdm.auto falls back to text progress bars without ipywidgets; that is what we want
        warnings.filterwarnings("ignore", message="IProgress not found")

    def pick(self, *, smoke: Any, default: Any, paper: Any) -> Any:
        """The value for this run's scale."""
        return {"smoke": smoke, "default": default, "paper": paper}[self.scale]

    def provenance(self, **extra: Any) -> dict[str, Any]:
        """What made a result: chapter, parameters, seed, device, versions, commit, time."""
        device = str(self.device)
        if self.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(self.device)})"
        return {
            "chapter": self.chapter,
            "parameters": self.parameters,
            "seed": self.seed,
            "device": device,
            "versions": versions(),
            "git_commit": git_commit(),
            "platform": platform.platform(),
            "wall_time_s": round(time.perf_counter() - self.start, 3),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }

    def _write_provenance(self, name: str, files: list[Path], **extra: Any) -> Path:
        record = self.provenance(files=[p.name for p in files], **extra)
        path = self.output_dir / f"{name}.json"
        path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return path

    def savefig(self, fig: Any, name: str, **extra: Any) -> list[Path]:
        """Write ``fig`` as ``<name>.png`` and ``<name>.pdf`` plus ``<name>.json`` provenance."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"figure name {name!r} must be a plain file name (letters, _ . -)")
        files = [self.output_dir / f"{name}.{ext}" for ext in ("png", "pdf")]
        for path in files:
            fig.savefig(path, bbox_inches="tight", dpi=150 if path.suffix == ".png" else None)
        self._write_provenance(name, files, kind="figure", **extra)
        return files

    def save_table(self, table: Any, name: str, **extra: Any) -> Path:
        """Write a pandas DataFrame as ``<name>.csv`` plus provenance."""
        path = self.output_dir / f"{name}.csv"
        table.to_csv(path, index=True)
        self._write_provenance(name, [path], kind="table", **extra)
        return path


def provenance_records(figures_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per figure or table under ``figures_dir``: name, chapter, scale, seed, device,
    commit and the chapter's elapsed wall time when the file was written."""
    rows = []
    for path in sorted(Path(figures_dir).glob("*/*.json")):
        record = json.loads(path.read_text())
        rows.append(
            {
                "chapter": record.get("chapter"),
                "name": path.stem,
                "kind": record.get("kind"),
                "scale": record.get("parameters", {}).get("scale"),
                "seed": record.get("seed"),
                "device": record.get("device"),
                "git_commit": str(record.get("git_commit", ""))[:12],
                "elapsed_s": record.get("wall_time_s"),
            }
        )
    return rows


class ChapterError(RuntimeError):
    """A chapter raised while executing; names the chapter and the cell."""


def chapter_files(root: Path = ROOT) -> list[Path]:
    """The chapter sources (``chapters/*.md``) in the order ``_toc.yml`` lists them."""
    toc = (root / "_toc.yml").read_text()
    names = re.findall(r"file:\s*(chapters/[\w-]+)", toc)
    return [root / f"{name}.md" for name in names]


def execute_chapter(
    source: Path,
    output: Path,
    parameters: dict[str, Any],
    *,
    cwd: Path | None = None,
    timeout: int | None = 3600,
) -> Path:
    """Convert a MyST chapter with jupytext and execute it with papermill.

    The executed notebook (with its injected parameters) is written to ``output``; the source is
    never modified. Raises :class:`ChapterError` naming the chapter and failing cell.
    """
    import jupytext
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook = jupytext.read(source)
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(
            notebook,
            str(output),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(cwd or source.parent),
            execution_timeout=timeout,
            progress_bar=False,
            log_output=False,
        )
    except PapermillExecutionError as err:
        raise ChapterError(
            f"chapter {source.name} failed in cell {err.cell_index} "
            f"(execution count {err.exec_count}): {err.ename}: {err.evalue}\n"
            f"the executed notebook with the traceback is at {output}"
        ) from None
    return output


def execute_all(
    scale: str,
    seed: int,
    build_dir: Path,
    only: Sequence[str] = (),
    root: Path = ROOT,
) -> list[Path]:
    """Execute every chapter (or those named in ``only``) at ``scale``."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    figures = (build_dir / "figures").resolve()
    done = []
    for source in chapter_files(root):
        if only and source.stem not in only:
            continue
        out = build_dir / "executed" / "chapters" / f"{source.stem}.ipynb"
        started = time.perf_counter()
        print(f"[compendium] executing {source.name} at scale={scale} ...", flush=True)
        params = {"scale": scale, "seed": seed, "output_dir": str(figures)}
        execute_chapter(source, out, params, cwd=root, timeout=None if scale == "paper" else 3600)
        seconds = time.perf_counter() - started
        print(f"[compendium]   done in {seconds:.1f} s", flush=True)
        record_chapter_time(figures, source.stem, scale, seconds)
        done.append(out)
    return done


TIMES = "chapter_times.json"


def record_chapter_time(figures_dir: Path, chapter: str, scale: str, seconds: float) -> Path:
    """Add a chapter's execution time to ``<figures_dir>/chapter_times.json`` (one per chapter)."""
    path = Path(figures_dir) / TIMES
    path.parent.mkdir(parents=True, exist_ok=True)
    times = json.loads(path.read_text()) if path.exists() else {}
    times[chapter] = {"scale": scale, "seconds": round(seconds, 1)}
    path.write_text(json.dumps(times, indent=2, sort_keys=True) + "\n")
    return path


def chapter_times(figures_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The chapters' execution times as ``make execute`` recorded them, in the order run.

    Empty when the chapters were executed another way (the tests execute them one by one).
    """
    path = Path(figures_dir) / TIMES
    if not path.exists():
        return []
    times = json.loads(path.read_text())
    order = [p.stem for p in chapter_files()]
    ranked = sorted(times, key=lambda c: order.index(c) if c in order else len(order))
    return [{"chapter": c, **times[c]} for c in ranked]


def _without_paths(text: str, prefixes: Sequence[tuple[str, str]]) -> str:
    for prefix, replacement in prefixes:
        text = text.replace(prefix, replacement)
    return text


def clean_notebook(executed: Path, dest: Path, folders: Sequence[Path]) -> Path:
    """Copy an executed chapter for the book: no papermill cell, no machine paths.

    papermill's injected-parameters cell and metadata are dropped and the chapter's own
    parameters cell is rewritten to the values the run used (``output_dir`` left out) and
    folded; every output that names one of ``folders`` (the build folder, the checkout) names
    it relative instead (``_build/...``, ``./...``), so no page shows where the book was built.
    The colophon keeps the full provenance.
    """
    import nbformat

    notebook = nbformat.read(executed, as_version=4)
    notebook.metadata.pop("papermill", None)  # its input and output paths
    injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
    notebook.cells = [c for c in notebook.cells if c not in injected]
    used = "\n".join(
        line
        for cell in injected
        for line in cell.source.splitlines()
        if line.strip() and not line.startswith(("#", "output_dir"))
    )
    prefixes = []  # absolute spellings only (the first folder is the build folder)
    for number, folder in enumerate(folders):
        replacement = "_build" if number == 0 else "."
        for spelling in {str(Path(folder).resolve()), str(Path(folder).absolute())}:
            prefixes.append((spelling, replacement))
    for cell in notebook.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "parameters" in tags:
            if used:
                cell.source = (
                    "# the parameters of this run (every record is in the colophon)\n" + used
                )
            if "hide-cell" not in tags:
                tags.append("hide-cell")
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = _without_paths(output["text"], prefixes)
            for kind, value in output.get("data", {}).items():
                if kind.startswith("text/") and isinstance(value, str):
                    output["data"][kind] = _without_paths(value, prefixes)
    nbformat.write(notebook, dest)
    return dest


def _stage(build_dir: Path, root: Path) -> Path:
    """Assemble the book's source: config, pages, executed notebooks (never the .md chapters)."""
    site = build_dir / "site"
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    config = (root / "_config.yml").read_text()
    year = _dt.date.today().year
    config = re.sub(r"(?m)^copyright:.*$", f'copyright: "{year}"', config)
    (site / "_config.yml").write_text(config)
    for name in ("_toc.yml", "references.bib", "intro.md"):
        shutil.copy2(root / name, site / name)
    if (root / "_static").is_dir():  # the book's own CSS (Jupyter Book links every file there)
        shutil.copytree(root / "_static", site / "_static")
    for page in re.findall(r"file:\s*([\w/-]+)", (root / "_toc.yml").read_text()):
        if page.startswith("chapters/"):
            executed = build_dir / "executed" / f"{page}.ipynb"
            if not executed.exists():
                raise FileNotFoundError(
                    f"{executed} does not exist: run `make execute` (or `make execute "
                    "SCALE=smoke`) before `make book`"
                )
            (site / "chapters").mkdir(exist_ok=True)
            clean_notebook(executed, site / f"{page}.ipynb", [build_dir, root])
        elif not (site / f"{page}.md").exists():
            (site / f"{page}.md").parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f"{page}.md", site / f"{page}.md")
    return site


def build_book(build_dir: Path, root: Path = ROOT) -> Path:
    """Build the HTML book (warnings are errors) into ``<build_dir>/html``."""
    site = _stage(build_dir, root)
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", "-W", "-n", "--keep-going", str(site), "--path-output", str(site)]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {result.returncode}): {' '.join(cmd)}")
    html = build_dir / "html"
    if html.exists():
        shutil.rmtree(html)
    shutil.copytree(site / "_build" / "html", html)
    return html


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compendium.book", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("execute", help="execute the chapters")
    ex.add_argument("--scale", default="default", choices=SCALES)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--build-dir", type=Path, default=ROOT / "_build")
    ex.add_argument("--only", nargs="*", default=[], help="chapter names to run")
    bd = sub.add_parser("build", help="build the HTML book from executed notebooks")
    bd.add_argument("--build-dir", type=Path, default=ROOT / "_build")
    args = parser.parse_args(argv)
    try:
        if args.command == "execute":
            execute_all(args.scale, args.seed, args.build_dir, args.only)
        else:
            print(f"[compendium] book at {build_book(args.build_dir)}/index.html")
    except (ChapterError, FileNotFoundError, RuntimeError) as err:
        print(f"[compendium] error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
