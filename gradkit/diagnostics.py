r"""Diagnostics: how good is a gradient estimator?

Run an estimator (possibly several times), pool its per-sample estimates and report, per
parameter element, the mean, the per-sample variance, the variance of the ``num_samples``-mean
(what one call of the estimator delivers), the standard error of the pooled mean and, when an
exact gradient is known (closed form, quadrature or enumeration), the bias and its z-score
(Mohamed et al. 2020, §3, compare estimators this way).

For gradients of whole networks (an encoder trained with a score-function estimator),
:func:`repeated_gradients` collects the gradient over repeated estimates and
:func:`gradient_variance` reduces them to one number, the total variance.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.distributions import Distribution

from gradkit import _checks

__all__ = [
    "CountingCost",
    "GradientSummary",
    "check_by_enumeration",
    "gradient_moments",
    "gradient_variance",
    "repeated_gradients",
    "results_table",
    "standard_error",
    "summarize",
    "variance_standard_error",
    "z_score",
]

Exact = Mapping[str, Tensor | float] | None
_Moments = tuple[int, Tensor, Tensor]  # count, mean, sum of squared deviations


@dataclass(frozen=True)
class GradientSummary:
    r"""Moments of per-sample gradient estimates of one parameter, pooled over all draws.

    With :math:`n` pooled per-sample estimates :math:`\hat g_i` from calls of ``num_samples``
    samples each:

    .. math::
        \bar g = \frac1n \sum_i \hat g_i, \qquad
        v = \frac{1}{n-1} \sum_i (\hat g_i - \bar g)^2, \qquad
        \mathrm{SE} = \sqrt{v / n}, \qquad z = (\bar g - g^\star)/\mathrm{SE}.

    Samples are treated as independent; estimators whose per-sample estimates share a
    leave-one-out baseline are weakly dependent, by :math:`O(1/S)`.

    Attributes:
        mean: :math:`\bar g`, shaped like the parameter.
        variance: per-sample variance :math:`v`.
        variance_of_mean: :math:`v/\mathrm{num\_samples}`, the variance of one call's mean.
        standard_error: :math:`\mathrm{SE}` of the pooled mean.
        count: :math:`n` = ``num_samples * repeats``.
        num_samples: samples per estimator call.
        exact: the exact gradient :math:`g^\star`, or ``None``.

    Example:
        >>> import torch, gradkit as gk
        >>> s = gk.diagnostics.summarize({"loc": torch.tensor([1.0, 2.0, 3.0])}, exact={"loc": 2})
        >>> s["loc"].mean, s["loc"].variance, s["loc"].z_score, s["loc"].within(4)
        (tensor(2.), tensor(1.), tensor(0.), True)
    """

    mean: Tensor
    variance: Tensor
    variance_of_mean: Tensor
    standard_error: Tensor
    count: int
    num_samples: int
    exact: Tensor | None = None

    @property
    def bias(self) -> Tensor | None:
        r""":math:`\bar g - g^\star`, or ``None`` without an exact value."""
        return None if self.exact is None else self.mean - self.exact

    @property
    def z_score(self) -> Tensor | None:
        r""":math:`(\bar g - g^\star)/\mathrm{SE}`; ``0`` or ``±inf`` where the SE is zero."""
        bias = self.bias
        return None if bias is None else _ratio(bias, self.standard_error)

    def within(self, k: float = 4.0, *, atol: float | None = None) -> bool:
        r"""Whether :math:`|\bar g - g^\star| \le k\,\mathrm{SE} + \mathrm{atol}` everywhere.

        Args:
            k: number of standard errors allowed.
            atol: absolute slack for rounding, by default
                :math:`100\,\epsilon_{\mathrm{dtype}}(1 + |g^\star|)`; it matters only for
                estimators that are exact up to rounding (zero variance).

        Raises:
            ValueError: without an exact value to compare with.
        """
        bias, exact = self.bias, self.exact
        if bias is None or exact is None:
            raise ValueError(
                "this summary has no exact value to compare with; pass exact={name: value} "
                "to gradient_moments or summarize"
            )
        slack = (
            100 * torch.finfo(self.mean.dtype).eps * (1 + exact.abs())
            if atol is None
            else torch.as_tensor(atol, dtype=self.mean.dtype, device=self.mean.device)
        )
        return bool((bias.abs() <= k * self.standard_error + slack).all())


def _ratio(bias: Tensor, se: Tensor) -> Tensor:
    """``bias / se``, with ``0`` or ``±inf`` where the standard error is zero (NaN stays NaN)."""
    exact_zero = torch.where(bias == 0, 0.0, torch.copysign(torch.full_like(bias, torch.inf), bias))
    ratio = torch.where(se > 0, bias / se.clamp_min(torch.finfo(se.dtype).tiny), exact_zero)
    return torch.where(bias.isnan() | se.isnan(), torch.nan, ratio)


def _moments(estimates: Tensor) -> _Moments:
    """Count, mean and sum of squared deviations over dim 0 (in at least float32)."""
    values = estimates.detach()
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    mean = values.mean(0)
    return values.shape[0], mean, (values - mean).pow(2).sum(0)


def _merge(a: _Moments, b: _Moments) -> _Moments:
    """Pool two (count, mean, squared deviations) triples (Chan, Golub and LeVeque 1983)."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), sa + sb + delta.pow(2) * (na * nb / n)


def _check_estimates(estimates: object, where: str) -> Mapping[str, Tensor]:
    if not isinstance(estimates, Mapping) or not all(
        isinstance(v, Tensor) and v.dim() >= 1 for v in estimates.values()
    ):
        raise TypeError(
            f"{where} must be a dict {{parameter name: tensor (num_samples, *param.shape)}}, "
            f"as gk.score_function / gk.pathwise / gk.measure_valued return, got "
            f"{type(estimates).__name__}"
        )
    return estimates


def _exact_for(exact: Exact, names: list[str], means: dict[str, Tensor]) -> dict[str, Tensor]:
    if exact is None:
        return {}
    if not isinstance(exact, Mapping):
        raise TypeError(
            f"exact must be a dict {{parameter name: value}}, got {type(exact).__name__}; "
            "e.g. exact={'loc': 2.0}"
        )
    unknown = sorted(set(exact) - set(names))
    if unknown:
        raise ValueError(f"exact has unknown parameter(s) {unknown}; the estimates have {names}")
    out = {}
    for name, value in exact.items():
        mean = means[name]
        value = torch.as_tensor(value, dtype=mean.dtype, device=mean.device)
        try:
            out[name] = value.expand_as(mean)
        except RuntimeError:
            raise ValueError(
                f"exact[{name!r}] has shape {tuple(value.shape)}, which does not broadcast to "
                f"the parameter's shape {tuple(mean.shape)}"
            ) from None
    return out


def _summaries(
    pooled: dict[str, _Moments], num_samples: int, exact: Exact
) -> dict[str, GradientSummary]:
    exact_values = _exact_for(exact, list(pooled), {k: v[1] for k, v in pooled.items()})
    out = {}
    for name, (count, mean, squares) in pooled.items():
        variance = squares / (count - 1)
        out[name] = GradientSummary(
            mean=mean,
            variance=variance,
            variance_of_mean=variance / num_samples,
            standard_error=(variance / count).sqrt(),
            count=count,
            num_samples=num_samples,
            exact=exact_values.get(name),
        )
    return out


def variance_standard_error(values: Tensor, dim: int = 0) -> Tensor:
    r"""The standard error of a sample variance, :math:`\sqrt{(m_4 - m_2^2)/n}`, along ``dim``.

    With :math:`m_k = \frac1n \sum_i (x_i - \bar x)^k` the central moments of the ``n``
    values, the sample variance :math:`m_2` has variance :math:`(\mu_4 - \sigma^4)/n + O(1/n^2)`
    (for a Gaussian, :math:`2\sigma^4/n`); this is its plug-in estimate. The variance of a
    gradient estimator is itself estimated from samples, so comparing it with an exact value
    (quadrature, closed form) needs this yardstick. Heavy-tailed estimates (a score function's
    rows) have a large :math:`m_4`, hence a wide error.

    Args:
        values: the sample, any shape; ``dim`` indexes the draws (at least 2).
        dim: the dimension of the draws.

    Returns:
        the standard error, ``values``'s shape without ``dim``, in float64 or ``values``'s
        dtype if wider.

    Raises:
        TypeError: if ``values`` is not a tensor.
        ValueError: for fewer than 2 values along ``dim``.

    Example:
        >>> import torch, gradkit as gk
        >>> x = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # m2 = 1, m4 = 1: a variance without error
        >>> gk.diagnostics.variance_standard_error(x)
        tensor(0., dtype=torch.float64)
    """
    values = _wide(_check_sample(values, dim, "a variance's standard error"))
    centred = values - values.mean(dim, keepdim=True)
    m2, m4 = centred.pow(2).mean(dim), centred.pow(4).mean(dim)
    return ((m4 - m2**2).clamp_min(0.0) / values.shape[dim]).sqrt()


def _check_sample(values: object, dim: int, what: str) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() == 0 or values.shape[dim] < 2:
        raise ValueError(
            f"{what} needs at least 2 values along dim {dim}, got shape {tuple(values.shape)}"
        )
    return values.detach()


def _wide(values: Tensor) -> Tensor:
    return values.to(torch.promote_types(values.dtype, torch.float64))


def standard_error(values: Tensor, dim: int = 0) -> Tensor:
    r"""The standard error of a sample mean, :math:`\hat\sigma/\sqrt n`, along ``dim``.

    :math:`\hat\sigma` is the sample standard deviation (divisor :math:`n-1`) of the ``n``
    values; the draws are treated as independent.

    Args:
        values: the sample, any shape; ``dim`` indexes the draws (at least 2).
        dim: the dimension of the draws.

    Returns:
        the standard error, ``values``'s shape without ``dim``, in float64 or ``values``'s
        dtype if wider.

    Raises:
        TypeError: if ``values`` is not a tensor.
        ValueError: for fewer than 2 values along ``dim``.

    Example:
        >>> import torch, gradkit as gk
        >>> gk.diagnostics.standard_error(torch.tensor([0.0, 2.0, 0.0, 2.0]))
        tensor(0.5774, dtype=torch.float64)
    """
    values = _wide(_check_sample(values, dim, "a standard error"))
    return values.std(dim) / math.sqrt(values.shape[dim])


def z_score(values: Tensor, exact: Tensor | float, dim: int = 0) -> Tensor:
    r"""How many standard errors a sample mean lies from an exact value, along ``dim``.

    .. math:: z = \frac{\bar x - x^\star}{\hat\sigma/\sqrt n}

    A correct unbiased estimator gives :math:`|z|` of order 1 (beyond 4 or 5 is a bias, not
    bad luck); where the values do not vary, :math:`z` is ``0`` if the mean equals the exact
    value and ``±inf`` otherwise. To compare a variance with its exact value, pass the squared
    deviations (or, for a zero-mean score, the squared scores): their mean is the variance.

    Args:
        values: per-sample estimates, any shape; ``dim`` indexes the draws (at least 2).
        exact: the exact value, broadcastable to ``values``'s shape without ``dim``.
        dim: the dimension of the draws.

    Returns:
        the z-scores, the broadcast shape, in float64 or ``values``'s dtype if wider.

    Raises:
        TypeError: if ``values`` is not a tensor.
        ValueError: for fewer than 2 values along ``dim``, or an ``exact`` that does not
            broadcast.

    Example:
        >>> import torch, gradkit as gk
        >>> gk.diagnostics.z_score(torch.tensor([0.0, 2.0, 0.0, 2.0]), 0.5)
        tensor(0.8660, dtype=torch.float64)
    """
    values = _wide(_check_sample(values, dim, "a z-score"))
    mean = values.mean(dim)
    target = torch.as_tensor(exact, dtype=values.dtype, device=values.device)
    try:
        bias = mean - target
    except RuntimeError:
        raise ValueError(
            f"exact has shape {tuple(target.shape)}, which does not broadcast to the estimates' "
            f"shape {tuple(mean.shape)} (values without dim {dim})"
        ) from None
    return _ratio(bias, standard_error(values, dim).expand_as(bias))


def results_table(
    estimates: Mapping[Any, Tensor],
    exact: Mapping[Any, Tensor | float] | None = None,
    *,
    variance: bool = True,
    index: Sequence[str] | str | None = None,
) -> Any:
    r"""A table of Monte Carlo estimates against exact values, one row per estimate.

    Each entry of ``estimates`` is a sample of per-sample estimates along dim 0 (an
    estimator's ``(num_samples, *param.shape)`` rows); its row holds the mean, the standard
    error (:func:`standard_error`) and, with ``variance``, the per-sample variance and its
    standard error (:func:`variance_standard_error`). Where ``exact`` has the same key, the
    row adds the exact value and the z-score (:func:`z_score`). An entry with more than one
    element per sample gets one row per element, its index widened by the element's position.

    Args:
        estimates: dict row key -> per-sample estimates ``(n, *shape)``, ``n >= 2``; tuple
            keys make a multi-level index.
        exact: optional dict row key -> exact value (broadcastable to the entry's ``shape``);
            rows left out get no comparison (``NaN``).
        variance: add the columns ``per-sample variance`` and ``variance s.e.``.
        index: names of the index levels (a string for a single level); when entries have
            more than one element, the element level is named ``"element"`` unless ``index``
            names it too.

    Returns:
        a pandas DataFrame with the columns ``exact``, ``mean``, ``standard error``,
        ``z`` (and the variance columns), in float64.

    Raises:
        ImportError: without pandas (``pip install pandas``).
        TypeError: if ``estimates`` is not a dict of tensors.
        ValueError: for an empty ``estimates``, keys that mix tuples of different lengths
            (or tuples and plain keys), fewer than 2 values in an entry, ``exact`` keys with
            no estimates, an exact value that does not broadcast, or ``index`` names that do
            not match the levels.

    Example:
        >>> import torch, gradkit as gk
        >>> t = gk.diagnostics.results_table(
        ...     {"a": torch.tensor([0.0, 2.0, 0.0, 2.0])}, {"a": 1.0}, variance=False
        ... )
        >>> t.loc["a", "z"], round(t.loc["a", "standard error"], 4)
        (np.float64(0.0), np.float64(0.5774))
    """
    try:
        import pandas as pd
    except ImportError as err:  # pragma: no cover - pandas is in the book's toolchain
        raise ImportError("results_table returns a pandas DataFrame; pip install pandas") from err
    if not isinstance(estimates, Mapping) or not estimates:
        raise TypeError(
            "estimates must be a non-empty dict {row key: tensor (n, *shape)}, got "
            f"{type(estimates).__name__}"
        )
    exact = {} if exact is None else exact
    if not isinstance(exact, Mapping):
        raise TypeError(f"exact must be a dict {{row key: value}}, got {type(exact).__name__}")
    unknown = [key for key in exact if key not in estimates]
    if unknown:
        raise ValueError(
            f"exact has key(s) {unknown} with no estimates; the estimates have {list(estimates)}"
        )
    lengths = {len(key) if isinstance(key, tuple) else 0 for key in estimates}
    if len(lengths) > 1:
        raise ValueError(
            "the keys of estimates must all be tuples of one length (a multi-level index) or "
            f"all plain keys, got {list(estimates)}"
        )
    bases: list[tuple[Any, ...]] = []  # each row's key as a tuple
    elements: list[Any] = []  # each row's position in its entry (None for a scalar entry)
    records: list[dict[str, float]] = []
    for key, values in estimates.items():
        sample = _wide(_check_sample(values, 0, f"results_table[{key!r}]"))
        columns = {"mean": sample.mean(0), "standard error": standard_error(sample)}
        shape = sample.shape[1:]
        if key in exact:
            z = z_score(sample, exact[key])
            if z.shape != shape:
                raise ValueError(
                    f"exact[{key!r}] does not broadcast to the estimates' shape {tuple(shape)}"
                )
            columns["exact"] = torch.as_tensor(exact[key], dtype=z.dtype).expand_as(z)
            columns["z"] = z
        if variance:
            columns["per-sample variance"] = sample.var(0)
            columns["variance s.e."] = variance_standard_error(sample)
        flat = {name: c.expand(shape).reshape(-1).cpu().tolist() for name, c in columns.items()}
        for i, position in enumerate(itertools.product(*map(range, shape))):
            bases.append(key if isinstance(key, tuple) else (key,))
            elements.append((position[0] if len(position) == 1 else position) if shape else None)
            records.append({name: column[i] for name, column in flat.items()})
    order = ["exact", "mean", "standard error", "z", "per-sample variance", "variance s.e."]
    has_element = any(e is not None for e in elements)
    keys = (
        [(*b, "" if e is None else e) for b, e in zip(bases, elements, strict=True)]
        if has_element  # one more level, the element
        else bases
    )
    table = pd.DataFrame(
        records,
        index=pd.MultiIndex.from_tuples(keys) if len(keys[0]) > 1 else [k for (k,) in keys],
    )
    table = table[[c for c in order if c in table.columns]].astype("float64")
    if index is not None:
        names = [index] if isinstance(index, str) else list(index)
        levels = table.index.nlevels
        if has_element and len(names) == levels - 1:
            names.append("element")
        if len(names) != levels:
            raise ValueError(
                f"index names {names} do not match the table's {levels} index level(s) (the "
                "keys' levels, and one for the element when entries have several)"
            )
        table.index.names = names
    return table


def summarize(
    estimates: Mapping[str, Tensor], exact: Exact = None, *, num_samples: int | None = None
) -> dict[str, GradientSummary]:
    r"""Summarise per-sample gradient estimates already computed.

    Args:
        estimates: dict name -> per-sample estimates ``(n, *param.shape)``, ``n >= 2``.
        exact: optional dict name -> exact gradient (broadcastable to ``param.shape``); names
            left out get no comparison.
        num_samples: samples per estimator call, for ``variance_of_mean``; default ``n``.

    Returns:
        dict name -> :class:`GradientSummary`.

    Raises:
        TypeError: if ``estimates`` is not a dict of tensors, or ``exact`` not a dict.
        ValueError: for fewer than 2 estimates, a bad ``num_samples``, or an ``exact`` with
            unknown names or shapes that do not broadcast.

    Example:
        >>> import torch, gradkit as gk
        >>> s = gk.diagnostics.summarize({"p": torch.tensor([[0.0], [2.0]])})
        >>> s["p"].mean, s["p"].standard_error
        (tensor([1.]), tensor([1.]))
    """
    estimates = _check_estimates(estimates, "estimates")
    counts = {name: v.shape[0] for name, v in estimates.items()}
    if not counts or min(counts.values()) < 2:
        raise ValueError(
            f"summarize needs at least 2 estimates per parameter to measure a variance, got "
            f"{counts}; draw more samples"
        )
    n = max(counts.values())
    if num_samples is None:
        num_samples = n
    _checks.check_num_samples(num_samples)
    if num_samples > n:
        raise ValueError(f"num_samples={num_samples} exceeds the {n} estimates given")
    return _summaries({k: _moments(v) for k, v in estimates.items()}, num_samples, exact)


def gradient_moments(
    estimator: str | Callable[..., dict[str, Tensor]],
    f: Callable[[Tensor], Tensor],
    dist: Distribution,
    num_samples: int,
    *,
    repeats: int = 1,
    exact: Exact = None,
    **options: Any,
) -> dict[str, GradientSummary]:
    r"""Run a gradient estimator ``repeats`` times and summarise the pooled estimates.

    Each run is one vectorised call ``estimator(f, dist, num_samples, **options)``; the runs'
    moments are pooled as they come (memory does not grow with ``repeats``). Stateful options,
    such as an :class:`~gradkit.baselines.ExponentialMovingAverage` baseline, carry their state
    from one run to the next.

    Args:
        estimator: a callable like :func:`gradkit.estimators.score_function`, or its name in
            ``gk.ESTIMATORS``.
        f: cost, as the estimator takes it.
        dist: the distribution.
        num_samples: samples per call.
        repeats: number of calls.
        exact: optional dict name -> exact gradient, to get bias and z-scores.
        **options: passed to the estimator (``baseline=``, ``coupling=``, ``plate=``,
            ``control_variate=``); a ``generator=`` is shared by the runs and advances from
            one to the next.

    Returns:
        dict name -> :class:`GradientSummary` with ``count = num_samples * repeats``.

    Raises:
        ValueError: for an unknown estimator name, fewer than 2 estimates in all, or a bad
            ``exact``; TypeError for a non-callable estimator or one that returns no dict.

    Example:
        >>> import torch, gradkit as gk
        >>> d = torch.distributions.Normal(torch.tensor(1.0), torch.tensor(1.0))
        >>> s = gk.diagnostics.gradient_moments("pathwise", lambda x: 3 * x, d, 4, repeats=2)
        >>> s["loc"].mean, s["loc"].variance, s["loc"].count
        (tensor(3.), tensor(0.), 8)
    """
    from gradkit.registry import ESTIMATORS

    if isinstance(estimator, str):
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)} or pass "
                "a callable"
            )
        estimator = ESTIMATORS[estimator]
    if not callable(estimator):
        raise TypeError(
            f"estimator must be a name in gk.ESTIMATORS or a callable like gk.score_function, "
            f"got {type(estimator).__name__}"
        )
    _checks.check_num_samples(num_samples)
    _checks.check_count("repeats", repeats)
    if num_samples * repeats < 2:
        raise ValueError(
            "gradient_moments needs at least 2 estimates in all to measure a variance, got "
            "num_samples=1 and repeats=1; raise either"
        )
    pooled: dict[str, _Moments] = {}
    for _ in range(repeats):
        run = _check_estimates(estimator(f, dist, num_samples, **options), "the estimator result")
        for name, values in run.items():
            moments = _moments(values)
            pooled[name] = _merge(pooled[name], moments) if name in pooled else moments
    return _summaries(pooled, num_samples, exact)


def gradient_variance(grads: Tensor | Mapping[str, Tensor]) -> Tensor:
    r"""Total variance of repeated gradient estimates: the sum of per-coordinate variances.

    .. math:: \sum_j \frac{1}{R-1} \sum_{r=1}^{R} (g_{rj} - \bar g_j)^2

    (the trace of the covariance matrix), for ``R`` repeated estimates ``g_r`` of one gradient,
    e.g. the gradient of an inference network's loss from :func:`repeated_gradients`.

    Args:
        grads: a tensor ``(R, *shape)``, or a dict of such tensors (summed over all of them).

    Returns:
        a 0-dim tensor.

    Raises:
        TypeError: for anything but a floating tensor or a dict of them.
        ValueError: for fewer than 2 repeats.

    Example:
        >>> import torch, gradkit as gk
        >>> gk.diagnostics.gradient_variance(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))
        tensor(2.)
    """
    parts = list(grads.values()) if isinstance(grads, Mapping) else [grads]
    if not parts or not all(isinstance(g, Tensor) and g.is_floating_point() for g in parts):
        raise TypeError(
            "grads must be a floating tensor (repeats, *shape) or a dict of them, got "
            f"{type(grads).__name__}"
        )
    if min(g.dim() for g in parts) < 1 or min(g.shape[0] for g in parts) < 2:
        raise ValueError(
            "gradient_variance needs at least 2 repeated estimates along dim 0, got shapes "
            f"{[tuple(g.shape) for g in parts]}"
        )
    # parts is not empty, so sum never returns its start value 0.
    return cast(Tensor, sum(g.detach().var(0).sum() for g in parts))


def repeated_gradients(
    loss_fn: Callable[[], Tensor], params: Iterable[Tensor], repeats: int
) -> Tensor:
    r"""Gradients of a stochastic loss over ``repeats`` fresh evaluations, flattened.

    Row :math:`r` is :math:`\nabla_\omega L_r` for the :math:`r`-th call of ``loss_fn`` (each
    call draws new samples), concatenated over ``params``; parameters the loss does not use
    get zeros. Feed the result to :func:`gradient_variance`. The ``.grad`` of ``params`` is
    left untouched.

    Args:
        loss_fn: a function of no arguments returning a scalar loss (a new estimate per call).
        params: the tensors to differentiate, e.g. ``encoder.parameters()``.
        repeats: number of calls ``R >= 1``.

    Returns:
        a tensor of shape ``(R, P)``, ``P`` the total number of parameter elements.

    Raises:
        ValueError: for no parameters, a bad ``repeats`` or a non-scalar loss.

    Example:
        >>> import torch, gradkit as gk
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> gk.diagnostics.repeated_gradients(lambda: (w**2).sum(), [w], 2)
        tensor([[2., 4.],
                [2., 4.]])
    """
    params = list(params)
    if not params or not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise ValueError("params must be a non-empty list of tensors that require grad")
    _checks.check_count("repeats", repeats)
    rows = []
    for _ in range(repeats):
        loss = loss_fn()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}; reduce it")
        grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                    for p, g in zip(params, grads, strict=True)
                ]
            )
        )
    return torch.stack(rows)


class CountingCost:
    r"""A cost function that counts its calls and the sample rows it is evaluated on.

    The price of a Monte Carlo gradient estimator is, first of all, how often it evaluates
    :math:`f`: once per sample for the score-function and pathwise estimators, and for the
    measure-valued estimator of a distribution with :math:`D` scalar parameters up to
    :math:`2D` more, fewer with coupling (Mohamed et al. 2020, ``mohamed2020monte``).
    Wrap :math:`f` in a ``CountingCost``, pass it to the estimator in its place, and read off

    .. math::
        \texttt{rows} = \sum_{\text{calls}} \frac{\texttt{x.numel()}}{\prod \texttt{shape}},

    the number of points, each of shape ``shape``, at which :math:`f` was evaluated, however
    the estimator batched them into calls. With ``shape = dist.batch_shape + dist.event_shape``
    a row is one draw from the whole distribution, and ``rows / num_samples`` after one call
    of an estimator is its number of evaluations of :math:`f` per sample. Counting happens in
    Python as the calls come, so do not call it inside ``torch.func.vmap`` (which hides the
    batch dimension); the values of :math:`f`, their device, dtype and autograd graph, pass
    through unchanged.

    Args:
        f: the cost, a callable from samples ``(*lead, *shape)`` to values.
        shape: the shape of one row, an int for a vector; ``()`` (the default) for scalar
            samples, where every element is a row.

    Attributes:
        calls: number of calls so far.
        rows: number of rows of shape ``shape`` seen so far.

    Raises:
        TypeError: if ``f`` is not callable, or (on a call) the input is not a tensor.
        ValueError: if ``shape`` has a negative or zero size, or (on a call) the input's
            trailing dimensions are not ``shape``.

    Example:
        >>> import torch, gradkit as gk
        >>> from torch.distributions import Independent, Normal
        >>> dist = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
        >>> cost = gk.diagnostics.CountingCost(lambda x: x.pow(2).sum(-1), dist.event_shape)
        >>> _ = gk.pathwise(cost, dist, 10)
        >>> cost.calls, cost.rows
        (1, 10)
        >>> _ = gk.measure_valued(cost, dist, 10)
        >>> cost.rows - 10  # 1 + 3 * 3 rows per sample with coupling
        100
    """

    def __init__(self, f: Callable[[Tensor], Any], shape: int | Sequence[int] = ()) -> None:
        if not callable(f):
            raise TypeError(f"f must be a callable cost function, got {type(f).__name__}")
        dims = (shape,) if isinstance(shape, int) else shape
        valid = isinstance(dims, Sequence) and not isinstance(dims, str)
        if not valid or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in dims
        ):
            raise ValueError(
                f"shape must be a positive int or a sequence of them, such as "
                f"dist.batch_shape + dist.event_shape, got {shape!r}"
            )
        self.f = f
        self.shape = torch.Size(dims)
        self._size = math.prod(self.shape)
        self.calls = 0
        self.rows = 0

    def __call__(self, x: Tensor) -> Any:
        """Evaluate ``f(x)``, adding one call and ``x.numel() / prod(shape)`` rows."""
        if not isinstance(x, Tensor):
            raise TypeError(f"CountingCost expects a tensor of samples, got {type(x).__name__}")
        k = len(self.shape)
        if x.dim() < k or x.shape[x.dim() - k :] != self.shape:
            raise ValueError(
                f"CountingCost was told that one row has shape {tuple(self.shape)}, but it got "
                f"samples of shape {tuple(x.shape)}; pass shape=dist.batch_shape + "
                "dist.event_shape"
            )
        self.calls += 1
        self.rows += x.numel() // self._size
        return self.f(x)

    def reset(self) -> None:
        """Set ``calls`` and ``rows`` back to zero."""
        self.calls = 0
        self.rows = 0

    def __repr__(self) -> str:
        return f"CountingCost(calls={self.calls}, rows={self.rows}, shape={tuple(self.shape)})"


def check_by_enumeration(
    estimators: Iterable[str],
    f: Callable[[Tensor], Tensor],
    dist: Distribution,
    num_samples: int,
    *,
    repeats: int = 1,
    plate: bool = False,
    k: float = 4.5,
    generator: torch.Generator | None = None,
) -> list[dict[str, Any]]:
    r"""Every named estimator against the exact gradient of a small discrete problem.

    The exact gradient comes from the ``enumerate`` estimator (every state summed); each
    estimator then runs through :func:`gradient_moments` (``repeats`` calls of
    ``num_samples``) and is summarised by the largest :math:`|z|` over parameter elements,
    whether it lies within ``k`` standard errors, and its per-sample variance summed over
    elements; an error within rounding of the exact value counts as :math:`z = 0` (an exact
    estimator has no standard error to divide by). An estimator that refuses the problem gets
    a record with its error message instead, so one table can show which estimator applies
    where.

    Args:
        estimators: names in ``gk.ESTIMATORS``.
        f: the cost.
        dist: a small discrete distribution (Bernoulli, Categorical, OneHotCategorical).
        num_samples: draws per call.
        repeats: calls per estimator (estimators that return one row per call need several).
        plate: declare one cost per batch element.
        k: the number of standard errors allowed.
        generator: a ``torch.Generator`` shared by the calls.

    Returns:
        A list with one dict per estimator, keyed ``estimator``, ``biased``, ``max_abs_z``,
        ``within``, ``variance`` and ``refused`` (the refusal's message, or ``""``).

    Example:
        >>> import torch, gradkit as gk
        >>> q = torch.distributions.Bernoulli(logits=torch.tensor([0.3, -0.5]))
        >>> rows = gk.diagnostics.check_by_enumeration(
        ...     ["disarm", "rebar"], lambda z: z.prod(-1), q, 2000,
        ...     generator=torch.Generator().manual_seed(0))
        >>> [(r["estimator"], r["within"]) for r in rows]
        [('disarm', True), ('rebar', True)]
    """
    from gradkit.registry import get_estimator

    exact = get_estimator("enumerate")(f, dist, 1, plate=plate)
    exact = {name: value[0] for name, value in exact.items()}
    records: list[dict[str, Any]] = []
    for name in estimators:
        est = get_estimator(name)
        record: dict[str, Any] = {"estimator": name, "biased": est.biased, "refused": ""}
        try:
            summary = gradient_moments(
                est,
                f,
                dist,
                num_samples,
                repeats=repeats,
                exact=exact,
                plate=plate,
                generator=generator,
            )
        except ValueError as error:
            record.update(max_abs_z=math.nan, within=False, variance=math.nan)
            record["refused"] = str(error).split(";")[0]
            records.append(record)
            continue
        worst = 0.0
        for s in summary.values():
            assert s.exact is not None and s.z_score is not None
            rounding = 100 * torch.finfo(s.mean.dtype).eps * (1 + s.exact.abs())
            z = torch.where(s.bias.abs() <= rounding, 0.0, s.z_score)  # type: ignore[union-attr]
            worst = max(worst, float(z.abs().max()))
        record["max_abs_z"] = worst
        record["within"] = all(s.within(k) for s in summary.values())
        record["variance"] = float(sum(s.variance.sum() for s in summary.values()))
        records.append(record)
    return records
