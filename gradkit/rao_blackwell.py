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
from torch.distributions import Bernoulli, Categorical, Distribution

from gradkit import _checks
from gradkit.diagnostics import gradient_variance
from gradkit.distributions import parameters
from gradkit.estimators import ScoreFunction
from gradkit.registry import ESTIMATORS, Problem, register_estimator

__all__ = [
    "RaoBlackwell",
    "UnbiasednessCheck",
    "check_unbiased",
    "exact_gradient",
    "sum_and_sample",
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


def _check_plate(dist: Distribution, plate: bool) -> None:
    if len(dist.batch_shape) and not plate:
        raise ValueError(
            f"the Rao-Blackwellised estimator sums the categories of each categorical on its "
            f"own, which needs independent costs: for a batch of categoricals, batch_shape "
            f"{tuple(dist.batch_shape)}, declare plate=True (f returns one cost per batch "
            "element, element b depending only on z[:, b]). Summing categories of coupled "
            "variables would need every combination: use gk.score_function for a cost that "
            "couples the batch"
        )


class _Split(NamedTuple):
    top: Tensor  # (k, *B): the j-th most probable category of every categorical
    top_probs: Tensor  # (k, *B)
    rest: Tensor  # (*B,): the mass left to sample
    complement: Categorical  # q(z | z not in C)


def _site(dist: Distribution) -> Categorical | Bernoulli:
    """A Categorical or Bernoulli site (exactly those types: subclasses may draw differently)."""
    if type(dist) not in (Categorical, Bernoulli):
        raise ValueError(
            f"the rao_blackwell estimator sums the categories of a Categorical or the two values "
            f"of a Bernoulli, got {type(dist).__name__}; use 'score_function' (or 'indecater' "
            "for OneHotCategorical) for other distributions"
        )
    return dist  # type: ignore[return-value]


def _table(dist: Categorical | Bernoulli) -> tuple[Tensor, Tensor]:
    """Probabilities and log-probabilities ``(*B, K)``; a Bernoulli is the categories 0 and 1."""
    if isinstance(dist, Bernoulli):
        p = dist.probs.detach()
        logits = dist.logits.detach()
        return torch.stack([1.0 - p, p], -1), torch.stack([torch.zeros_like(logits), logits], -1)
    return dist.probs.detach(), dist.logits.detach()


def _split(dist: Categorical | Bernoulli, k: int) -> _Split:
    probs, table = _table(dist)
    top_probs, top = probs.topk(k, dim=-1)  # (*B, k)
    in_top = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
    rest = (probs * ~in_top).sum(-1)  # exactly zero when nothing is left to sample
    logits = table.masked_fill(in_top, float("-inf"))
    empty = ~torch.isfinite(logits).any(-1, keepdim=True)
    logits = torch.where(empty, table, logits)  # weight `rest` is 0 there
    complement = Categorical(logits=logits, validate_args=False)
    top = top.movedim(-1, 0)
    if isinstance(dist, Bernoulli):  # the category is the value: 0 or 1, in the sample's dtype
        top = top.to(probs.dtype)
    return _Split(top, top_probs.movedim(-1, 0), rest, complement)


@register_estimator("rao_blackwell", families=(Categorical, Bernoulli))
class RaoBlackwell(ScoreFunction):
    r"""Sum and sample: the ``num_summed`` most probable categories exactly, the rest sampled.

    Rows, one per sample :math:`\tilde z_s \sim q(z \mid z \notin C)`:

    .. math::
        \sum_{c\in C} q(c)\,(f(c) - b_s)\,s(c) + (1 - q(C))\,(f(\tilde z_s) - b_s)\,
        s(\tilde z_s)

    (Liu et al. 2019). A Bernoulli site is the categorical over its values 0 and 1. Its value
    in :func:`~gradkit.autodiff.expectation` is the matching estimate
    :math:`\sum_{c\in C} q(c) f(c) + (1 - q(C))\,\overline{f(\tilde z)}`, with ``f``
    evaluated with gradients on at the summed categories too.
    """

    families = (Categorical, Bernoulli)

    def check(self, problem: Problem, *, num_summed: int = 1, baseline: Any = None) -> None:
        dist = _site(problem.dist)
        _check_num_summed(num_summed, _table(dist)[0].shape[-1])
        _check_plate(dist, problem.plate)
        super().check(problem)

    def _split(self, problem: Problem) -> _Split:
        k = problem.options.get("num_summed", 1)
        return problem.memo("rao_blackwell_split", lambda: _split(_site(problem.dist), k))

    def sample(self, problem: Problem) -> Tensor:
        with problem.forward_randomness():
            z = self._split(problem).complement.sample((problem.num_samples,))
        if isinstance(problem.dist, Bernoulli):  # the sampled category is the value
            return z.to(problem.resolved.dtype)
        return z

    def value(self, problem: Problem, fx: Tensor) -> Tensor:
        split = self._split(problem)
        tail = fx.dim() - 1 - split.rest.dim()
        rest = split.rest.reshape(tuple(split.rest.shape) + (1,) * tail)
        value = rest * fx.mean(0)
        if split.top.shape[0]:
            f_top = problem.evaluate(split.top)  # (k, *T), with f's own gradients
            q_top = split.top_probs.reshape(tuple(split.top_probs.shape) + (1,) * tail)
            value = value + (q_top * f_top).sum(0)
        return value

    def prepare(self, problem: Problem, *, num_summed: int = 1, baseline: Any = None) -> Any:
        return super().prepare(problem, baseline=baseline)

    def finish(self, problem: Problem, *, num_summed: int = 1, baseline: Any = None) -> None:
        super().finish(problem, baseline=baseline)

    def estimate(
        self, problem: Problem, *, num_summed: int = 1, baseline: Any = None
    ) -> dict[str, Tensor]:
        split = self._split(problem)
        (name,) = problem.names
        s = problem.scores()[name]
        b = problem.prepared
        signal = problem.signal
        if isinstance(b, dict):
            b_name = problem.to_signal_units(b[name], name)
        elif b is None:
            b_name = torch.zeros_like(problem.broadcast(signal, name))
        else:
            b_name = problem.broadcast(problem.to_signal_units(b), name)
        rest = problem.broadcast(split.rest.expand_as(signal), name)
        estimate = rest * (problem.broadcast(signal, name) - b_name) * s
        if split.top.shape[0] > 0:
            f_top = problem.cost(split.top)  # (k, *plate)
            s_top = problem.scores(split.top)[name]  # (k, *param.shape)
            q_top = problem.broadcast(split.top_probs, name)
            exact = (q_top * problem.broadcast(f_top, name) * s_top).sum(0)
            weight = (q_top * s_top).sum(0)  # sum_c q(c) s(c): what the baseline must cancel
            estimate = estimate + exact - b_name * weight
        return {name: estimate}

    def mean_gradient(
        self, problem: Problem, *, num_summed: int = 1, baseline: Any = None
    ) -> dict[str, Tensor]:
        rows = self.estimate(problem, num_summed=num_summed, baseline=baseline)
        return {n: v.mean(0) for n, v in rows.items()}


def sum_and_sample(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    *,
    num_summed: int = 1,
    baseline: Any = None,
    control_variate: Any = None,
    plate: bool = False,
    generator: torch.Generator | None = None,
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
    evaluations of ``f`` shared by all samples, plus one per sample. Registered as
    ``"rao_blackwell"`` for :func:`~gradkit.autodiff.expectation`.

    Args:
        f: cost, samples ``(S, *batch_shape)`` (category indices) -> ``(S, *T)`` for a single
            categorical or ``(S, *batch_shape)`` under a declared plate.
        dist: a ``torch.distributions.Categorical``, built from ``probs`` or ``logits``.
        num_samples: samples of the remaining categories per estimate (>= 1).
        num_summed: number of most probable categories summed exactly, ``0 <= k <= K``.
        baseline: as for :func:`gradkit.estimators.score_function`.
        control_variate: a :class:`gradkit.control_variates.ControlVariate`.
        plate: declare one cost per categorical (needed for a batch of categoricals).
        generator: a ``torch.Generator`` for all of the call's randomness.

    Returns:
        dict with the parameter name (``probs`` or ``logits``) -> per-sample estimates of
        shape ``(S, *param.shape)``.

    Raises:
        TypeError: for a distribution other than ``Categorical``, or a non-int argument.
        ValueError: for ``num_summed`` outside ``[0, K]``, a bad ``num_samples``, or a batch
            of categoricals without a declared plate.

    Example:
        >>> import torch, gradkit as gk
        >>> q = torch.distributions.Categorical(logits=torch.tensor([0.7, 0.2, 0.1]).log())
        >>> g = gk.rao_blackwell.sum_and_sample(lambda z: z.float() ** 2, q, 4, num_summed=3)
        >>> g["logits"][0]  # everything summed: the exact q(z) (f(z) - E f), every sample
        tensor([-0.4200,  0.0800,  0.3400])
    """
    return ESTIMATORS["rao_blackwell"](
        f,
        dist,
        num_samples,
        num_summed=num_summed,
        baseline=baseline,
        control_variate=control_variate,
        plate=plate,
        generator=generator,
    )


def exact_gradient(f: CostFn, dist: Distribution, *, plate: bool = False) -> dict[str, Tensor]:
    r"""The exact gradient of :math:`\mathbb{E}_{q_\theta}[f(z)]` by enumerating the categories.

    .. math:: \eta = \nabla_\theta \sum_{z=1}^{K} q_\theta(z)\, f(z),

    summed over the batch elements for independent categoricals (``plate=True``), with
    :math:`\theta` the distribution's own parameter (``probs`` or ``logits``). ``f`` is called
    once, on a ``(K, *batch_shape)`` tensor whose row :math:`j` holds category :math:`j` in
    every batch element; autograd differentiates the enumerated sum. This is the reference
    against which sum-and-sample estimators are tested (Liu et al. 2019, ``liu2019rao``).

    Args:
        f: cost, as for :func:`sum_and_sample`.
        dist: a ``torch.distributions.Categorical``.
        plate: declare one cost per categorical (needed for a batch of categoricals).

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
    _check_plate(dist, plate)
    (name,) = parameters(dist)
    leaf = getattr(dist, name).detach().clone().requires_grad_()
    q = Categorical(**{name: leaf}, validate_args=False)
    categories = q.probs.shape[-1]
    index = torch.arange(categories, device=leaf.device)
    index = index.reshape(categories, *[1] * len(dist.batch_shape)).expand(
        categories, *dist.batch_shape
    )
    with torch.no_grad():
        values = _checks.evaluate(f, index, (categories,))
        if not plate:
            values = values.reshape(categories, -1).sum(-1)
        elif tuple(values.shape[1:]) != tuple(dist.batch_shape):
            raise ValueError(
                f"plate=True declares one cost per categorical, shape (K, "
                f"{', '.join(map(str, dist.batch_shape))}), but f returned "
                f"{tuple(values.shape)}"
            )
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
    plate: bool = False,
) -> list[dict[str, float]]:
    r"""How the variance of the sum-and-sample estimate falls as more categories are summed.

    For each :math:`k` in ``num_summed`` it draws ``num_samples`` estimates with
    :func:`sum_and_sample` (``num_summed=k``) for every baseline and reports the total variance
    of one estimate, :math:`\operatorname{tr}\Sigma_k = \sum_j \mathrm{Var}\,\hat g_j`
    (:func:`gradkit.diagnostics.gradient_variance`), next to the plain score-function
    estimator at the same budget of evaluations of ``f`` (:math:`k` summed plus one sampled),
    :math:`\operatorname{tr}\Sigma_{\mathrm{plain}} / (k + 1)`, the variance of the mean of
    :math:`k + 1` plain samples, the comparison of Liu et al. (2019, ``liu2019rao``). A
    stateful baseline carries its state from one :math:`k` to the next.

    Args:
        f: cost, as for :func:`sum_and_sample`.
        dist: a ``torch.distributions.Categorical``.
        num_samples: estimates per variance (``>= 2``).
        num_summed: the values of :math:`k`, each in ``[0, K]``.
        baselines: column label -> baseline option of :func:`sum_and_sample` (``None``, a
            number or a :class:`~gradkit.baselines.Baseline`); default
            ``{"Rao-Blackwellised": None}``.
        plate: declare one cost per categorical (needed for a batch of categoricals).

    Returns:
        one dict per :math:`k`, in the order given, with keys ``"k"``, ``"top-k mass"``
        (:math:`q_\theta(C)`, averaged over the batch elements of a plate), one key per
        baseline label, and ``"plain, k + 1 samples"``; values are Python numbers.

    Raises:
        TypeError: for a distribution other than ``Categorical``.
        ValueError: for ``num_samples < 2``, no values of :math:`k`, no baselines, a label
            that repeats a fixed column name, or anything :func:`sum_and_sample` refuses.

    Example:
        >>> import torch, gradkit as gk
        >>> q = torch.distributions.Categorical(probs=torch.tensor([0.7, 0.2, 0.1]))
        >>> rows = gk.rao_blackwell.variance_sweep(lambda z: z.float(), q, 100, [0, 3])
        >>> rows[1]
        {'k': 3, 'top-k mass': 1.0, 'Rao-Blackwellised': 0.0, 'plain, k + 1 samples': ...}
    """
    dist = _check_dist(dist)
    _check_plate(dist, plate)  # before the plain estimator runs on an undeclared plate
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
    plain_rows = ESTIMATORS["score_function"](f, dist, num_samples, plate=plate)
    plain = gradient_variance(plain_rows).item()
    records = []
    for k in ks:
        k = _check_num_summed(k, probs.shape[-1])
        record: dict[str, float] = {"k": k}
        record["top-k mass"] = probs.topk(k, dim=-1).values.sum(-1).mean().item()
        for label, baseline in baselines.items():
            g = sum_and_sample(f, dist, num_samples, num_summed=k, baseline=baseline, plate=plate)
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
    plate: bool = False,
) -> UnbiasednessCheck:
    r"""Compare the mean of ``num_samples`` sum-and-sample estimates with the exact gradient.

    With :math:`\bar g` the mean of the :math:`n` per-sample estimates of
    :func:`sum_and_sample`, :math:`\hat\Sigma` their sample covariance and :math:`\eta` from
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
        f: cost, as for :func:`sum_and_sample`.
        dist: a ``torch.distributions.Categorical``.
        num_samples: estimates ``n >= 2``.
        num_summed: categories summed exactly, as for :func:`sum_and_sample`.
        baseline: as for :func:`sum_and_sample`.
        plate: declare one cost per categorical (needed for a batch of categoricals).

    Returns:
        an :class:`UnbiasednessCheck` of Python floats.

    Raises:
        TypeError: for a distribution other than ``Categorical``.
        ValueError: for ``num_samples < 2`` or anything :func:`sum_and_sample` refuses.

    Example:
        >>> import torch, gradkit as gk
        >>> q = torch.distributions.Categorical(logits=torch.tensor([2.0, 1.0, 0.0, -1.0]))
        >>> c = gk.rao_blackwell.check_unbiased(lambda z: z.float() ** 2, q, 1000, num_summed=2)
        >>> c.ratio < 4
        True
    """
    _checks.check_num_samples(num_samples, 2, "a variance needs two estimates")
    exact = exact_gradient(f, dist, plate=plate)
    (name,) = exact
    rows = sum_and_sample(
        f, dist, num_samples, num_summed=num_summed, baseline=baseline, plate=plate
    )
    g = rows[name]
    error = (g.mean(0) - exact[name]).norm().item()
    expected = math.sqrt(gradient_variance(g).item() / num_samples)
    if expected > 0:
        ratio = error / expected
    else:
        rounding = 100 * torch.finfo(g.dtype).eps * (1 + exact[name].norm().item())
        ratio = 0.0 if error <= rounding else math.inf
    return UnbiasednessCheck(error, expected, ratio)
