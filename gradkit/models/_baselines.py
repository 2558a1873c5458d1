"""Baselines in measurements: read a baseline's value without folding the call into its state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from gradkit.baselines import Baseline


class _Measuring(Baseline):
    """A baseline's :meth:`~Baseline.value` without its :meth:`~Baseline.update` step."""

    def __init__(self, baseline: Baseline) -> None:
        self.baseline = baseline
        self.needs_scores = baseline.needs_scores

    def value(self, signal: Tensor, scores: Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
        return self.baseline.value(signal, scores)


def measuring(options: Mapping[str, Any]) -> dict[str, Any]:
    """Estimator options whose baseline (if any) is read but not updated.

    ``Baseline.value`` never changes a baseline, so a measurement that must leave a moving
    average as training left it needs no copy: it only skips the update.
    """
    out = dict(options)
    if isinstance(out.get("baseline"), Baseline):
        out["baseline"] = _Measuring(out["baseline"])
    return out
