"""gradkit as a package: the wheel's metadata, and the README example in a clean environment.

The slow test builds a wheel offline, installs it into a fresh virtual environment with the
project's constraints (which pin torch to the CPU build already on disk: a resolution that would
pull any other torch, or CUDA libraries, fails the test before anything is installed) and runs
the README's "Use gradkit in your own model" example there.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import gradkit

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = {"torch", "numpy", "scipy", "tqdm"}
TORCH = "2.13.0"  # the version constraints.txt pins


def readme_example(readme: Path = ROOT / "README.md") -> str:
    """The first ```python block under the heading "Use gradkit in your own model"."""
    text = readme.read_text()
    section = re.search(r"^## Use gradkit in your own model\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "README.md has no '## Use gradkit in your own model' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, "the README section has no ```python block"
    return block.group(1)


def test_readme_example_runs_here():
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    assert namespace["encoder"].weight.grad is not None


def test_readme_discrete_example_runs_here():
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^### Discrete latent variables\n(.*?)(?=^##|\Z)", text, re.M | re.S)
    assert section, "README.md has no '### Discrete latent variables' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, "the section has no ```python block"
    namespace: dict = {"torch": torch, "gk": gradkit}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["logits"].grad is not None
    assert all(p.grad is not None for p in namespace["relax"].parameters())


def test_readme_programs_example_runs_here():
    text = (ROOT / "README.md").read_text()
    section = re.search(
        r"^### Programs with discrete randomness\n(.*?)(?=^##|\Z)", text, re.M | re.S
    )
    assert section, "README.md has no '### Programs with discrete randomness' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, "the section has no ```python block"
    namespace: dict = {"torch": torch, "gk": gradkit}
    torch.manual_seed(0)
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    rows = namespace["rows"]
    assert rows.shape == (10_000,)
    assert abs(rows.mean().item() + 26.48) < 4.5 * rows.std().item() / 100


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PIP_NO_INPUT": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, **kwargs)
    assert result.returncode == 0, f"{cmd[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the sources (the checkout stays untouched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "gradkit", src / "gradkit", ignore=ignore)
    out = tmp / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q"]
    _run([*build, str(src), "-w", str(out)])
    (built,) = out.glob("gradkit-*.whl")
    return built


@pytest.mark.slow
def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(archive.read(meta_name).decode())
    assert "gradkit/py.typed" in names
    assert "gradkit/models/bandit.py" in names and "gradkit/data/__init__.py" in names
    # the library alone: the compendium's machinery stays in the checkout
    assert not [n for n in names if n.startswith("compendium/") or n.endswith("/book.py")]
    assert meta["Version"] == gradkit.__version__
    requires = meta.get_all("Requires-Dist")
    runtime = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requires if ";" not in r}
    assert runtime == RUNTIME, f"runtime dependencies should be {RUNTIME}, got {runtime}"
    extras = [r for r in requires if ";" in r]
    assert all(re.search(r'extra == "[a-z]+"', r) for r in extras), extras
    assert set(meta.get_all("Provides-Extra")) >= {"data", "book", "dev"}


@pytest.mark.slow
def test_wheel_installs_in_a_clean_venv_and_runs_the_readme_example(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    constraints = str(ROOT / "constraints.txt")
    install = [python, "-m", "pip", "install", "--no-compile", "-q", str(wheel), "-c", constraints]
    # Resolve first: refuse any torch but the pinned CPU build, and any CUDA library.
    _run([*install, "--dry-run", "--report", str(tmp_path / "plan.json")])
    plan = json.loads((tmp_path / "plan.json").read_text())["install"]
    versions = {p["metadata"]["name"].lower(): p["metadata"]["version"] for p in plan}
    assert versions.get("torch", "").split("+")[0] == TORCH, versions.get("torch")
    assert not [n for n in versions if n.startswith("nvidia")], sorted(versions)
    _run(install)
    check = "import gradkit, torch; print(gradkit.__file__, gradkit.__version__, torch.__version__)"
    where, version, torch_version = _run([python, "-c", check], cwd=tmp_path).stdout.split()
    assert where.startswith(str(venv)) and version == gradkit.__version__
    assert torch_version.split("+")[0] == TORCH
    example = readme_example() + "\nassert encoder.weight.grad is not None\nprint('ok')\n"
    assert _run([python, "-c", example], cwd=tmp_path).stdout.strip() == "ok"
    # every module of the library imports without the extras (they are imported where used)
    walk = (
        "import importlib, pkgutil, gradkit\n"
        "names = [m.name for m in pkgutil.walk_packages(gradkit.__path__, 'gradkit.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names))"
    )
    imported = int(_run([python, "-c", walk], cwd=tmp_path).stdout.strip())
    assert imported == len(list((ROOT / "gradkit").rglob("*.py"))) - 1  # all but gradkit/
