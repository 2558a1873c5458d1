"""The own-model chapter's study of :mod:`gradkit.models.bandit`: baselines compared in training.

Chapter support, beside the book's machinery (not in the installed library): train one policy
per baseline and seed (:func:`compare_baselines`) and stack the runs' exact learning curves
(:func:`return_curves`). They use only gradkit's public API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gradkit.models.bandit import (
    BASELINES,
    ContextualBandit,
    PolicyNetwork,
    make_baseline,
    train_reinforce,
)
from gradkit.models.training import History

__all__ = ["compare_baselines", "return_curves"]


def compare_baselines(
    bandit: ContextualBandit,
    names: Sequence[str] = ("none", "ema", "loo"),
    *,
    seeds: Sequence[int] = (0,),
    hidden: int = 32,
    progress: bool = False,
    **train_options: float | int,
) -> dict[str, list[History]]:
    """Train one policy per baseline and seed; the same seed gives every baseline the same
    initial policy and the same first draws.

    Args:
        bandit: the environment; policies are created on its device, in its dtype.
        names: baseline names from ``gradkit.models.bandit.BASELINES``.
        seeds: one run per seed and baseline.
        hidden: the policy's hidden width.
        progress: show progress bars.
        **train_options: ``steps``, ``batch_size``, ``num_samples``, ``lr`` for
            ``train_reinforce``.

    Returns:
        dict name -> histories, one per seed, each labelled with the baseline's label.

    Raises:
        ValueError: for an unknown baseline name.

    Example:
        >>> from gradkit.models.bandit import ContextualBandit
        >>> from compendium.bandit_studies import compare_baselines
        >>> runs = compare_baselines(ContextualBandit(4, 3, 3), ["loo"], steps=5, hidden=4)
        >>> [(name, len(r), len(r[0]), r[0].label) for name, r in runs.items()]
        [('loo', 1, 6, 'leave-one-out')]
    """
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {sorted(BASELINES)}")
    device, dtype = bandit.means.device, bandit.means.dtype
    runs: dict[str, list[History]] = {}
    for name in names:
        runs[name] = []
        for seed in seeds:
            torch.manual_seed(seed)
            policy = PolicyNetwork(
                bandit.features.shape[1], bandit.num_arms, hidden, device=device, dtype=dtype
            )
            run = train_reinforce(
                bandit,
                policy,
                baseline=make_baseline(name),
                label=BASELINES[name][0],
                progress=progress,
                **train_options,  # type: ignore[arg-type]
            )
            runs[name].append(run)
    return runs


def return_curves(runs: Mapping[str, Sequence[History]]) -> dict[str, Tensor]:
    """The exact return of every run, stacked: name -> ``(seeds, records)`` in float64.

    Raises:
        ValueError: for runs of one name recorded at different steps.

    Example:
        >>> from gradkit.models.training import History
        >>> from compendium.bandit_studies import return_curves
        >>> run = History([{"step": i, "expected_return": j} for i, j in [(0, 0.2), (1, 0.5)]])
        >>> return_curves({"loo": [run, run]})["loo"].shape
        torch.Size([2, 2])
    """
    curves = {}
    for name, histories in runs.items():
        if len({tuple(h.steps) for h in histories}) > 1:
            raise ValueError(f"the runs of {name!r} were recorded at different steps")
        values = [h.column("expected_return") for h in histories]
        curves[name] = torch.tensor(values, dtype=torch.float64)
    return curves
