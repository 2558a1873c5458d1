r"""Exact Gaussian references for gradient estimators, by numerical quadrature.

For :math:`x \sim \mathcal N(\mu, \sigma^2)` and a scalar cost :math:`f`, the mean gradient
:math:`\partial_\theta \mathbb{E}[f(x)]`, :math:`\theta \in \{\mu, \sigma\}`, and the per-sample
variance of every estimator in gradkit are one- or two-dimensional integrals against smooth,
fast-decaying weights. This module evaluates them with Gauss–Legendre rules on a truncated
range, to many more digits than any Monte Carlo run can resolve, so they serve as the exact
curves of the survey's variance study (Mohamed, Rosca, Figurnov and Mnih 2020, §3) and as test
oracles.

The rules work in standard units :math:`z = (x-\mu)/\sigma` on :math:`[-L, L]` with
:math:`L = 12` by default: the Gaussian mass outside is :math:`4\cdot 10^{-33}`, so even costs
that grow polynomially lose nothing measurable. Oscillating costs such as :math:`\cos(kx)` need
a few nodes per period over :math:`[-L\sigma, L\sigma]`; the default 512 nodes resolve
:math:`k\sigma` up to about 40.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "STUDY_METHODS",
    "gaussian_expectation",
    "gaussian_gradient",
    "gaussian_gradient_variance",
    "normal_rule",
    "parameter_sweep",
    "plot_variance_study",
    "variance_study",
]

CostFn = Callable[[Tensor], Tensor]
HALF_WIDTH = 12.0
MAX_GRID = 4_000_000


@functools.lru_cache(maxsize=16)
def _leggauss(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights on [-1, 1] (cached: they cost O(n^2) to compute)."""
    return np.polynomial.legendre.leggauss(num_nodes)


def _legendre(
    num_nodes: int,
    low: float,
    high: float,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre nodes and weights for :math:`\\int_{low}^{high} h(t)\\,dt`."""
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 2:
        raise ValueError(f"num_nodes must be an int >= 2, got {num_nodes!r}; e.g. num_nodes=512")
    t, w = _leggauss(num_nodes)
    half = 0.5 * (high - low)
    nodes = torch.as_tensor(low + half * (t + 1.0), dtype=dtype, device=device)
    weights = torch.as_tensor(half * w, dtype=dtype, device=device)
    return nodes, weights


def normal_rule(
    num_nodes: int = 512,
    *,
    half_width: float = HALF_WIDTH,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Nodes and weights for expectations under the standard normal.

    .. math:: \sum_i w_i\, h(z_i) \approx \mathbb{E}_{z\sim\mathcal N(0,1)}[h(z)]
       = \int_{-L}^{L} \varphi(z)\, h(z)\, dz,

    a Gauss–Legendre rule on :math:`[-L, L]` with the density folded into the weights.

    Args:
        num_nodes: number of nodes (>= 2).
        half_width: :math:`L`, in standard deviations.
        dtype: floating dtype of the result.
        device: device of the result.

    Returns:
        ``(nodes, weights)``, each of shape ``(num_nodes,)``.

    Raises:
        ValueError: if ``num_nodes < 2``.

    Example:
        >>> import gradkit as gk
        >>> z, w = gk.quadrature.normal_rule(64)
        >>> round(float((w * z**4).sum()), 10)  # E[z^4] = 3
        3.0
    """
    z, w = _legendre(num_nodes, -half_width, half_width, dtype, device)
    return z, w * torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)


def _rayleigh_rule(
    n: int, dtype: torch.dtype, device: torch.device | None
) -> tuple[Tensor, Tensor]:
    """Nodes and weights for expectations under Rayleigh(1), density w exp(-w^2/2), w > 0."""
    r, w = _legendre(n, 0.0, HALF_WIDTH, dtype, device)
    return r, w * r * torch.exp(-0.5 * r**2)


def _maxwell_rule(n: int, dtype: torch.dtype, device: torch.device | None) -> tuple[Tensor, Tensor]:
    """Nodes and weights for the standard double-sided Maxwell, density z^2 phi(z)."""
    z, w = normal_rule(n, dtype=dtype, device=device)
    return z, w * z**2


def _as_scalar(value: float | Tensor, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar for the variance references, got shape "
                f"{tuple(value.shape)}; call once per coordinate"
            )
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_scale(sigma: float) -> None:
    if sigma <= 0:
        raise ValueError(f"scale must be positive, got {sigma}; pass the standard deviation")


def _evaluate(f: CostFn, x: Tensor) -> Tensor:
    """``f`` on points ``x`` of shape ``(M,)``; it must return one finite value per point."""
    if not callable(f):
        raise TypeError(f"f must be callable (points -> values), got {type(f).__name__}")
    fx = f(x)
    if not isinstance(fx, Tensor) or tuple(fx.shape) != tuple(x.shape):
        shape = tuple(fx.shape) if isinstance(fx, Tensor) else type(fx).__name__
        raise ValueError(
            f"f returned {shape} for points of shape {tuple(x.shape)}; the Gaussian references "
            "need a scalar cost applied elementwise (one value per point, same shape)"
        )
    fx = fx.to(x.dtype)
    if not bool(torch.isfinite(fx).all()):
        raise ValueError(
            "f returned NaN or inf at a quadrature node; the reference integrals need f finite "
            f"on [loc - {HALF_WIDTH:g} scale, loc + {HALF_WIDTH:g} scale]"
        )
    return fx


def gaussian_expectation(
    f: CostFn, loc: float | Tensor, scale: float | Tensor, *, num_nodes: int = 512
) -> Tensor:
    r"""Differentiable quadrature for :math:`\mathbb{E}[f(x)]` under a diagonal Gaussian.

    .. math:: \mathbb{E}[f(x)] \approx \sum_{i} w_i\, f(\mu + \sigma \odot z_i)

    over a tensor-product :func:`normal_rule` grid. Because the nodes are written as
    :math:`\mu + \sigma z_i`, autograd through the result gives the exact gradient with respect
    to ``loc`` and ``scale`` (to quadrature accuracy) when ``f`` is differentiable; use it as an
    oracle for estimators of other parameters (for example inside ``f``).

    Args:
        f: cost. For scalar ``loc``/``scale`` it maps points ``(M,)`` to values ``(M, *T)``;
            for vectors of length ``D`` it maps ``(M, D)`` to ``(M, *T)``.
        loc: mean :math:`\mu`, a number or a tensor of shape ``()`` or ``(D,)``.
        scale: standard deviation :math:`\sigma > 0`, same shape as ``loc``.
        num_nodes: nodes per dimension; the grid has ``num_nodes ** D`` points.

    Returns:
        the expectation, shape ``T``, in float64 for number inputs and in the dtype of the
        tensor inputs otherwise (computed in float64 either way), on their device.

    Raises:
        ValueError: for shapes that differ or have more than one dimension, a grid of more
            than 4 million points, a non-positive scale, or a wrong output shape from ``f``.
        TypeError: if ``f`` is not callable.

    Example:
        >>> import math, torch, gradkit as gk
        >>> mu = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> e = gk.quadrature.gaussian_expectation(torch.cos, mu, 1.0)  # cos(mu) e^{-1/2}
        >>> e.backward()
        >>> round(float(mu.grad), 8) == round(-math.sin(0.5) * math.exp(-0.5), 8)
        True
    """
    loc_t = loc if isinstance(loc, Tensor) else torch.as_tensor(loc, dtype=torch.float64)
    scale_t = scale if isinstance(scale, Tensor) else torch.as_tensor(scale, dtype=torch.float64)
    out_dtype = torch.promote_types(loc_t.dtype, scale_t.dtype)
    if not out_dtype.is_floating_point:
        out_dtype = torch.float64
    if loc_t.shape != scale_t.shape or loc_t.dim() > 1:
        raise ValueError(
            f"loc and scale must have the same shape, () or (D,), got {tuple(loc_t.shape)} and "
            f"{tuple(scale_t.shape)}"
        )
    if bool((scale_t.detach() <= 0).any()):
        raise ValueError("scale must be positive everywhere; pass standard deviations")
    if not callable(f):
        raise TypeError(f"f must be callable (points -> values), got {type(f).__name__}")
    z, w = normal_rule(num_nodes, device=loc_t.device)
    if loc_t.dim() == 0:
        x = loc_t.to(torch.float64) + scale_t.to(torch.float64) * z
        weights = w
    else:
        dim = loc_t.shape[0]
        if num_nodes**dim > MAX_GRID:
            raise ValueError(
                f"a tensor-product grid of {num_nodes}**{dim} points is too large; pass "
                f"num_nodes <= {int(MAX_GRID ** (1 / dim))} for {dim} dimensions"
            )
        grid = torch.cartesian_prod(*([z] * dim)).reshape(-1, dim)
        weights = torch.cartesian_prod(*([w] * dim)).reshape(-1, dim).prod(-1)
        x = loc_t.to(torch.float64) + scale_t.to(torch.float64) * grid
    fx = f(x)
    if not isinstance(fx, Tensor) or fx.shape[:1] != x.shape[:1]:
        shape = tuple(fx.shape) if isinstance(fx, Tensor) else type(fx).__name__
        raise ValueError(
            f"f returned {shape} for points of shape {tuple(x.shape)}; it must return one "
            "value (or tensor of values) per point, shape (M, *T)"
        )
    fx = fx.to(torch.float64)
    value = (weights.reshape(-1, *([1] * (fx.dim() - 1))) * fx).sum(0)
    return value.to(out_dtype)


def _score(z: Tensor, sigma: float, param: str) -> Tensor:
    """Score of N(mu, sigma^2) at x = mu + sigma z, for loc or scale."""
    return z / sigma if param == "loc" else (z**2 - 1.0) / sigma


def _check_param(param: str) -> None:
    if param not in ("loc", "scale"):
        raise ValueError(f"param must be 'loc' or 'scale' (torch's names), got {param!r}")


def gaussian_gradient(
    f: CostFn, loc: float | Tensor, scale: float | Tensor, *, param: str, num_nodes: int = 512
) -> float:
    r"""The exact gradient :math:`\partial_\theta \mathbb{E}_{\mathcal N(\mu,\sigma^2)}[f(x)]`.

    Computed in score form, which needs ``f`` only pointwise (it may be discontinuous, at a
    loss of accuracy: a jump limits the error to roughly the node spacing, not to rounding):

    .. math:: \partial_\mu \mathbb{E}[f] = \mathbb{E}\Big[f(x)\,\frac{z}{\sigma}\Big], \qquad
       \partial_\sigma \mathbb{E}[f] = \mathbb{E}\Big[f(x)\,\frac{z^2-1}{\sigma}\Big], \qquad
       z = \frac{x-\mu}{\sigma}.

    Args:
        f: scalar cost applied elementwise, points ``(M,)`` -> values ``(M,)``.
        loc: :math:`\mu` (a number or one-element tensor).
        scale: :math:`\sigma > 0`.
        param: ``"loc"`` or ``"scale"``.
        num_nodes: quadrature nodes.

    Returns:
        the gradient as a Python float.

    Raises:
        ValueError: for an unknown ``param``, non-scalar or non-finite ``loc``/``scale``, a
            non-positive ``scale``, or ``f`` returning the wrong shape or non-finite values.
        TypeError: if ``f`` is not callable.

    Example:
        >>> import gradkit as gk
        >>> round(gk.quadrature.gaussian_gradient(lambda x: x**2, 1.0, 2.0, param="scale"), 10)
        4.0
    """
    _check_param(param)
    mu, sigma = _as_scalar(loc, "loc"), _as_scalar(scale, "scale")
    _check_scale(sigma)
    z, w = normal_rule(num_nodes)
    return float((w * _evaluate(f, mu + sigma * z) * _score(z, sigma, param)).sum())


def _moments(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """First and second moments of ``values`` under a quadrature rule."""
    return (weights * values).sum(), (weights * values**2).sum()


def _score_function_moments(
    f: CostFn, mu: float, sigma: float, param: str, baseline: str | float | None, n: int
) -> tuple[Tensor, Tensor]:
    z, w = normal_rule(n)
    fx = _evaluate(f, mu + sigma * z)
    s = _score(z, sigma, param)
    b: float | Tensor
    if baseline is None:
        b = 0.0
    elif baseline == "optimal":
        b = (w * s**2 * fx).sum() / (w * s**2).sum()  # b* = E[s^2 f] / E[s^2]
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        b = float(baseline)
    else:
        raise ValueError(
            f"baseline must be None, 'optimal' or a number (a constant baseline), got {baseline!r}"
        )
    return _moments((fx - b) * s, w)


def _pathwise_moments(
    f: CostFn, mu: float, sigma: float, param: str, n: int
) -> tuple[Tensor, Tensor]:
    z, w = normal_rule(n)
    x = (mu + sigma * z).requires_grad_()
    with torch.enable_grad():
        fx = _evaluate(f, x)
        if not fx.requires_grad:
            raise ValueError(
                "f is not differentiable with autograd (its output does not depend on its "
                "input through torch operations); the pathwise estimator needs a "
                "differentiable f: write it with torch functions"
            )
        (df,) = torch.autograd.grad(fx.sum(), x)
    dx = torch.ones_like(z) if param == "loc" else z  # dx/dmu = 1, dx/dsigma = z
    return _moments(df.detach() * dx, w)


def _measure_valued_moments(
    f: CostFn, mu: float, sigma: float, param: str, coupling: bool, n: int
) -> tuple[Tensor, Tensor]:
    if param == "loc":
        # d/dmu N = c (law of mu + sigma W) - c (law of mu - sigma W'), W, W' ~ Rayleigh(1)
        c = 1.0 / (sigma * math.sqrt(2 * math.pi))
        r, v = _rayleigh_rule(n, torch.float64, None)
        plus, minus = _evaluate(f, mu + sigma * r), _evaluate(f, mu - sigma * r)
        if coupling:  # W' = W
            return _moments(c * (plus - minus), v)
        m1p, m2p = _moments(plus, v)
        m1m, m2m = _moments(minus, v)
        return c * (m1p - m1m), c**2 * (m2p + m2m - 2 * m1p * m1m)
    # d/dsigma N = (1/sigma) (Maxwell(mu, sigma) - N(mu, sigma)); coupled: x- = mu + sigma u m
    m, v = _maxwell_rule(n, torch.float64, None)
    plus = _evaluate(f, mu + sigma * m)
    if coupling:
        u, vu = _legendre(n, 0.0, 1.0, torch.float64, None)
        minus = _evaluate(f, (mu + sigma * m[:, None] * u[None, :]).reshape(-1)).reshape(n, n)
        est = (plus[:, None] - minus) / sigma
        weights = v[:, None] * vu[None, :]
        return (weights * est).sum(), (weights * est**2).sum()
    z, w = normal_rule(n)
    minus = _evaluate(f, mu + sigma * z)
    m1p, m2p = _moments(plus, v)
    m1m, m2m = _moments(minus, w)
    return (m1p - m1m) / sigma, (m2p + m2m - 2 * m1p * m1m) / sigma**2


def gaussian_gradient_variance(
    f: CostFn,
    loc: float | Tensor,
    scale: float | Tensor,
    *,
    estimator: str,
    param: str,
    baseline: str | float | None = None,
    coupling: bool = True,
    num_nodes: int = 512,
) -> float:
    r"""Exact per-sample variance of a gradient estimator for a Gaussian, by quadrature.

    For :math:`x = \mu + \sigma z \sim \mathcal N(\mu, \sigma^2)`, :math:`\theta \in
    \{\mu,\sigma\}` and exact gradient :math:`g = \partial_\theta \mathbb{E}[f]`:

    * score function: :math:`\mathbb{E}[(f(x)-b)^2 s_\theta^2] - g^2` with the score
      :math:`s_\mu = z/\sigma`, :math:`s_\sigma = (z^2-1)/\sigma`, and :math:`b = 0`, a constant,
      or the optimal constant :math:`b^\star = \mathbb{E}[s_\theta^2 f]/\mathbb{E}[s_\theta^2]`
      (Greensmith et al. 2004);
    * pathwise: :math:`\mathbb{E}[(f'(x)\,\partial_\theta x)^2] - g^2` with
      :math:`\partial_\mu x = 1`, :math:`\partial_\sigma x = z`;
    * measure-valued, location: :math:`c\,(f(\mu+\sigma W) - f(\mu-\sigma W'))`,
      :math:`c = 1/(\sigma\sqrt{2\pi})`, :math:`W, W' \sim \mathrm{Rayleigh}(1)`, equal when
      coupled (a 1-D integral);
    * measure-valued, scale: :math:`\sigma^{-1}(f(\mu+\sigma m) - f(\mu+\sigma y))` with
      :math:`m` standard double-sided Maxwell and :math:`y = u m`, :math:`u \sim U(0,1)`, when
      coupled (a 2-D integral), else :math:`y \sim \mathcal N(0,1)` independent
      (Mohamed et al. 2020, §6; Heidergott et al. 2008).

    The variance is that of *one* sample's estimate; an average of :math:`S` independent
    samples has variance :math:`1/S` of it.

    Args:
        f: scalar cost applied elementwise, points ``(M,)`` -> values ``(M,)``; it must be
            differentiable with autograd for ``estimator="pathwise"``.
        loc: :math:`\mu` (a number or one-element tensor).
        scale: :math:`\sigma > 0`.
        estimator: ``"score_function"``, ``"pathwise"`` or ``"measure_valued"``.
        param: ``"loc"`` or ``"scale"``.
        baseline: score function only: ``None``, a number, or ``"optimal"``.
        coupling: measure-valued only: share randomness between the two parts.
        num_nodes: nodes per dimension of each rule.

    Returns:
        the per-sample variance as a Python float.

    Raises:
        ValueError: for an unknown estimator or parameter, an option given to an estimator
            that does not take it, a bad ``loc``/``scale``, or a non-differentiable ``f``
            with ``estimator="pathwise"``.

    Example:
        >>> import gradkit as gk
        >>> v = gk.quadrature.gaussian_gradient_variance(
        ...     lambda x: (x - 2.0) ** 2, 1.0, 1.0, estimator="pathwise", param="loc")
        >>> round(v, 10)  # 2 (x - k) - 2 (mu - k) = 2 sigma z: variance 4 sigma^2
        4.0
    """
    _check_param(param)
    mu, sigma = _as_scalar(loc, "loc"), _as_scalar(scale, "scale")
    _check_scale(sigma)
    if estimator not in ("score_function", "pathwise", "measure_valued"):
        raise ValueError(
            f"unknown estimator {estimator!r}; choose 'score_function', 'pathwise' or "
            "'measure_valued'"
        )
    if baseline is not None and estimator != "score_function":
        raise ValueError(f"baseline applies to estimator='score_function' only, not {estimator!r}")
    if not coupling and estimator != "measure_valued":
        raise ValueError(f"coupling applies to estimator='measure_valued' only, not {estimator!r}")
    if estimator == "score_function":
        m1, m2 = _score_function_moments(f, mu, sigma, param, baseline, num_nodes)
    elif estimator == "pathwise":
        m1, m2 = _pathwise_moments(f, mu, sigma, param, num_nodes)
    else:
        m1, m2 = _measure_valued_moments(f, mu, sigma, param, coupling, num_nodes)
    return float((m2 - m1**2).clamp_min(0.0))


#: Methods of the survey's variance study (Mohamed et al. 2020, section 3), as display name
#: -> (estimator, options of :func:`gaussian_gradient_variance`). The Monte Carlo side maps
#: ``baseline="optimal"`` to the library's leave-one-out ``OptimalConstant`` baseline.
STUDY_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "score function": ("score_function", {}),
    "score function + optimal baseline": ("score_function", {"baseline": "optimal"}),
    "pathwise": ("pathwise", {}),
    "measure-valued (coupled)": ("measure_valued", {}),
}


def _library_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options of the quadrature reference -> options of the library's estimator."""
    from gradkit.baselines import OptimalConstant

    out = dict(options)
    if out.get("baseline") == "optimal":
        out["baseline"] = OptimalConstant()
    return out


def _sample_variance(values: Tensor) -> tuple[Tensor, Tensor]:
    """Sample variance (the second central moment) along dim 0 and its standard error."""
    from gradkit.diagnostics import variance_standard_error

    values = values.to(torch.float64)
    return (values - values.mean(0)).pow(2).mean(0), variance_standard_error(values)


def variance_study(
    costs: Mapping[str, Callable[[float], CostFn]],
    ks: Mapping[str, Sequence[float]],
    loc: float = 1.0,
    scale: float = 1.0,
    *,
    num_samples: int = 0,
    methods: Mapping[str, tuple[str, Mapping[str, Any]]] = STUDY_METHODS,
    num_nodes: int = 512,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    r"""Per-sample gradient variances for families of costs :math:`f_k`, exact and sampled.

    For every cost family, value of :math:`k`, method and parameter :math:`\theta \in \{\mu,
    \sigma\}` of :math:`\mathcal N(\mu, \sigma^2)`, records the exact gradient
    (:func:`gaussian_gradient`) and the exact per-sample variance
    (:func:`gaussian_gradient_variance`); with ``num_samples > 0`` also the variance of
    ``num_samples`` per-sample estimates from gradkit's own estimator (float64), with its
    standard error :math:`\sqrt{(m_4 - v^2)/n}`, so the two can be compared (Mohamed et al.
    2020, §3). The library's optimal baseline estimates :math:`b^\star` leave-one-out from the
    other samples, so its sampled variance exceeds the exact one by a relative
    :math:`O(1/S)`.

    Args:
        costs: name -> factory ``k -> f``, ``f`` a scalar cost applied elementwise.
        ks: name -> the values of ``k`` for that family.
        loc: :math:`\mu`.
        scale: :math:`\sigma`.
        num_samples: Monte Carlo samples per point (0: exact values only).
        methods: display name -> (estimator, options), as :data:`STUDY_METHODS`.
        num_nodes: quadrature nodes.
        device: device of the Monte Carlo runs.

    Returns:
        one dict per (cost, k, method, param) with keys ``cost``, ``k``, ``method``,
        ``param``, ``gradient``, ``exact`` and, when sampled, ``mc`` and ``mc_se``.

    Raises:
        ValueError: if ``ks`` lacks a cost family, or as :func:`gaussian_gradient_variance`.

    Example:
        >>> import gradkit as gk
        >>> rows = gk.quadrature.variance_study({"x": lambda k: lambda x: x - k}, {"x": [0.0]},
        ...                                     methods={"pathwise": ("pathwise", {})})
        >>> [(r["param"], round(r["exact"], 10)) for r in rows]  # d/dmu (x-k) = 1, d/dsigma = z
        [('loc', 0.0), ('scale', 1.0)]
    """
    from gradkit.registry import ESTIMATORS

    missing = sorted(set(costs) - set(ks))
    if missing:
        raise ValueError(f"ks has no values of k for cost(s) {missing}; give ks[name] = [...]")
    mu, sigma = _as_scalar(loc, "loc"), _as_scalar(scale, "scale")
    _check_scale(sigma)
    dist = torch.distributions.Normal(
        torch.tensor(mu, dtype=torch.float64, device=device),
        torch.tensor(sigma, dtype=torch.float64, device=device),
    )
    records = []
    for cost, factory in costs.items():
        for k in ks[cost]:
            f = factory(float(k))
            gradients = {
                p: gaussian_gradient(f, mu, sigma, param=p, num_nodes=num_nodes)
                for p in ("loc", "scale")
            }
            for method, (estimator, options) in methods.items():
                sampled = (
                    ESTIMATORS[estimator](f, dist, num_samples, **_library_options(options))
                    if num_samples > 0
                    else {}
                )
                for param in ("loc", "scale"):
                    row = {
                        "cost": cost,
                        "k": float(k),
                        "method": method,
                        "param": param,
                        "gradient": gradients[param],
                        "exact": gaussian_gradient_variance(
                            f,
                            mu,
                            sigma,
                            estimator=estimator,
                            param=param,
                            num_nodes=num_nodes,
                            **options,
                        ),
                    }
                    if sampled:
                        mc, mc_se = _sample_variance(sampled[param].reshape(-1))
                        row["mc"], row["mc_se"] = float(mc), float(mc_se)
                    records.append(row)
    return records


def parameter_sweep(
    costs: Mapping[str, CostFn],
    vary: str,
    values: Sequence[float] | Tensor,
    loc: float = 0.0,
    scale: float = 1.0,
    *,
    num_samples: int = 0,
    methods: Mapping[str, tuple[str, Mapping[str, Any]]] = STUDY_METHODS,
    num_nodes: int = 512,
    device: torch.device | str | None = None,
) -> list[dict[str, Any]]:
    r"""Per-sample gradient variances along :math:`\mu` or :math:`\sigma`, exact and sampled.

    The companion of :func:`variance_study`, which varies the cost: here the cost is fixed and
    one parameter of :math:`\mathcal N(\mu, \sigma^2)` moves over ``values`` while the other
    stays at ``loc`` or ``scale``. For every cost, point, method and parameter
    :math:`\theta \in \{\mu, \sigma\}` it records the exact gradient
    (:func:`gaussian_gradient`) and the exact per-sample variance
    (:func:`gaussian_gradient_variance`). With ``num_samples > 0`` it also runs gradkit's own
    estimator once per cost and method on all points together: a batch of Gaussians declared a
    plate (each point's cost depends on its own sample only), ``num_samples`` draws each in
    float64, and records the sampled variance with its standard error
    (:func:`gradkit.diagnostics.variance_standard_error`) and the z-score of the sampled mean
    gradient against the exact one (:func:`gradkit.diagnostics.z_score`).

    Args:
        costs: name -> scalar cost ``f`` applied elementwise.
        vary: ``"loc"`` or ``"scale"``, the parameter that moves.
        values: its values (``scale`` values must be positive).
        loc: :math:`\mu` where it is held fixed.
        scale: :math:`\sigma` where it is held fixed.
        num_samples: Monte Carlo samples per point (0: exact values only).
        methods: display name -> (estimator, options), as :data:`STUDY_METHODS`.
        num_nodes: quadrature nodes.
        device: device of the Monte Carlo runs.

    Returns:
        one dict per (cost, point, method, param) with keys ``cost``, ``method``, ``param``,
        ``loc``, ``scale``, ``value`` (the moving parameter's value), ``gradient``, ``exact``
        and, when sampled, ``mc``, ``mc_se``, ``mean`` and ``z``.

    Raises:
        ValueError: for a ``vary`` other than ``"loc"`` or ``"scale"``, no values, a
            non-positive scale, or as :func:`gaussian_gradient_variance`.

    Example:
        >>> import gradkit as gk
        >>> rows = gk.quadrature.parameter_sweep({"x^2": lambda x: x**2}, "loc", [0.0, 1.0],
        ...                                      methods={"pathwise": ("pathwise", {})})
        >>> [(r["value"], r["param"], round(r["exact"], 10)) for r in rows]  # Var 2x = 4
        [(0.0, 'loc', 4.0), (0.0, 'scale', 8.0), (1.0, 'loc', 4.0), (1.0, 'scale', 12.0)]
    """
    from gradkit.diagnostics import z_score
    from gradkit.registry import ESTIMATORS

    if vary not in ("loc", "scale"):
        raise ValueError(f"vary must be 'loc' or 'scale', got {vary!r}")
    points = [
        _as_scalar(v, vary) for v in (values.tolist() if isinstance(values, Tensor) else values)
    ]
    if not points:
        raise ValueError("values is empty; give the points of the sweep")
    mu, sigma = _as_scalar(loc, "loc"), _as_scalar(scale, "scale")
    grid = [(v, sigma) if vary == "loc" else (mu, v) for v in points]
    for _, s in grid:
        _check_scale(s)
    batch = torch.tensor(grid, dtype=torch.float64, device=device)
    dist = torch.distributions.Normal(batch[:, 0], batch[:, 1])
    records = []
    for cost, f in costs.items():
        gradients = {
            p: [gaussian_gradient(f, m, s, param=p, num_nodes=num_nodes) for m, s in grid]
            for p in ("loc", "scale")
        }
        for method, (estimator, options) in methods.items():
            sampled: dict[str, dict[str, list[float]]] = {}
            if num_samples > 0:
                rows = ESTIMATORS[estimator](
                    f, dist, num_samples, plate=True, **_library_options(options)
                )
                for p in ("loc", "scale"):
                    mc, mc_se = _sample_variance(rows[p])
                    exact_gradient = torch.tensor(gradients[p], dtype=torch.float64, device=device)
                    sampled[p] = {
                        "mc": mc.tolist(),
                        "mc_se": mc_se.tolist(),
                        "mean": rows[p].mean(0).tolist(),
                        "z": z_score(rows[p], exact_gradient).tolist(),
                    }
            for i, (m, s) in enumerate(grid):
                for p in ("loc", "scale"):
                    row = {
                        "cost": cost,
                        "method": method,
                        "param": p,
                        "loc": m,
                        "scale": s,
                        "value": points[i],
                        "gradient": gradients[p][i],
                        "exact": gaussian_gradient_variance(
                            f, m, s, estimator=estimator, param=p, num_nodes=num_nodes, **options
                        ),
                    }
                    row.update({key: column[i] for key, column in sampled.get(p, {}).items()})
                    records.append(row)
    return records


def plot_variance_study(
    exact: Sequence[Mapping[str, Any]],
    sampled: Sequence[Mapping[str, Any]] = (),
    *,
    x: str = "k",
    xlabel: str = "$k$",
    xscale: str = "linear",
    title: str = "$f(x) = {cost}$",
) -> Any:
    r"""The variance study as a figure: rows :math:`\partial_\mu`, :math:`\partial_\sigma`;
    one column per cost family; exact curves as lines, sampled variances as points with
    two-standard-error bars; log scale.

    Args:
        exact: records from :func:`variance_study` or :func:`parameter_sweep` (typically a
            dense grid).
        sampled: records with ``mc`` and ``mc_se`` (typically a coarse grid).
        x: the records' key on the horizontal axis (``"value"`` for a parameter sweep).
        xlabel: its label.
        xscale: its matplotlib scale (``"log"`` for a sweep of :math:`\sigma`).
        title: each column's title; ``{cost}`` in it is replaced by the cost's name.

    Returns:
        the matplotlib figure.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import gradkit as gk
        >>> rows = gk.quadrature.variance_study({"x^2": lambda k: lambda x: k * x**2},
        ...                                     {"x^2": [1.0, 2.0]})
        >>> fig = gk.quadrature.plot_variance_study(rows)
        >>> len(fig.axes)
        2
    """
    import matplotlib.pyplot as plt

    costs = list(dict.fromkeys(r["cost"] for r in exact))
    methods = list(dict.fromkeys(r["method"] for r in exact))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(
        2, len(costs), figsize=(4.2 * len(costs), 6.4), squeeze=False, sharex="col"
    )
    for col, cost in enumerate(costs):
        for row, param in enumerate(("loc", "scale")):
            ax = axes[row, col]
            for method in methods:
                pick = [
                    r
                    for r in exact
                    if (r["cost"], r["param"], r["method"]) == (cost, param, method)
                ]
                ax.plot(
                    [r[x] for r in pick],
                    [r["exact"] for r in pick],
                    color=colors[method],
                    label=method,
                )
                dots = [
                    r
                    for r in sampled
                    if (r["cost"], r["param"], r["method"]) == (cost, param, method)
                ]
                if dots:
                    ax.errorbar(
                        [r[x] for r in dots],
                        [r["mc"] for r in dots],
                        yerr=[2 * r["mc_se"] for r in dots],
                        fmt="o",
                        ms=3.5,
                        color=colors[method],
                        capsize=2,
                    )
            ax.set(yscale="log", xscale=xscale)
            values = [r["exact"] for r in exact if (r["cost"], r["param"]) == (cost, param)]
            top = max(values)
            if top > 0:  # a variance that touches zero would stretch the axis to 1e-30
                ax.set_ylim(bottom=0.5 * max(min(v for v in values if v > 0), 1e-6 * top))
            symbol = r"\mu" if param == "loc" else r"\sigma"
            ax.set_ylabel(rf"variance of $\partial_{symbol}$ estimate")
            if row == 0:
                ax.set_title(title.replace("{cost}", cost))
            else:
                ax.set_xlabel(xlabel)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
