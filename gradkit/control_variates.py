r"""Control variates for the score-function estimator.

A control variate is a term with known expectation subtracted from an estimator (Glasserman
2003, ch. 4; Mohamed et al. 2020, §7). Baselines (:mod:`gradkit.baselines`) are the special
case :math:`b\,\nabla_\theta\log p`. A :class:`ControlVariate` is more general: it receives the
per-sample estimates and returns corrected ones. Pass one as
``gk.score_function(..., baseline=cv)``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping

from torch import Tensor
from torch.distributions import Distribution

__all__ = ["ControlVariate"]


class ControlVariate(abc.ABC):
    """Corrects per-sample score-function estimates with a zero-mean term."""

    @abc.abstractmethod
    def adjust(
        self,
        f: Callable[[Tensor], Tensor],
        dist: Distribution,
        x: Tensor,
        signal: Tensor,
        scores: Mapping[str, Tensor],
        estimates: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """Return corrected per-sample estimates, each shaped like ``estimates[name]``.

        Args:
            f: the cost function.
            dist: the sampling distribution.
            x: the samples, ``(S, *batch, *event)``.
            signal: the learning signal ``(S, *B)`` (see :mod:`gradkit.baselines`).
            scores: per-sample scores, ``(S, *param.shape)`` each.
            estimates: the plain per-sample estimates ``signal * score``.
        """
