r"""Reparameterisation: location-scale, implicit (inverse-CDF) and relaxed discrete samples.

A reparameterisation writes a sample as a differentiable function of the parameters,
:math:`x = g(\epsilon; \theta)` with :math:`\epsilon` drawn from a fixed distribution, so that
:math:`\nabla_\theta \mathbb{E}_{p(x;\theta)}[f(x)] = \mathbb{E}_{\epsilon}[\nabla_\theta
f(g(\epsilon;\theta))]` (Kingma and Welling 2014; Rezende et al. 2014). This module holds the
pieces that ``torch.distributions`` does not provide:

* **Implicit reparameterisation** (Figurnov, Mohamed and Mnih 2018). For a scalar
  distribution with a CDF :math:`F(x;\theta)`, the inverse-CDF path
  :math:`x = F^{-1}(u;\theta)` has the derivative
  :math:`\partial x/\partial\theta = -\,(\partial F(x;\theta)/\partial\theta)\,/\,p(x;\theta)`,
  which needs only the CDF's gradient at the sample, never the inverse CDF itself.
  :func:`implicit_rsample` returns samples that carry that gradient, :func:`implicit_derivative`
  returns it per element, and :func:`implicit_pathwise` is the pathwise estimator built on it.
  The CDF comes from a registry (:func:`register_cdf`, filled here for ``Gamma`` and ``Beta``,
  whose torch CDFs are missing or not differentiable in the concentrations) or from the
  distribution's own ``cdf``.
* **The Gumbel-max trick and its relaxation** (Jang, Gu and Poole 2017; Maddison, Mnih and Teh
  2017): :func:`gumbel_max` samples a categorical variable exactly,
  :func:`gumbel_softmax_sample` draws its Concrete relaxation and :func:`gumbel_softmax` is the
  (biased) relaxed pathwise gradient estimator;
  :func:`categorical_gradient` is the exact gradient by enumeration, and
  :func:`relaxation_study` measures the relaxation's bias and variance against it, temperature
  by temperature.

Exact means and variances of the Gaussian score-function and pathwise estimators are in
:mod:`gradkit.quadrature`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributions import (
    Bernoulli,
    Beta,
    Categorical,
    Distribution,
    Gamma,
    OneHotCategorical,
)

from gradkit import _checks
from gradkit._engine import gradients, resolve
from gradkit.distributions import base_distribution
from gradkit.estimators import PathwiseEstimator
from gradkit.registry import ESTIMATORS, Problem, register_estimator

__all__ = [
    "GumbelSoftmax",
    "ImplicitPathwise",
    "StraightThroughGumbel",
    "beta_cdf",
    "categorical_gradient",
    "differentiable_cdf",
    "gamma_cdf",
    "gumbel_max",
    "gumbel_softmax",
    "gumbel_softmax_sample",
    "implicit_derivative",
    "implicit_pathwise",
    "implicit_rsample",
    "register_cdf",
    "relaxation_study",
]

CdfFn = Callable[[Distribution, Tensor], Tensor]
_D = TypeVar("_D", bound=Distribution)
CostFn = Callable[[Tensor], Tensor]
_CDFS: dict[type, CdfFn] = {}


def _work_dtype(t: Tensor) -> torch.dtype:
    """float64 for the special-function series (MPS has no float64: stay in float32 there)."""
    return torch.float32 if t.device.type == "mps" else torch.float64


# --------------------------------------------------------------------------------------------
# Differentiable CDFs
# --------------------------------------------------------------------------------------------

_CPU_BLOCK = 2048  # samples per block of series terms on CPU: keeps the working set in cache


def _blockwise(series: Callable[..., tuple[Tensor, ...]], *args: Tensor) -> tuple[Tensor, ...]:
    """Evaluate an elementwise series on same-shaped ``args``, in cache-sized blocks on CPU.

    The series are memory-bound (one row of terms per element); on CPU, blocks of
    ``_CPU_BLOCK`` elements run several times faster than one large tensor. Elsewhere (GPU)
    everything is one batch.
    """
    shape = args[0].shape
    flat = [t.reshape(-1) for t in args]
    if flat[0].device.type != "cpu" or flat[0].numel() <= _CPU_BLOCK:
        return tuple(out.reshape(shape) for out in series(*flat))
    blocks = zip(*(t.split(_CPU_BLOCK) for t in flat), strict=True)
    parts = [series(*block) for block in blocks]
    return tuple(torch.cat(outs).reshape(shape) for outs in zip(*parts, strict=True))


def _gammainc_series(a: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`P(a, z)` and :math:`\partial P(a, z)/\partial a` from the regularised gamma series.

    :math:`P(a,z) = \sum_{n\ge0} T_n`, :math:`T_n = e^{-z} z^{a+n}/\Gamma(a+n+1)`, so
    :math:`\partial_a P = \sum_n T_n\,(\log z - \psi(a+n+1))`. The terms are shaped like a
    Poisson(z) mass in :math:`a+n`: only a window of :math:`20\sqrt z + 41` terms from
    :math:`n_0 = \max(0, z - a - 10\sqrt z)` matters (the rest is below :math:`e^{-50}` of the
    peak). Inside the window the recurrences :math:`T_{n} = T_{n-1}\, z/(a+n)` and
    :math:`\psi(k+1) = \psi(k) + 1/k` replace a log-gamma and a digamma per term. Every term is
    positive and bounded by 1, so both sums are accurate to a few float64 ulps in absolute
    terms, with no cancellation against 1.
    """
    z = z.clamp_min(torch.finfo(z.dtype).tiny)
    spread = z.sqrt()
    k0 = a + (z - a - 10.0 * spread).clamp_min(0.0).floor()  # a + n_0
    width = math.ceil(20.0 * float(spread.max()) + 41.0) if z.numel() else 1
    k = k0.unsqueeze(-1) + torch.arange(1, width, dtype=z.dtype, device=z.device)
    log_z = z.log()
    # Column 0 holds T_{n_0} (resp. psi(a + n_0 + 1)); the rest hold the ratios z/k (resp. the
    # increments 1/k), so one cumprod (cumsum) gives every term (digamma). Past the first term
    # nothing underflows: the window starts at most e^50 below the peak, and the peak is <= 1.
    terms = torch.empty(*k0.shape, width, dtype=z.dtype, device=z.device)
    terms[..., 0] = torch.exp(k0 * log_z - z - torch.lgamma(k0 + 1.0))
    torch.div(z.unsqueeze(-1), k, out=terms[..., 1:])
    terms = terms.cumprod(-1)
    psi = torch.empty_like(terms)
    psi[..., 0] = torch.digamma(k0 + 1.0)
    torch.reciprocal(k, out=psi[..., 1:])
    coef = torch.sub(log_z.unsqueeze(-1), psi.cumsum_(-1), out=psi)
    return terms.sum(-1), (terms * coef).sum(-1)


class _RegularizedGammaP(torch.autograd.Function):
    """:math:`P(a, z)` with gradients in both arguments (torch's ``gammainc`` has none in a)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, z: Tensor) -> Tensor:
        work = _work_dtype(z)
        aw, zw = a.to(work), z.to(work)
        value, d_a = _blockwise(_gammainc_series, aw, zw)
        density = torch.exp(torch.xlogy(aw - 1.0, zw) - zw - torch.lgamma(aw))
        ctx.save_for_backward(d_a.to(z.dtype), density.to(z.dtype))
        return value.to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        d_a, density = ctx.saved_tensors
        return grad * d_a, grad * density


def gamma_cdf(value: Tensor, concentration: Tensor | float, rate: Tensor | float = 1.0) -> Tensor:
    r"""The Gamma CDF, differentiable in the value, the concentration and the rate.

    .. math::
        F(x; \alpha, \beta) = P(\alpha, \beta x)
        = \frac{1}{\Gamma(\alpha)} \int_0^{\beta x} t^{\alpha-1} e^{-t}\, dt .

    Value and derivative come from the series :math:`P(\alpha, z) = \sum_{n\ge0} e^{-z}
    z^{\alpha+n}/\Gamma(\alpha+n+1)` at :math:`z = \beta x`, differentiated term by term:
    :math:`\partial_\alpha P = \sum_{n\ge0} e^{-z} z^{\alpha+n} (\log z - \psi(\alpha+n+1))
    / \Gamma(\alpha+n+1)` (torch's ``gammainc`` has no derivative in :math:`\alpha`), summed in
    float64 over a window of :math:`20\sqrt z + 41` terms (cost and memory grow like
    :math:`\sqrt z`).
    Used by :func:`implicit_rsample` for ``Gamma`` (and ``Chi2``) samples (Figurnov et al. 2018).

    Args:
        value: points :math:`x`, any shape; negative values give 0.
        concentration: :math:`\alpha > 0`, broadcastable against ``value``.
        rate: :math:`\beta > 0`, broadcastable against ``value``.

    Returns:
        :math:`F(x)` with the broadcast shape, in the dtype and on the device of ``value``.
        Differentiable once (the backward pass is not itself differentiable).

    Example:
        >>> import torch, gradkit as gk
        >>> a = torch.tensor(1.0, requires_grad=True)  # Exponential(1): F = 1 - e^{-x}
        >>> F = gk.reparam.gamma_cdf(torch.tensor(2.0), a)
        >>> round(F.item(), 6), round(1 - torch.exp(torch.tensor(-2.0)).item(), 6)
        (0.864665, 0.864665)
        >>> F.backward(); round(a.grad.item(), 4)  # finite differences of scipy's gammainc: -0.2208
        -0.2208
    """
    value = torch.as_tensor(value)
    concentration = torch.as_tensor(concentration, dtype=value.dtype, device=value.device)
    rate = torch.as_tensor(rate, dtype=value.dtype, device=value.device)
    value, concentration, rate = torch.broadcast_tensors(value, concentration, rate)
    z = (rate * value).clamp_min(0.0)
    return _RegularizedGammaP.apply(concentration, z)


def _beta_series(x: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r""":math:`I_x(a,b)` and its derivatives in ``a`` and ``b`` from the hypergeometric series.

    :math:`I_x(a,b) = \sum_{n\ge0} T_n`, :math:`T_n = x^{a+n}(1-x)^b\,\Gamma(a+b+n)
    /(\Gamma(a+1+n)\Gamma(b))`, for :math:`x \le 1/2` (the ratio of terms tends to
    :math:`x`, so 60 terms past the peak reach 1e-18). The peak is near
    :math:`n^* = (x(a+b-1)-a)/(1-x)` with spread :math:`\sqrt{(a+b)x}/(1-x)`. Term by term,
    :math:`\partial_a \log T_n = \log x + \psi(a+b+n) - \psi(a+1+n)` and
    :math:`\partial_b \log T_n = \log(1-x) + \psi(a+b+n) - \psi(b)`; the terms and the
    digammas follow from :math:`T_n = T_{n-1}\,x(a+b+n-1)/(a+n)` (summed in logs, so no
    term underflows on the way to the peak) and :math:`\psi(k+1) = \psi(k) + 1/k`.
    """
    x = x.clamp_min(torch.finfo(x.dtype).tiny)
    peak = ((x * (a + b - 1.0) - a) / (1.0 - x)).clamp_min(0.0)
    spread = ((a + b) * x).sqrt() / (1.0 - x)
    width = math.ceil(float((peak + 10.0 * spread).max()) + 60.0) if x.numel() else 1
    n = torch.arange(1, width, dtype=x.dtype, device=x.device)
    x_, a_, b_ = x.unsqueeze(-1), a.unsqueeze(-1), b.unsqueeze(-1)
    ab = a_ + b_ + n - 1.0  # a + b + n - 1 for n >= 1
    an = a_ + n
    log_x, log_1mx = x.log(), torch.log1p(-x)
    log_t0 = a * log_x + b * log_1mx + torch.lgamma(a + b) - torch.lgamma(a + 1.0) - torch.lgamma(b)

    def prepend(first: Tensor, rest: Tensor) -> Tensor:
        return torch.cat([first.unsqueeze(-1).expand(*rest.shape[:-1], 1), rest], -1)

    log_terms = log_t0.unsqueeze(-1) + prepend(
        torch.zeros_like(x), torch.cumsum(torch.log(x_ * ab / an), -1)
    )
    zero = torch.zeros_like(x)
    sum_ab = prepend(zero, torch.cumsum(ab.reciprocal(), -1))  # psi(a+b+n) - psi(a+b)
    sum_a = prepend(zero, torch.cumsum(an.reciprocal(), -1))  # psi(a+1+n) - psi(a+1)
    psi_ab = torch.digamma(a + b).unsqueeze(-1) + sum_ab
    terms = log_terms.exp()
    coef_a = log_x.unsqueeze(-1) + psi_ab - torch.digamma(a + 1.0).unsqueeze(-1) - sum_a
    coef_b = log_1mx.unsqueeze(-1) + psi_ab - torch.digamma(b).unsqueeze(-1)
    return terms.sum(-1), (terms * coef_a).sum(-1), (terms * coef_b).sum(-1)


class _RegularizedBeta(torch.autograd.Function):
    """:math:`I_x(a, b)` with gradients in all three arguments."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        work = _work_dtype(x)
        xw, aw, bw = x.to(work), a.to(work), b.to(work)
        # I_x(a, b) = 1 - I_{1-x}(b, a): sum the series where it converges fast (argument <= 1/2).
        flip = xw > 0.5
        s, ds_first, ds_second = _blockwise(
            _beta_series,
            torch.where(flip, 1.0 - xw, xw),
            torch.where(flip, bw, aw),
            torch.where(flip, aw, bw),
        )
        value = torch.where(flip, 1.0 - s, s)
        d_a = torch.where(flip, -ds_second, ds_first)
        d_b = torch.where(flip, -ds_first, ds_second)
        log_density = (
            torch.xlogy(aw - 1.0, xw)
            + torch.xlogy(bw - 1.0, 1.0 - xw)
            - (torch.lgamma(aw) + torch.lgamma(bw) - torch.lgamma(aw + bw))
        )
        ctx.save_for_backward(log_density.exp().to(x.dtype), d_a.to(x.dtype), d_b.to(x.dtype))
        return value.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        density, d_a, d_b = ctx.saved_tensors
        return grad * density, grad * d_a, grad * d_b


def beta_cdf(
    value: Tensor, concentration1: Tensor | float, concentration0: Tensor | float
) -> Tensor:
    r"""The Beta CDF (regularised incomplete beta function), differentiable in all arguments.

    .. math::
        I_x(a, b) = \frac{1}{B(a,b)} \int_0^x t^{a-1} (1-t)^{b-1}\, dt
        = \sum_{n \ge 0} \frac{x^{a+n} (1-x)^b\, \Gamma(a+b+n)}{\Gamma(a+1+n)\, \Gamma(b)},

    summed in float64 for :math:`x \le 1/2` and through :math:`I_x(a,b) = 1 - I_{1-x}(b,a)`
    above; the derivatives in :math:`a, b` are the same series differentiated term by term
    (digamma functions), so no difference of nearly equal numbers enters them. The number of
    terms grows like :math:`a + b`. torch has no Beta CDF; :func:`implicit_rsample` uses this
    one (Figurnov et al. 2018).

    Args:
        value: points :math:`x` in :math:`[0, 1]` (clamped), any shape.
        concentration1: :math:`a > 0`, broadcastable against ``value``.
        concentration0: :math:`b > 0`, broadcastable against ``value``.

    Returns:
        :math:`I_x(a, b)` with the broadcast shape, in the dtype of ``value``. Differentiable once.

    Example:
        >>> import torch, gradkit as gk
        >>> x = torch.tensor([0.3, 0.8], dtype=torch.float64)
        >>> gk.reparam.beta_cdf(x, 2.0, 1.0)  # Beta(2, 1): F = x^2
        tensor([0.0900, 0.6400], dtype=torch.float64)
    """
    value = torch.as_tensor(value)
    a = torch.as_tensor(concentration1, dtype=value.dtype, device=value.device)
    b = torch.as_tensor(concentration0, dtype=value.dtype, device=value.device)
    value, a, b = torch.broadcast_tensors(value.clamp(0.0, 1.0), a, b)
    return _RegularizedBeta.apply(value, a, b)


def register_cdf(
    cls: type[_D],
) -> Callable[[Callable[[_D, Tensor], Tensor]], Callable[[_D, Tensor], Tensor]]:
    r"""Register a differentiable CDF for a distribution type (a decorator).

    The function takes ``(dist, value)`` and returns :math:`F(\text{value}; \theta)`,
    differentiable in the tensors ``dist`` was built from. It takes precedence over
    ``dist.cdf`` (register one where torch's CDF is missing or not differentiable in some
    parameter) and applies to subclasses (``Chi2`` uses ``Gamma``'s), in the style of
    ``torch.distributions.kl.register_kl``.

    Raises:
        TypeError: if ``cls`` is not a subclass of ``torch.distributions.Distribution``.

    Example:
        >>> import torch, gradkit as gk
        >>> class Unit(torch.distributions.Uniform):  # a toy subclass with its own CDF
        ...     pass
        >>> @gk.reparam.register_cdf(Unit)
        ... def _unit_cdf(dist, value):
        ...     return ((value - dist.low) / (dist.high - dist.low)).clamp(0, 1)
        >>> gk.reparam.differentiable_cdf(Unit(0.0, 2.0), torch.tensor(0.5))
        tensor(0.2500)
    """
    if not (isinstance(cls, type) and issubclass(cls, Distribution)):
        raise TypeError(
            f"register_cdf takes a torch.distributions.Distribution subclass, got {cls!r}; "
            "use it as @register_cdf(MyDistribution)"
        )

    def decorator(fn: Callable[[_D, Tensor], Tensor]) -> Callable[[_D, Tensor], Tensor]:
        # differentiable_cdf calls fn only on instances of cls (it looks cls up along the MRO).
        _CDFS[cls] = cast(CdfFn, fn)
        return fn

    return decorator


@register_cdf(Gamma)
def _gamma_cdf(dist: Gamma, value: Tensor) -> Tensor:
    return gamma_cdf(value, dist.concentration, dist.rate)


@register_cdf(Beta)
def _beta_cdf(dist: Beta, value: Tensor) -> Tensor:
    return beta_cdf(value, dist.concentration1, dist.concentration0)


def differentiable_cdf(dist: Distribution, value: Tensor) -> Tensor:
    """The CDF of ``dist`` at ``value``, differentiable in the distribution's parameters.

    Looks up the registry (:func:`register_cdf`) along the class hierarchy first, then falls
    back to ``dist.cdf``.

    Raises:
        NotImplementedError: if neither exists; the message says how to register one.

    Example:
        >>> import torch, gradkit as gk
        >>> d = torch.distributions.Normal(torch.tensor(0.0), torch.tensor(1.0))
        >>> gk.reparam.differentiable_cdf(d, torch.tensor(0.0))
        tensor(0.5000)
    """
    for cls in type(dist).__mro__:
        if cls in _CDFS:
            return _CDFS[cls](dist, value)
    try:
        return dist.cdf(value)
    except NotImplementedError:
        name = type(dist).__name__
        raise NotImplementedError(
            f"{name} has no cdf, so its samples cannot be differentiated implicitly. Register "
            f"a differentiable CDF with @gk.reparam.register_cdf({name}) (a function "
            "(dist, value) -> F(value)), or use gk.score_function / gk.measure_valued"
        ) from None


# --------------------------------------------------------------------------------------------
# Implicit reparameterisation
# --------------------------------------------------------------------------------------------


def _univariate_base(dist: object) -> Distribution:
    """The scalar distribution under any ``Independent`` wrappers; errors name the fix."""
    base, _ = base_distribution(_checks.check_distribution(dist))
    name = type(base).__name__
    if tuple(base.event_shape) != ():
        raise ValueError(
            f"implicit reparameterisation needs scalar events (a CDF), but {name} has "
            f"event_shape {tuple(base.event_shape)}. For independent coordinates build the "
            "scalar distribution and wrap it, Independent(Normal(loc, scale), 1); for a "
            "multivariate distribution use its own rsample or gk.score_function"
        )
    support = base.support
    if support is not None and support.is_discrete:
        raise ValueError(
            f"{name} is discrete: its samples are step functions of the parameters and have "
            "no reparameterisation. Use gk.score_function, gk.measure_valued, or the relaxed "
            "estimator gk.reparam.gumbel_softmax"
        )
    return base


def _implicit_surrogate(base: Distribution, x: Tensor) -> Tensor:
    r""":math:`x - (F(x;\theta) - \bot F(x;\theta)) / \bot p(x;\theta)`: value ``x``, gradient
    :math:`-\partial_\theta F / p` (:math:`\bot` stops gradients)."""
    cdf = differentiable_cdf(base, x)
    density = base.log_prob(x).detach().exp().clamp_min(torch.finfo(x.dtype).tiny)
    return x - (cdf - cdf.detach()) / density


def implicit_rsample(dist: Distribution, sample_shape: Sequence[int] = ()) -> Tensor:
    r"""Samples that carry the implicit reparameterisation gradient.

    A sample :math:`x \sim p(x;\theta)` is drawn without gradient; the returned tensor has the
    same values but differentiates as the inverse-CDF path :math:`x = F^{-1}(u;\theta)` with
    :math:`u` held fixed (Figurnov, Mohamed and Mnih 2018):

    .. math::
        \frac{\partial x}{\partial \theta} = -\frac{\partial F(x;\theta)/\partial\theta}
        {p(x;\theta)},

    realised by the surrogate :math:`x - (F(x;\theta) - \bot F)/\bot p` (:math:`\bot` = detach).
    Gradients flow to whatever produced the distribution's parameters. Works for any scalar
    distribution with a differentiable CDF (see :func:`differentiable_cdf`): ``Normal``,
    ``Gamma``, ``Beta``, ``Exponential``, ``Laplace``, ``LogNormal``, ... and ``Independent``
    wrappers of them. Second derivatives are not supported.

    Args:
        dist: a distribution with scalar events (``Independent`` wrappers allowed).
        sample_shape: leading sample shape, as for ``dist.rsample``.

    Returns:
        a tensor of shape ``(*sample_shape, *dist.batch_shape, *dist.event_shape)``.

    Raises:
        TypeError: if ``dist`` is not a distribution.
        ValueError: for non-scalar events or a discrete distribution.
        NotImplementedError: if the distribution has no differentiable CDF.

    Example:
        >>> import torch, gradkit as gk
        >>> mu = torch.tensor(0.5, requires_grad=True)
        >>> x = gk.reparam.implicit_rsample(torch.distributions.Normal(mu, 2.0), (3,))
        >>> x.sum().backward()  # dx/dmu = 1 for every sample, as for mu + sigma eps
        >>> round(mu.grad.item(), 5)
        3.0
    """
    base = _univariate_base(dist)
    with torch.no_grad():
        x = dist.sample(torch.Size(sample_shape))
    return _implicit_surrogate(base, x)


def implicit_derivative(dist: Distribution, value: Tensor) -> dict[str, Tensor]:
    r"""Per-element implicit derivatives :math:`\partial x/\partial\theta` at given points.

    :math:`\partial x/\partial\theta = -(\partial F(x;\theta)/\partial\theta)/p(x;\theta)`
    (Figurnov et al. 2018): how the sample at ``value`` moves when a parameter moves and its
    quantile :math:`u = F(x;\theta)` is held fixed. Each element is differentiated with respect
    to its own copy of the parameters, in one backward pass.

    Args:
        dist: a distribution with scalar events and a differentiable CDF.
        value: points of shape ``(*sample_shape, *dist.batch_shape, *dist.event_shape)``.

    Returns:
        dict parameter name (as :func:`gradkit.distributions.parameters` names it) -> tensor
        of the shape of ``value``.

    Raises:
        ValueError, NotImplementedError, TypeError: as :func:`implicit_rsample`.

    Example:
        >>> import torch, gradkit as gk
        >>> d = torch.distributions.Normal(torch.tensor(1.0), torch.tensor(2.0))
        >>> dx = gk.reparam.implicit_derivative(d, torch.tensor([1.0, 5.0]))
        >>> [[round(v, 5) for v in dx[k].tolist()] for k in ("loc", "scale")]  # 1, (x - mu)/sigma
        [[1.0, 1.0], [0.0, 2.0]]
    """
    _univariate_base(dist)
    resolved = resolve(dist)
    value = torch.as_tensor(value).detach()
    value = torch.broadcast_tensors(value, *resolved.params.values())[0]
    lead = value.dim() - len(resolved.batch_shape) - len(resolved.event_shape)
    rows = math.prod(value.shape[:lead])
    flat = value.reshape(rows, *value.shape[lead:])

    def cdf(rebuilt: Distribution) -> Tensor:
        return differentiable_cdf(base_distribution(rebuilt)[0], flat)

    grads = gradients(resolved, cdf, list(resolved.params), rows)
    base = base_distribution(dist)[0]
    density = base.log_prob(value).detach().exp().clamp_min(torch.finfo(value.dtype).tiny)
    return {n: -g.reshape(value.shape) / density for n, g in grads.items()}


@register_estimator("implicit_pathwise")
class ImplicitPathwise(PathwiseEstimator):
    r"""Pathwise gradients through implicit reparameterisation (Figurnov et al. 2018).

    The path is :func:`implicit_rsample`: the sample's value, differentiated as the inverse-CDF
    path :math:`\partial x/\partial\theta = -\partial_\theta F(x;\theta)/p(x;\theta)`.
    """

    def check(self, problem: Problem, **options: Any) -> None:
        _univariate_base(problem.dist)

    def path(self, dist: Distribution, sample_shape: tuple[int, ...], **options: Any) -> Tensor:
        base = _univariate_base(dist)
        with torch.no_grad():
            x = dist.sample(torch.Size(sample_shape))
        return _implicit_surrogate(base, x)


def implicit_pathwise(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    *,
    control_variate: Any = None,
    plate: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""Pathwise gradient estimates through implicit reparameterisation.

    Approximates :math:`\nabla_\theta \mathbb{E}_{p(x;\theta)}[f(x)]` with
    :math:`f'(x_s)\,\partial x_s/\partial\theta`, :math:`\partial x/\partial\theta =
    -\partial_\theta F(x;\theta)/p(x;\theta)` (Figurnov et al. 2018): the estimator of
    :func:`gradkit.estimators.pathwise` for any scalar distribution with a differentiable CDF,
    whether or not torch gives it an ``rsample``. Requires ``f`` differentiable and continuous.
    Registered as ``"implicit_pathwise"``.

    Args:
        f: differentiable cost, samples ``(S, *batch)`` -> values ``(S, *T)``.
        dist: a distribution with scalar events and a differentiable CDF.
        num_samples: number of samples ``S`` (>= 1).
        control_variate: a :class:`gradkit.control_variates.ControlVariate`.
        plate: declare one cost per batch element (checked; the estimate is the same).
        generator: a ``torch.Generator`` for all of the call's randomness.

    Returns:
        dict parameter name -> per-sample estimates of shape ``(S, *param.shape)``.

    Raises:
        ValueError, NotImplementedError, TypeError: as :func:`implicit_rsample`, and for a bad
            ``num_samples`` or output of ``f``.

    Example:
        >>> import torch, gradkit as gk
        >>> d = torch.distributions.Gamma(torch.tensor(2.0), torch.tensor(1.0))
        >>> gen = torch.Generator().manual_seed(0)
        >>> g = gk.reparam.implicit_pathwise(lambda x: x, d, 4000, generator=gen)  # 1/rate
        >>> round(g["concentration"].mean().item(), 1)
        1.0
    """
    return ESTIMATORS["implicit_pathwise"](
        f, dist, num_samples, control_variate=control_variate, plate=plate, generator=generator
    )


# --------------------------------------------------------------------------------------------
# Discrete variables: the Gumbel-max trick and the Concrete / Gumbel-softmax relaxation
# --------------------------------------------------------------------------------------------


def _check_logits(logits: object) -> Tensor:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"logits must be a floating-point tensor of shape (*batch, K), got "
            f"{type(logits).__name__ if not isinstance(logits, Tensor) else logits.dtype}; "
            "pass e.g. torch.log(probs)"
        )
    if logits.dim() == 0:
        raise ValueError(
            "logits must have a last dimension holding the K categories, got a 0-d tensor; "
            "pass shape (*batch, K)"
        )
    if bool(torch.isnan(logits).any()):
        raise ValueError("logits contain NaN; use -inf for categories of probability zero")
    return logits


def _check_temperature(temperature: object) -> float | Tensor:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, Tensor))
        or (isinstance(temperature, Tensor) and temperature.numel() != 1)
    ):
        raise TypeError(
            f"temperature must be a positive number, got {type(temperature).__name__}; "
            "pass e.g. temperature=0.5"
        )
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"temperature must be positive and finite, got {value}; the relaxation is the "
            "categorical distribution only in the limit temperature -> 0, so pass a small "
            "positive value such as 0.5 or 0.1"
        )
    return temperature


def _gumbel(shape: torch.Size, like: Tensor) -> Tensor:
    """Standard Gumbel noise :math:`-\\log(-\\log u)`, :math:`u \\sim U(0, 1)`."""
    u = torch.rand(shape, dtype=like.dtype, device=like.device)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(like.dtype).tiny)))


def gumbel_max(logits: Tensor, sample_shape: Sequence[int] = ()) -> Tensor:
    r"""Exact categorical samples by the Gumbel-max trick.

    :math:`k = \arg\max_j (\ell_j + g_j)` with i.i.d. standard Gumbel :math:`g_j =
    -\log(-\log u_j)` has :math:`P(k = j) = e^{\ell_j}/\sum_i e^{\ell_i}` (Maddison, Mnih and
    Teh 2017; Jang, Gu and Poole 2017). The sample is a step function of the logits, so it
    carries no gradient; its smooth relaxation is :func:`gumbel_softmax_sample`.

    Args:
        logits: unnormalised log-probabilities of shape ``(*batch, K)``; ``-inf`` allowed.
        sample_shape: leading sample shape.

    Returns:
        integer category indices (``torch.long``) of shape ``(*sample_shape, *batch)``.

    Raises:
        TypeError: for non-floating logits. ValueError: for 0-d logits or NaN.

    Example:
        >>> import torch, gradkit as gk
        >>> _ = torch.manual_seed(0)
        >>> k = gk.reparam.gumbel_max(torch.log(torch.tensor([0.2, 0.8])), (10_000,))
        >>> round(k.float().mean().item(), 2)  # frequency of category 1
        0.8
    """
    logits = _check_logits(logits)
    shape = torch.Size(sample_shape) + logits.shape
    return (logits + _gumbel(shape, logits)).argmax(-1)


def gumbel_softmax_sample(
    logits: Tensor,
    temperature: float | Tensor,
    sample_shape: Sequence[int] = (),
    *,
    straight_through: bool = False,
) -> Tensor:
    r"""Concrete (Gumbel-softmax) samples: a differentiable relaxation of one-hot categories.

    :math:`y = \operatorname{softmax}((\ell + g)/\tau)` with i.i.d. standard Gumbel :math:`g`
    (Jang, Gu and Poole 2017; Maddison, Mnih and Teh 2017). As :math:`\tau \to 0`, :math:`y`
    tends to the one-hot Gumbel-max sample; for :math:`\tau > 0` it lies inside the simplex and
    is differentiable in :math:`\ell`. With ``straight_through=True`` the value is the one-hot
    :math:`\arg\max` and the gradient is that of the soft sample.

    Args:
        logits: log-probabilities of shape ``(*batch, K)``.
        temperature: :math:`\tau > 0`.
        sample_shape: leading sample shape.
        straight_through: return hard one-hot values with the soft gradient.

    Returns:
        a tensor of shape ``(*sample_shape, *batch, K)`` on the simplex.

    Raises:
        TypeError, ValueError: for bad logits or a non-positive temperature.

    Example:
        >>> import torch, gradkit as gk
        >>> y = gk.reparam.gumbel_softmax_sample(torch.zeros(3), 0.5, (4,))
        >>> y.shape, torch.allclose(y.sum(-1), torch.ones(4))
        (torch.Size([4, 3]), True)
    """
    logits = _check_logits(logits)
    tau = _check_temperature(temperature)
    shape = torch.Size(sample_shape) + logits.shape
    soft = torch.softmax((logits + _gumbel(shape, logits)) / tau, dim=-1)
    if not straight_through:
        return soft
    hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())


def _binary_concrete(
    logits: Tensor, tau: float | Tensor, straight_through: bool, sample_shape: Sequence[int] = ()
) -> Tensor:
    """Relaxed Bernoulli: :math:`\\sigma((\\ell + \\log u - \\log(1-u))/\\tau)`."""
    tiny = torch.finfo(logits.dtype).tiny
    shape = torch.Size(sample_shape) + logits.shape
    u = torch.rand(shape, dtype=logits.dtype, device=logits.device)
    u = u.clamp(tiny, 1.0 - torch.finfo(logits.dtype).eps)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    if not straight_through:
        return soft
    return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())


class _Relaxed(PathwiseEstimator):
    """Shared by the Gumbel-softmax estimators: the relaxed path, biased by design."""

    families = (Categorical, OneHotCategorical, Bernoulli)
    biased = True
    straight_through = False

    def check(self, problem: Problem, *, temperature: float | Tensor = 1.0) -> None:
        base = problem.resolved.base
        if not isinstance(base, (Categorical, OneHotCategorical, Bernoulli)):
            raise ValueError(
                f"the {self.name} estimator relaxes Categorical, OneHotCategorical and "
                f"Bernoulli variables, got {type(base).__name__}; for continuous "
                "distributions use gk.pathwise or estimator='implicit_pathwise'"
            )
        _check_temperature(temperature)

    def path(
        self,
        dist: Distribution,
        sample_shape: tuple[int, ...],
        *,
        temperature: float | Tensor = 1.0,
    ) -> Tensor:
        tau = _check_temperature(temperature)
        base = cast("Categorical | OneHotCategorical | Bernoulli", base_distribution(dist)[0])
        if isinstance(base, Bernoulli):
            return _binary_concrete(base.logits, tau, self.straight_through, sample_shape)
        return gumbel_softmax_sample(
            base.logits, tau, sample_shape, straight_through=self.straight_through
        )

    def estimate(self, problem: Problem, *, temperature: float | Tensor = 1.0) -> dict[str, Tensor]:
        return super().estimate(problem, temperature=temperature)


@register_estimator("gumbel_softmax")
class GumbelSoftmax(_Relaxed):
    r"""The Gumbel-softmax (Concrete) estimator: ``f`` at relaxed samples, differentiated.

    Biased for every temperature (Jang, Gu and Poole 2017; Maddison, Mnih and Teh 2017).
    """


@register_estimator("straight_through_gumbel")
class StraightThroughGumbel(_Relaxed):
    r"""Straight-through Gumbel-softmax: ``f`` at the hard sample, the relaxed gradient.

    Biased by design (Jang, Gu and Poole 2017).
    """

    straight_through = True


def gumbel_softmax(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    temperature: float | Tensor = 1.0,
    *,
    straight_through: bool = False,
    control_variate: Any = None,
    plate: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""Relaxed (Gumbel-softmax / Concrete) pathwise gradient estimates for discrete variables.

    Approximates :math:`\nabla_\theta \mathbb{E}_{p(z;\theta)}[f(z)]` for a categorical
    (one-hot) or Bernoulli :math:`z` with :math:`\nabla_\theta f(y_s)`, where :math:`y_s =
    \operatorname{softmax}((\ell_\theta + g_s)/\tau)` (Bernoulli: :math:`\sigma((\ell_\theta +
    \text{logistic noise})/\tau)`) is the Concrete relaxation (Jang, Gu and Poole 2017; Maddison,
    Mnih and Teh 2017). ``f`` must be defined (and differentiable) on the relaxed values, not
    only on one-hot vectors. The estimator is **biased** for every :math:`\tau > 0`: the bias
    vanishes as :math:`\tau \to 0` while the variance grows. ``straight_through=True``
    evaluates ``f`` at the hard sample and keeps the soft gradient (also biased). Registered
    as ``"gumbel_softmax"`` and ``"straight_through_gumbel"`` (option ``temperature``).

    Args:
        f: cost on relaxed samples: ``(S, *batch, K)`` (categorical; one-hot coordinates) or
            ``(S, *batch)`` (Bernoulli) -> ``(S, *T)``.
        dist: ``Categorical`` or ``OneHotCategorical`` (``f`` receives relaxed one-hot vectors
            either way) or ``Bernoulli`` (``Independent`` wrappers allowed), built from
            ``probs`` or ``logits``.
        num_samples: number of samples ``S`` (>= 1).
        temperature: :math:`\tau > 0`.
        straight_through: use the straight-through variant.
        control_variate: a :class:`gradkit.control_variates.ControlVariate`.
        plate: declare one cost per batch element.
        generator: a ``torch.Generator`` for all of the call's randomness.

    Returns:
        dict parameter name (``probs`` or ``logits``) -> per-sample estimates
        ``(S, *param.shape)``.

    Raises:
        ValueError: for another distribution type or a non-positive temperature.
        TypeError: for a non-number temperature or a non-distribution.

    Example:
        >>> import torch, gradkit as gk
        >>> d = torch.distributions.Bernoulli(logits=torch.tensor(0.0))
        >>> gen = torch.Generator().manual_seed(0)
        >>> g = gk.reparam.gumbel_softmax(lambda y: y, d, 20_000, 0.1, generator=gen)  # 0.25
        >>> round(g["logits"].mean().item(), 2)
        0.25
    """
    name = "straight_through_gumbel" if straight_through else "gumbel_softmax"
    return ESTIMATORS[name](
        f,
        dist,
        num_samples,
        temperature=temperature,
        control_variate=control_variate,
        plate=plate,
        generator=generator,
    )


def categorical_gradient(f: CostFn, logits: Tensor) -> Tensor:
    r"""The exact gradient of :math:`\mathbb{E}_{z}[f(z)]` for a one-hot categorical :math:`z`.

    With :math:`\pi = \operatorname{softmax}(\ell)` and one-hot vectors :math:`e_k`, enumerating
    the :math:`K` categories gives

    .. math:: \frac{\partial}{\partial \ell_j} \sum_{k} \pi_k f(e_k)
       = \pi_j \Big( f(e_j) - \sum_k \pi_k f(e_k) \Big),

    the reference against which relaxed estimators such as :func:`gumbel_softmax` are biased
    (Jang, Gu and Poole 2017; Maddison, Mnih and Teh 2017). ``f`` is only evaluated at the
    vertices, so it need not be differentiable.

    Args:
        f: cost on one-hot vectors, ``(S, K) -> (S, *T)``; the target is summed over ``T``.
        logits: unnormalised log-probabilities of shape ``(K,)``; ``-inf`` allowed.

    Returns:
        the gradient with respect to the logits, shape ``(K,)``, dtype and device of ``logits``.

    Raises:
        TypeError: for non-floating logits or a non-callable ``f``.
        ValueError: for logits that are not one-dimensional, contain NaN, or an ``f`` that
            returns the wrong shape or non-finite values.

    Example:
        >>> import torch, gradkit as gk
        >>> logits = torch.log(torch.tensor([0.25, 0.75]))
        >>> gk.reparam.categorical_gradient(lambda z: z[:, 1], logits)  # d/dl of pi_1
        tensor([-0.1875,  0.1875])
    """
    logits = _check_logits(logits)
    if logits.dim() != 1:
        raise ValueError(
            f"logits must have shape (K,), got {tuple(logits.shape)}; enumerate one "
            "categorical variable at a time"
        )
    size = logits.shape[-1]
    one_hot = torch.eye(size, dtype=logits.dtype, device=logits.device)
    values = _checks.evaluate(f, one_hot, (size,)).detach().reshape(size, -1).sum(-1)
    probs = torch.softmax(logits.detach(), -1)
    return probs * (values - (probs * values).sum())


def relaxation_study(
    f: CostFn, logits: Tensor, temperatures: Sequence[float], num_samples: int
) -> list[dict[str, Any]]:
    r"""Bias and variance of relaxed gradient estimators across temperatures, by enumeration.

    For a categorical :math:`z` with logits :math:`\ell` (shape ``(K,)``) and the exact
    gradient :math:`g^\star` of :func:`categorical_gradient`, draws ``num_samples`` per-sample
    estimates :math:`\hat g_s \in \mathbb{R}^K` from the score function (unbiased, once) and
    from :func:`gumbel_softmax` and its straight-through variant (at every temperature), and
    reports

    .. math:: \text{bias} = \lVert \bar g - g^\star \rVert_2, \qquad
       \text{variance} = \textstyle\sum_j \operatorname{Var}(\hat g_{s,j}), \qquad
       \text{standard error} = \sqrt{\text{variance} / S},

    the last being the root-mean-square size of :math:`\lVert \bar g - g^\star\rVert_2` for an
    unbiased estimator: biases below about twice it cannot be told from zero (Jang, Gu and
    Poole 2017; Maddison, Mnih and Teh 2017; Mohamed et al. 2020, §3).

    Args:
        f: cost on (relaxed) one-hot vectors ``(S, K) -> (S,)``, defined and differentiable
            inside the simplex, not only at its vertices.
        logits: log-probabilities of shape ``(K,)``.
        temperatures: the temperatures :math:`\tau > 0` to try (at least one).
        num_samples: samples :math:`S` per estimate (>= 2).

    Returns:
        one dict per (estimator, temperature) with keys ``estimator`` (``"score function"``,
        ``"Gumbel-softmax"`` or ``"straight-through"``), ``temperature`` (NaN for the score
        function), ``bias``, ``standard_error`` and ``variance`` (Python floats).

    Raises:
        ValueError: for no temperatures, a non-positive temperature, fewer than 2 samples or
            bad logits (as :func:`categorical_gradient`).
        TypeError: for a temperature that is not a number or a non-integer ``num_samples``.

    Example:
        >>> import torch, gradkit as gk
        >>> _ = torch.manual_seed(0)
        >>> logits = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
        >>> rows = gk.reparam.relaxation_study(lambda y: y[..., 0], logits, [0.1, 10.0], 2000)
        >>> [(r["estimator"], r["temperature"]) for r in rows][1:3]
        [('Gumbel-softmax', 0.1), ('Gumbel-softmax', 10.0)]
        >>> rows[2]["bias"] > 10 * rows[2]["standard_error"]  # hot: confidently wrong
        True
    """
    from gradkit.diagnostics import summarize
    from gradkit.estimators import score_function

    _checks.check_num_samples(num_samples, 2, "a variance needs two samples")
    temps = [float(_check_temperature(t)) for t in temperatures]
    if not temps:
        raise ValueError("temperatures is empty; pass at least one, e.g. [0.1, 0.5, 1.0]")
    exact = categorical_gradient(f, logits)
    dist = Categorical(logits=logits.detach())
    one_hot = torch.eye(exact.shape[0], dtype=exact.dtype, device=exact.device)

    def record(estimator: str, temperature: float, estimates: Tensor) -> dict[str, Any]:
        s = summarize({"logits": estimates}, exact={"logits": exact})["logits"]
        bias = cast(Tensor, s.bias)
        return {
            "estimator": estimator,
            "temperature": temperature,
            "bias": float(bias.norm()),
            "standard_error": float(s.standard_error.pow(2).sum().sqrt()),
            "variance": float(s.variance.sum()),
        }

    sf = score_function(lambda k: f(one_hot[k]), dist, num_samples)["logits"]
    rows = [record("score function", math.nan, sf)]
    for name, straight in (("Gumbel-softmax", False), ("straight-through", True)):
        for tau in temps:
            g = gumbel_softmax(f, dist, num_samples, tau, straight_through=straight)["logits"]
            rows.append(record(name, tau, g))
    return rows
