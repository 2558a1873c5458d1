r"""Rao-Blackwellised score-function estimators for categorical variables ("sum and sample").

For :math:`z \sim q_\theta` on :math:`K` categories, any per-sample estimator :math:`g(z)` of
:math:`\nabla_\theta \mathbb{E}_q[f(z)] = \sum_z q_\theta(z)\, g(z)` can be improved by
conditioning (Casella and Robert 1996; Liu, Regier, Tripuraneni, Jordan and McAuliffe 2019).
Take the set :math:`C` of the :math:`k` most probable categories and sum them exactly; sample
only the rest:

.. math::
    \hat g = \sum_{c \in C} q_\theta(c)\, g(c) + \big(1 - q_\theta(C)\big)\, g(\tilde z), \qquad
    \tilde z \sim q_\theta(z \mid z \notin C).

This is the conditional expectation of :math:`g(z)` given which part of the sample space the
draw falls into, so it is unbiased and its variance is never larger than that of
:math:`g(z)` (the law of total variance). It pays off most when :math:`q` puts most of its mass
on a few categories, which is what a trained categorical model tends to do: then
:math:`1 - q_\theta(C)` is small and the sampled term barely moves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution

from gradkit import _checks
from gradkit.baselines import Baseline, Constant
from gradkit.distributions import parameters
from gradkit.estimators import align, is_plate, score

__all__ = ["score_function"]

CostFn = Callable[[Tensor], Tensor]


def _check_dist(dist: Distribution) -> Categorical:
    if type(dist) is not Categorical:
        raise TypeError(
            f"the Rao-Blackwellised estimator sums categories of a "
            f"torch.distributions.Categorical, got {type(dist).__name__}; use "
            "gk.score_function for other distributions"
        )
    return dist


def _check_num_summed(num_summed: object, categories: int) -> int:
    if isinstance(num_summed, bool) or not isinstance(num_summed, int):
        raise TypeError(f"num_summed must be a Python int, got {type(num_summed).__name__}")
    if not 0 <= num_summed <= categories:
        raise ValueError(
            f"num_summed must be between 0 and the number of categories ({categories}), got "
            f"{num_summed}; it is how many of the most probable categories are summed exactly"
        )
    return num_summed


def _signal(dist: Distribution, fx: Tensor) -> Tensor:
    """The learning signal ``(S, *B)``: one cost per batch element, or the only cost."""
    if len(dist.batch_shape) == 0:
        return fx.reshape(fx.shape[0], -1).sum(-1)
    if is_plate(dist, fx):
        return fx
    raise ValueError(
        f"the Rao-Blackwellised estimator needs f to return one value per sample for a single "
        f"categorical, or one value per batch element, shape (S, "
        f"{', '.join(map(str, dist.batch_shape))}), for independent categoricals (a plate); "
        f"got {tuple(fx.shape)}. Summing categories of coupled variables would need every "
        "combination: use gk.score_function for a cost that couples the batch"
    )


def score_function(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    *,
    num_summed: int = 1,
    baseline: Any = None,
) -> dict[str, Tensor]:
    r"""Sum-and-sample (Rao-Blackwellised) score-function estimates for a categorical.

    With :math:`C` the ``num_summed`` most probable categories of each categorical,
    :math:`q(C)` their mass and :math:`s(z) = \nabla_\theta \log q_\theta(z)`, sample
    :math:`s` of the result is

    .. math::
        \sum_{c\in C} q(c)\,(f(c) - b_s)\,s(c) + (1 - q(C))\,(f(\tilde z_s) - b_s)\,s(\tilde z_s),
        \qquad \tilde z_s \sim q(z \mid z\notin C),

    an unbiased estimate of :math:`\nabla_\theta \mathbb{E}_q[f(z)]` whose variance is at most
    that of the plain score function (Liu et al. 2019). The baseline :math:`b_s` (computed
    from the sampled costs :math:`f(\tilde z)`) must enter both terms: the scores of
    :math:`C` alone do not average to zero. ``num_summed=0`` is the plain score-function
    estimator; ``num_summed=K`` is exact (zero variance). Each estimate costs ``num_summed``
    evaluations of ``f`` shared by all samples, plus one per sample.

    Args:
        f: cost, samples ``(S, *batch_shape)`` (category indices) -> ``(S,)`` for a single
            categorical or ``(S, *batch_shape)`` for independent ones (one cost each).
        dist: a ``torch.distributions.Categorical``, built from ``probs`` or ``logits``.
        num_samples: samples of the remaining categories per estimate (>= 1).
        num_summed: number of most probable categories summed exactly, ``0 <= k <= K``.
        baseline: as for :func:`gradkit.estimators.score_function`: ``None``, a number, or a
            :class:`gradkit.baselines.Baseline` (``LeaveOneOut`` needs ``num_samples >= 2``).

    Returns:
        dict with the parameter name (``probs`` or ``logits``) -> per-sample estimates of
        shape ``(S, *param.shape)``.

    Raises:
        TypeError: for a distribution other than ``Categorical``, or a non-int argument.
        ValueError: for ``num_summed`` outside ``[0, K]``, a bad ``num_samples``, or a cost
            that couples several categoricals.

    Example:
        >>> import torch, gradkit as gk
        >>> q = torch.distributions.Categorical(logits=torch.tensor([0.7, 0.2, 0.1]).log())
        >>> g = gk.rao_blackwell.score_function(lambda z: z.float() ** 2, q, 4, num_summed=3)
        >>> g["logits"][0]  # everything summed: the exact q(z) (f(z) - E f), every sample
        tensor([-0.4200,  0.0800,  0.3400])
    """
    dist = _check_dist(dist)
    _checks.check_num_samples(num_samples)
    (name,) = parameters(dist)
    probs = dist.probs.detach()
    k = _check_num_summed(num_summed, probs.shape[-1])
    batch_ndim = len(dist.batch_shape)

    top_probs, top = probs.topk(k, dim=-1)  # (*B, k)
    in_top = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
    rest = (probs * ~in_top).sum(-1)  # (*B,): exactly zero when nothing is left to sample
    logits = dist.logits.detach().masked_fill(in_top, float("-inf"))
    empty = ~torch.isfinite(logits).any(-1, keepdim=True)
    logits = torch.where(empty, dist.logits.detach(), logits)  # weight `rest` is 0 there
    with torch.no_grad():
        z = Categorical(logits=logits, validate_args=False).sample((num_samples,))
        signal = _signal(dist, _checks.evaluate(f, z, (num_samples,)))
    scores = score(dist, z)
    b: Tensor | dict[str, Tensor] = torch.zeros_like(signal)
    if baseline is not None:
        if not isinstance(baseline, Baseline):
            baseline = Constant(baseline)
        b = baseline(signal, scores)
    b_name = b[name] if isinstance(b, dict) else align(b, scores[name], batch_ndim)
    s = scores[name]
    estimate = (
        align(rest.expand_as(signal), s, batch_ndim) * (align(signal, s, batch_ndim) - b_name) * s
    )
    if k > 0:
        summed = top.movedim(-1, 0)  # (k, *B): the j-th most probable category everywhere
        with torch.no_grad():
            f_top = _signal(dist, _checks.evaluate(f, summed, (k,)))
        s_top = score(dist, summed)[name]  # (k, *param.shape)
        q_top = align(top_probs.movedim(-1, 0), s_top, batch_ndim)
        exact = (q_top * align(f_top, s_top, batch_ndim) * s_top).sum(0)
        weight = (q_top * s_top).sum(0)  # sum_c q(c) s(c): what the baseline must cancel
        estimate = estimate + exact - b_name * weight
    return {name: estimate}
