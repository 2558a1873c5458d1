r"""Rao-Blackwellised score-function estimators for categorical variables ("sum and sample").

For :math:`z \sim q_\theta` on :math:`K` categories, any per-sample estimator :math:`g(z)` of
:math:`\nabla_\theta \mathbb{E}_q[f(z)] = \sum_z q_\theta(z)\, g(z)` can be improved by
conditioning (Casella and Robert 1996; Liu, Regier, Tripuraneni, Jordan and McAuliffe 2019).
Take the set :math:`C` of the :math:`k` most probable categories and sum them exactly; sample
only the rest:

.. math::
    \hat g = \sum_{c \in C} q_\theta(c)\, g(c) + \big(1 - q_\theta(C)\big)\, g(\tilde z), \qquad
    \tilde z \sim q_\theta(z \mid z \notin C).

To see why this is unbiased and never worse, draw :math:`z` in two stages: first
:math:`\tilde z \sim q_\theta(z \mid z \notin C)`; then, with probability :math:`q_\theta(C)`,
replace it by a draw from :math:`q_\theta(z \mid z \in C)`. The result has law :math:`q_\theta`,
and :math:`\hat g = \mathbb{E}[g(z) \mid \tilde z]`: the coin and the draw inside :math:`C` are
averaged out exactly (the summed term), and only the draw :math:`\tilde z` from the complement
of :math:`C` stays random. So :math:`\hat g` is unbiased, and by the law of total variance,
:math:`\mathrm{Var}\,g(z) = \mathrm{Var}\,\hat g + \mathbb{E}[\mathrm{Var}(g(z) \mid
\tilde z)]`, its variance is never larger than that of :math:`g(z)`. It pays off most when
:math:`q` puts most of its mass on a few categories, which is what a trained categorical model
tends to do: then :math:`1 - q_\theta(C)` is small and the sampled term barely moves.

Besides the estimator, :func:`exact_gradient` enumerates the categories for the exact gradient,
:func:`variance_sweep` measures how the variance falls as more categories are summed, and
:func:`check_unbiased` compares an estimate with the exact gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution

from gradkit import _checks, estimators
from gradkit.baselines import Baseline, Constant
from gradkit.diagnostics import gradient_variance
from gradkit.distributions import parameters
from gradkit.estimators import align, is_plate, score

__all__ = [
    "UnbiasednessCheck",
    "check_unbiased",
    "exact_gradient",
    "score_function",
    "variance_sweep",
]

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


def exact_gradient(f: CostFn, dist: Distribution) -> dict[str, Tensor]:
    r"""The exact gradient of :math:`\mathbb{E}_{q_\theta}[f(z)]` by enumerating the categories.

    .. math:: \eta = \nabla_\theta \sum_{z=1}^{K} q_\theta(z)\, f(z),

    summed over the batch elements for independent categoricals (a plate), with :math:`\theta`
    the distribution's own parameter (``probs`` or ``logits``). ``f`` is called once, on a
    ``(K, *batch_shape)`` tensor whose row :math:`j` holds category :math:`j` in every batch
    element; autograd differentiates the enumerated sum. This is the reference against which
    sum-and-sample estimators are tested (Liu et al. 2019, ``liu2019rao``).

    Args:
        f: cost, as for :func:`score_function`.
        dist: a ``torch.distributions.Categorical``.

    Returns:
        dict with the parameter name -> the exact gradient, shaped like the parameter.

    Raises:
        TypeError: for a distribution other than ``Categorical``.
        ValueError: for a cost that couples several categoricals, or returns NaN or inf.

    Example:
        >>> import torch, gradkit as gk
        >>> q = torch.distributions.Categorical(probs=torch.tensor([0.25, 0.75]))
        >>> gk.rao_blackwell.exact_gradient(lambda z: z.float(), q)
        {'probs': tensor([-0.7500,  0.2500])}
    """
    dist = _check_dist(dist)
    (name,) = parameters(dist)
    leaf = getattr(dist, name).detach().clone().requires_grad_()
    q = Categorical(**{name: leaf}, validate_args=False)
    categories = q.probs.shape[-1]
    index = torch.arange(categories, device=leaf.device)
    index = index.reshape(categories, *[1] * len(dist.batch_shape)).expand(
        categories, *dist.batch_shape
    )
    with torch.no_grad():
        values = _signal(dist, _checks.evaluate(f, index, (categories,)))  # (K, *B) or (K,)
    (grad,) = torch.autograd.grad((q.probs * values.movedim(0, -1)).sum(), leaf)
    return {name: grad}


_SWEEP_COLUMNS = ("k", "top-k mass", "plain, k + 1 samples")


def variance_sweep(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    num_summed: Iterable[int],
    *,
    baselines: Mapping[str, Any] | None = None,
) -> list[dict[str, float]]:
    r"""How the variance of the sum-and-sample estimate falls as more categories are summed.

    For each :math:`k` in ``num_summed`` it draws ``num_samples`` estimates with
    :func:`score_function` (``num_summed=k``) for every baseline and reports the total variance
    of one estimate, :math:`\operatorname{tr}\Sigma_k = \sum_j \mathrm{Var}\,\hat g_j`
    (:func:`gradkit.diagnostics.gradient_variance`), next to the plain score-function
    estimator at the same budget of evaluations of ``f`` (:math:`k` summed plus one sampled),
    :math:`\operatorname{tr}\Sigma_{\mathrm{plain}} / (k + 1)`, the variance of the mean of
    :math:`k + 1` plain samples, the comparison of Liu et al. (2019, ``liu2019rao``). A
    stateful baseline carries its state from one :math:`k` to the next.

    Args:
        f: cost, as for :func:`score_function`.
        dist: a ``torch.distributions.Categorical``.
        num_samples: estimates per variance (``>= 2``).
        num_summed: the values of :math:`k`, each in ``[0, K]``.
        baselines: column label -> baseline option of :func:`score_function` (``None``, a
            number or a :class:`~gradkit.baselines.Baseline`); default
            ``{"Rao-Blackwellised": None}``.

    Returns:
        one dict per :math:`k`, in the order given, with keys ``"k"``, ``"top-k mass"``
        (:math:`q_\theta(C)`, averaged over the batch elements of a plate), one key per
        baseline label, and ``"plain, k + 1 samples"``; values are Python numbers.

    Raises:
        TypeError: for a distribution other than ``Categorical``.
        ValueError: for ``num_samples < 2``, no values of :math:`k`, no baselines, a label
            that repeats a fixed column name, or anything :func:`score_function` refuses.

    Example:
        >>> import torch, gradkit as gk
        >>> q = torch.distributions.Categorical(probs=torch.tensor([0.7, 0.2, 0.1]))
        >>> rows = gk.rao_blackwell.variance_sweep(lambda z: z.float(), q, 100, [0, 3])
        >>> rows[1]
        {'k': 3, 'top-k mass': 1.0, 'Rao-Blackwellised': 0.0, 'plain, k + 1 samples': ...}
    """
    dist = _check_dist(dist)
    _checks.check_num_samples(num_samples, 2, "a variance needs two estimates")
    ks = list(num_summed)
    if not ks:
        raise ValueError(
            "num_summed is empty; pass the numbers of categories to sum, e.g. [0, 1, 2]"
        )
    if baselines is None:
        baselines = {"Rao-Blackwellised": None}
    if not baselines:
        raise ValueError("baselines is empty; pass {label: baseline}, e.g. {'no baseline': None}")
    clash = sorted(set(baselines) & set(_SWEEP_COLUMNS))
    if clash:
        raise ValueError(f"baseline labels {clash} clash with the columns {list(_SWEEP_COLUMNS)}")
    probs = dist.probs.detach()
    plain = gradient_variance(estimators.score_function(f, dist, num_samples)).item()
    records = []
    for k in ks:
        k = _check_num_summed(k, probs.shape[-1])
        record: dict[str, float] = {"k": k}
        record["top-k mass"] = probs.topk(k, dim=-1).values.sum(-1).mean().item()
        for label, baseline in baselines.items():
            g = score_function(f, dist, num_samples, num_summed=k, baseline=baseline)
            record[label] = gradient_variance(g).item()
        record["plain, k + 1 samples"] = plain / (k + 1)
        records.append(record)
    return records


class UnbiasednessCheck(NamedTuple):
    r"""Error of a mean gradient estimate against the error an unbiased estimator would show.

    Attributes:
        error: :math:`\lVert \bar g - \eta \rVert`.
        expected_error: :math:`\sqrt{\operatorname{tr}\hat\Sigma / n}`.
        ratio: ``error / expected_error``, of order one without bias.

    Returned by :func:`check_unbiased`. It rests on the identity
    :math:`\mathbb{E}\lVert \bar g - \eta \rVert^2 = \operatorname{tr}\Sigma / n` for the
    mean of :math:`n` unbiased estimates (bias and variance as the two properties by which
    Mohamed et al. 2020, ``mohamed2020monte``, judge an estimator).

    Example:
        >>> from gradkit.rao_blackwell import UnbiasednessCheck
        >>> UnbiasednessCheck(error=0.02, expected_error=0.01, ratio=2.0).ratio
        2.0
    """

    error: float
    expected_error: float
    ratio: float


def check_unbiased(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    *,
    num_summed: int = 1,
    baseline: Any = None,
) -> UnbiasednessCheck:
    r"""Compare the mean of ``num_samples`` sum-and-sample estimates with the exact gradient.

    With :math:`\bar g` the mean of the :math:`n` per-sample estimates of
    :func:`score_function`, :math:`\hat\Sigma` their sample covariance and :math:`\eta` from
    :func:`exact_gradient`, an unbiased estimator has
    :math:`\mathbb{E}\lVert \bar g - \eta \rVert^2 = \operatorname{tr}\Sigma / n`, so

    .. math::
        \text{ratio} = \lVert \bar g - \eta \rVert \big/ \sqrt{\operatorname{tr}\hat\Sigma / n}

    is of order one, while a bias :math:`b` makes it grow like
    :math:`\lVert b \rVert \sqrt{n / \operatorname{tr}\Sigma}`. Norms run over all
    parameter elements. Unlike coordinate-wise z-scores, the check still works when rare
    categories are never drawn (their standard error then reads as zero). When every category
    is summed the estimate has no variance: the ratio is 0 if the error is within rounding,
    :math:`100\,\epsilon\,(1 + \lVert \eta \rVert)`, and infinite otherwise. The exact
    gradient makes this the enumeration check of Liu et al. (2019, ``liu2019rao``).

    Args:
        f: cost, as for :func:`score_function`.
        dist: a ``torch.distributions.Categorical``.
        num_samples: estimates ``n >= 2``.
        num_summed: categories summed exactly, as for :func:`score_function`.
        baseline: as for :func:`score_function`.

    Returns:
        an :class:`UnbiasednessCheck` of Python floats.

    Raises:
        TypeError: for a distribution other than ``Categorical``.
        ValueError: for ``num_samples < 2`` or anything :func:`score_function` refuses.

    Example:
        >>> import torch, gradkit as gk
        >>> q = torch.distributions.Categorical(logits=torch.tensor([2.0, 1.0, 0.0, -1.0]))
        >>> c = gk.rao_blackwell.check_unbiased(lambda z: z.float() ** 2, q, 1000, num_summed=2)
        >>> c.ratio < 4
        True
    """
    _checks.check_num_samples(num_samples, 2, "a variance needs two estimates")
    exact = exact_gradient(f, dist)
    (name,) = exact
    g = score_function(f, dist, num_samples, num_summed=num_summed, baseline=baseline)[name]
    error = (g.mean(0) - exact[name]).norm().item()
    expected = math.sqrt(gradient_variance(g).item() / num_samples)
    if expected > 0:
        ratio = error / expected
    else:
        rounding = 100 * torch.finfo(g.dtype).eps * (1 + exact[name].norm().item())
        ratio = 0.0 if error <= rounding else math.inf
    return UnbiasednessCheck(error, expected, ratio)
