r"""The score-function chapter's studies of :mod:`gradkit.models.topic`.

Chapter support, beside the book's machinery (not in the installed library): train a fresh
model per estimator and seed (:func:`compare_estimators`), summarise the runs
(:func:`run_summary`) and draw their curves and the factors' words (:func:`plot_curves`,
:func:`plot_factor_words`). They use only gradkit's public API.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradkit.models.topic import (
    METHODS,
    BernoulliTopicModel,
    train,
)
from gradkit.models.training import History

__all__ = ["compare_estimators", "plot_curves", "plot_factor_words", "run_summary"]


def compare_estimators(
    train_docs: Tensor,
    test_docs: Tensor,
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    model_options: Mapping[str, Any],
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    **train_options: Any,
) -> dict[str, list[History]]:
    """Train a fresh model per method and seed (same initialisation for a given seed).

    ``model_options`` go to :class:`BernoulliTopicModel` (``vocab_size`` is taken from the
    documents), ``train_options`` to :func:`train`, and ``method_options[method]`` override
    them for one method (e.g. fewer samples for an estimator that evaluates more per sample).
    Returns method -> one run per seed.

    Example:
        >>> import torch
        >>> from gradkit.models.topic import BernoulliTopicModel
        >>> from compendium.topic_studies import compare_estimators
        >>> docs, _ = BernoulliTopicModel(20, 3).sample(num_docs=16, doc_length=10)
        >>> runs = compare_estimators(docs, docs, ["none", "loo"], [0], steps=2, eval_every=2,
        ...                           model_options={"num_factors": 3}, progress=False)
        >>> sorted(runs), len(runs["loo"])
        (['loo', 'none'], 1)
    """
    from tqdm.auto import tqdm

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    runs: dict[str, list[History]] = {m: [] for m in methods}
    jobs = [(m, s) for m in methods for s in seeds]
    for method, seed in tqdm(jobs, desc="runs", disable=not progress):
        torch.manual_seed(seed)
        model = BernoulliTopicModel(train_docs.shape[-1], **dict(model_options))
        model.to(device=train_docs.device, dtype=train_docs.dtype)
        options = {**train_options, **dict((method_options or {}).get(method, {}))}
        runs[method].append(
            train(model, train_docs, test_docs, method, progress=progress, **options)
        )
    return runs


def run_summary(runs: Mapping[str, Sequence[History]]) -> dict[str, dict[str, float]]:
    """One row of numbers per method, over its runs (seeds).

    Returns method -> ``test_elbo`` and ``test_elbo_sd`` (final held-out ELBO per token, mean
    and standard deviation over runs; sd 0 for one run), ``train_elbo`` (final, mean),
    ``grad_variance`` (median over all measurements of all runs), ``wall_time`` (training
    seconds per run) and ``ms_per_step`` (the median step time over all runs' steps).

    Example:
        >>> from gradkit.models.training import History
        >>> from compendium.topic_studies import run_summary
        >>> keys = ["step", "train_elbo", "test_elbo", "grad_variance", "seconds"]
        >>> records = [dict(zip(keys, r)) for r in [(0, -3.1, -3.0, 4.0, 0.0),
        ...                                         (2, -2.6, -2.5, 2.0, 0.5)]]
        >>> run = History(records, step_seconds=[0.2, 0.3], label="loo")
        >>> run_summary({"loo": [run]})["loo"]["ms_per_step"]
        250.0
    """
    out = {}
    for method, method_runs in runs.items():
        if not method_runs:
            raise ValueError(f"method {method!r} has no runs to summarise")
        test = torch.tensor([r[-1]["test_elbo"] for r in method_runs], dtype=torch.float64)
        train = torch.tensor([r[-1]["train_elbo"] for r in method_runs], dtype=torch.float64)
        variance = torch.tensor([v for r in method_runs for v in r.column("grad_variance")])
        wall = sum(r[-1]["seconds"] for r in method_runs)
        step_seconds = [t for r in method_runs for t in r.step_seconds]
        out[method] = {
            "test_elbo": float(test.mean()),
            "test_elbo_sd": float(test.std()) if len(test) > 1 else 0.0,
            "train_elbo": float(train.mean()),
            "grad_variance": float(variance.median()) if len(variance) else float("nan"),
            "wall_time": wall / len(method_runs),
            "ms_per_step": 1000 * statistics.median(step_seconds) if step_seconds else math.nan,
        }
    return out


def plot_curves(
    runs: Mapping[str, Sequence[History]], key: str, ax: Any, *, log: bool = False
) -> None:
    """Plot one recorded curve per method: the mean over seeds and a min-max band.

    ``key`` is ``"train_elbo"``, ``"test_elbo"`` or ``"grad_variance"``; ``log`` averages
    on a log scale and uses a log y-axis.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> from gradkit.models.training import History
        >>> from compendium.topic_studies import plot_curves
        >>> run = History([{"step": 0, "test_elbo": -3.0}, {"step": 1, "test_elbo": -2.0}])
        >>> fig, ax = plt.subplots()
        >>> plot_curves({"loo": [run]}, "test_elbo", ax)
        >>> len(ax.lines)
        1
    """
    if key not in {"train_elbo", "test_elbo", "grad_variance"}:
        raise ValueError(f"key must be 'train_elbo', 'test_elbo' or 'grad_variance', got {key!r}")
    for method, method_runs in runs.items():
        values = torch.tensor([r.column(key) for r in method_runs], dtype=torch.float64)
        if log:
            values = values.log()
        mean, low, high = values.mean(0), values.min(0).values, values.max(0).values
        if log:
            mean, low, high = mean.exp(), low.exp(), high.exp()
        steps = method_runs[0].steps
        style = "--" if METHODS[method][1] else "-"
        (line,) = ax.plot(steps, mean.numpy(), style, label=METHODS[method][0])
        if len(method_runs) > 1:
            ax.fill_between(steps, low.numpy(), high.numpy(), color=line.get_color(), alpha=0.2)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("training step")


def plot_factor_words(
    model: BernoulliTopicModel, vocabulary: Sequence[str], top: int = 8, columns: int = 4
) -> Any:
    """A grid of bar charts: for each factor, the words it turns on and by how much (nats).

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from gradkit.models.topic import BernoulliTopicModel
        >>> from compendium.topic_studies import plot_factor_words
        >>> fig = plot_factor_words(BernoulliTopicModel(6, 3), list("abcdef"), top=2)
        >>> len(fig.axes)
        4
    """
    import matplotlib.pyplot as plt

    effects = model.factor_effects().cpu()
    values, index = effects.topk(top, dim=-1)
    k = model.num_factors
    rows = -(-k // columns)
    size = (3.2 * columns, (0.28 * top + 0.6) * rows)
    fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= k:
            ax.axis("off")
            continue
        ax.barh(range(top), values[j].flip(0).numpy(), color=f"C{j % 10}")
        ax.set_yticks(range(top), [vocabulary[i] for i in index[j].flip(0).tolist()])
        ax.set_title(f"factor {j + 1}", fontsize=10)
        ax.tick_params(labelsize=8)
    fig.supxlabel(r"$\log g_\theta(e_j)_w - \log g_\theta(0)_w$ (nats)")
    fig.tight_layout()
    return fig
