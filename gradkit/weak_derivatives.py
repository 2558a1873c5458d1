r"""Weak derivatives of distributions and the batched measure-valued gradient engine.

A *weak derivative* of a density :math:`p(x;\theta)` with respect to a scalar parameter
:math:`\theta` is a triple :math:`(c_\theta, p^+, p^-)` of a constant and two probability
distributions with

.. math::
    \partial_\theta p(x;\theta) = c_\theta \big(p^+(x;\theta) - p^-(x;\theta)\big),
    \qquad
    \partial_\theta \mathbb{E}_{p}[f]
    = c_\theta \big(\mathbb{E}_{p^+}[f] - \mathbb{E}_{p^-}[f]\big),

so :math:`c_\theta (f(x^+) - f(x^-))` with :math:`x^\pm \sim p^\pm` is an unbiased gradient
estimate that never differentiates ``f`` (Pflug 1989, ``pflug1989sampling``; Heidergott and
Vázquez-Abad 2008, ``heidergott2008measure``; Mohamed et al. 2020, §6, ``mohamed2020monte``).
The two draws may share random numbers (*coupling*), which keeps the estimate unbiased and
usually lowers its variance.

The weak derivatives live in a registry keyed by ``(distribution type, parameter name)``, in
the style of :func:`torch.distributions.kl.register_kl`: decorate a function with
:func:`register_weak_derivative` to add one; lookup walks the method resolution order, so a
subclass inherits its parent's entries. Registered here:

==============  ==============  ==================================================================
distribution    parameter       :math:`c`; :math:`p^+`; :math:`p^-`
==============  ==============  ==================================================================
Normal(μ, σ)    loc             :math:`1/(\sigma\sqrt{2\pi})`; μ + Rayleigh(σ); μ − Rayleigh(σ)
Normal(μ, σ)    scale           :math:`1/\sigma`; double-sided Maxwell(μ, σ); Normal(μ, σ)
Laplace(μ, b)   loc             :math:`1/(2b)`; μ + b·Exp(1); μ − b·Exp(1)
Laplace(μ, b)   scale           :math:`1/b`; μ ± b·Gamma(2, 1); Laplace(μ, b)
Bernoulli(p)    probs / logits  1 or :math:`p(1-p)`; δ₁; δ₀
Binomial(n, p)  probs / logits  n or :math:`np(1-p)`; 1 + Bin(n−1, p); Bin(n−1, p)
Categorical(π)  probs / logits  1 or :math:`\pi_j`; δ_j; Categorical(π)
Poisson(λ)      rate            1; 1 + Poisson(λ); Poisson(λ)
Geometric(p)    probs / logits  1/p or 1 − p; Geometric(p); 1 + NegativeBinomial(2, p)
Exponential(λ)  rate            :math:`1/\lambda`; Exp(λ); Gamma(2, λ)
Gamma(α, β)     rate            :math:`\alpha/\beta`; Gamma(α, β); Gamma(α+1, β)
Uniform(l, h)   high            :math:`1/(h-l)`; δ_h; U(l, h)
Uniform(l, h)   low             :math:`1/(h-l)`; U(l, h); δ_l
==============  ==============  ==================================================================

:class:`MeasureValued` is the estimator registered as ``"measure_valued"``, behind
:func:`gradkit.estimators.measure_valued` and ``gradkit.expectation(...,
estimator="measure_valued")``: it perturbs every parameter coordinate of every sample in one
batched call of ``f`` (in chunks); under a declared plate, one coordinate of the event for the
whole batch at once. :func:`measure_valued_estimates` runs it on given samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Binomial,
    Categorical,
    Distribution,
    Exponential,
    Gamma,
    Geometric,
    Laplace,
    Normal,
    Poisson,
    Uniform,
)

from gradkit._engine import Stream, resolve
from gradkit.distributions import DoubleSidedMaxwell
from gradkit.registry import Estimator, Problem, register_estimator

CostFn = Callable[[Tensor], Tensor]

__all__ = [
    "MeasureValued",
    "WeakDerivative",
    "measure_valued_estimates",
    "register_weak_derivative",
    "registered_weak_derivatives",
]

# A chunk of perturbed inputs holds at most this many elements, and at most this many rows
# (samples x plate elements) per call of f: on a CPU, a neural f is fastest on cache-sized
# batches, so large chunks are slower than several small calls; a GPU wants large calls.
_CHUNK_ELEMENTS = 2**24
_CHUNK_ROWS = {"cpu": 2**9, "cuda": 2**16}


class WeakDerivative(NamedTuple):
    r"""A weak derivative :math:`\partial_{\theta_i} p = c_i (p^+_i - p^-_i)`, one draw per sample.

    Returned by a function registered with :func:`register_weak_derivative` for a base
    (non-``Independent``) distribution with batch shape ``B`` and event shape ``V``, a parameter
    of shape ``(*B, *extra)`` (``extra`` is ``()`` for ``Normal`` and ``(K,)`` for
    ``Categorical`` probabilities), and ``S`` samples.

    Attributes:
        constant: :math:`c_i`, a number or a tensor broadcastable to ``(S, *B, *extra)``.
        positive: draws of the coordinate that :math:`\theta_i` governs from :math:`p^+_i`,
            broadcastable to ``(S, *B, *extra, *V)``; element ``[s, b, e]`` replaces ``x[s, b]``
            when the gradient for parameter element ``[b, e]`` is estimated. ``None`` means
            "the sample itself": :math:`p^+ = p`, coupled with the original draw, so the
            already computed ``f(x)`` is reused.
        negative: the same for :math:`p^-_i`, or ``None`` for :math:`p^- = p` coupled with the
            original draw.

    Example:
        >>> import torch
        >>> from gradkit.weak_derivatives import WeakDerivative
        >>> wd = WeakDerivative(torch.tensor(1.0), torch.ones(4, 3), None)  # Bernoulli-like
        >>> wd.negative is None
        True
    """

    constant: Tensor | float
    positive: Tensor | None
    negative: Tensor | None


# fn(dist, x, coupling) -> WeakDerivative, with dist an instance of the registered type.
WeakDerivativeFn = Callable[..., WeakDerivative]
_Fn = TypeVar("_Fn", bound=WeakDerivativeFn)

_REGISTRY: dict[tuple[type, str], WeakDerivativeFn] = {}


def register_weak_derivative(dist_type: type, name: str) -> Callable[[_Fn], _Fn]:
    r"""Decorator that registers the weak derivative of ``dist_type`` with respect to ``name``.

    The decorated function is called as ``fn(dist, x, coupling)`` with the *base*
    distribution (``Independent`` wrappers removed), the samples ``x`` of shape
    ``(S, *dist.batch_shape, *dist.event_shape)`` and the ``coupling`` flag, and returns a
    :class:`WeakDerivative` whose parts give, for every parameter element, the constant
    :math:`c` and one draw from each of :math:`p^\pm` (Pflug 1989, ``pflug1989sampling``;
    Mohamed et al. 2020, §6, ``mohamed2020monte``). With ``coupling=True`` the draws should
    share random numbers with each other or with ``x``; with ``coupling=False`` they should be
    independent. Registering an existing pair replaces it; subclasses of ``dist_type`` inherit
    the entry unless they register their own.

    Args:
        dist_type: a subclass of :class:`torch.distributions.Distribution`.
        name: the parameter name as torch spells it (``"loc"``, ``"probs"``...).

    Returns:
        the decorator, which returns the function unchanged.

    Raises:
        TypeError: if ``dist_type`` is not a Distribution subclass or ``name`` is not a string.

    Example:
        The Weibull scale :math:`\lambda` (concentration :math:`k`): with :math:`y =
        (x/\lambda)^k \sim \mathrm{Exp}(1)`, :math:`\partial_\lambda p = \frac{k}{\lambda}(y\,p -
        p)`, and :math:`y\,p` is the law of :math:`x^+ = \lambda G^{1/k}`, :math:`G \sim
        \mathrm{Gamma}(2, 1)`; coupled with the sample, :math:`G = y + E`, :math:`x^- = x`.

        >>> import torch, gradkit as gk
        >>> from torch.distributions import Weibull
        >>> from gradkit.weak_derivatives import measure_valued_estimates
        >>> @gk.register_weak_derivative(Weibull, "scale")
        ... def weibull_scale(dist, x, coupling):
        ...     k, lam, e = dist.concentration, dist.scale, torch.empty_like(x).exponential_()
        ...     if coupling:  # G = y + E, and x- is the sample itself
        ...         g, negative = (x / lam) ** k + e, None
        ...     else:  # G = E + E', and an independent x- ~ p
        ...         g, negative = e + torch.empty_like(x).exponential_(), dist.sample(x.shape[:1])
        ...     return gk.WeakDerivative(k / lam, lam * g ** (1 / k), negative)
        >>> d = Weibull(torch.tensor(2.0), torch.tensor(1.0))  # scale 2, concentration 1
        >>> x = d.sample((20_000,))
        >>> g = measure_valued_estimates(lambda x: x, d, x, x, wrt=["scale"])
        >>> round(g["scale"].mean().item(), 1)  # d/dlambda E[x] = Gamma(1 + 1/k) = 1
        1.0
    """
    if not (isinstance(dist_type, type) and issubclass(dist_type, Distribution)):
        raise TypeError(
            f"register_weak_derivative needs a torch.distributions.Distribution subclass, got "
            f"{dist_type!r}; pass the class itself, e.g. register_weak_derivative(Normal, 'loc')"
        )
    if not isinstance(name, str):
        raise TypeError(
            f"register_weak_derivative needs the parameter name as a string, got {name!r}; "
            "use torch's spelling, e.g. 'loc', 'scale', 'probs'"
        )

    def decorator(fn: _Fn) -> _Fn:
        _REGISTRY[dist_type, name] = fn
        return fn

    return decorator


def registered_weak_derivatives() -> list[tuple[type, str]]:
    """Every registered ``(distribution type, parameter name)`` pair, sorted by name.

    Example:
        >>> import torch, gradkit as gk
        >>> (torch.distributions.Normal, "scale") in gk.registered_weak_derivatives()
        True
    """
    return sorted(_REGISTRY, key=lambda key: (key[0].__name__, key[1]))


def _lookup(dist_type: type, name: str) -> WeakDerivativeFn:
    """The registered weak derivative for ``(dist_type, name)``, walking the MRO."""
    for klass in dist_type.__mro__:
        fn = _REGISTRY.get((klass, name))
        if fn is not None:
            return fn
    known = ", ".join(f"({t.__name__}, {n!r})" for t, n in registered_weak_derivatives())
    raise NotImplementedError(
        f"no weak derivative is registered for {dist_type.__name__} parameter {name!r}. "
        f"Registered (distribution, parameter) pairs: {known}. Derive c, p+ and p- with "
        f"d/d{name} p = c (p+ - p-) and register them with "
        f"@gk.register_weak_derivative({dist_type.__name__}, {name!r}), estimate only the "
        "registered parameters with gradkit.weak_derivatives.measure_valued_estimates(..., "
        "wrt=[...]), or use gk.score_function / gk.pathwise"
    )


# ---------------------------------------------------------------------------------------------
# Registered weak derivatives. Each returns draws for all S samples and parameter elements.
# ---------------------------------------------------------------------------------------------


def _shape(dist: Distribution, x: Tensor) -> tuple[int, ...]:
    return (x.shape[0], *dist.batch_shape)


def _exponential(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Standard exponential draws with the dtype and device of ``like``."""
    return torch.empty(shape, dtype=like.dtype, device=like.device).exponential_()


@register_weak_derivative(Normal, "loc")
def _normal_loc(dist: Normal, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Normal location: :math:`\partial_\mu \mathcal N(\mu,\sigma^2) = c\,(p^+ - p^-)`.

    :math:`\partial_\mu \phi = \frac{x-\mu}{\sigma^2}\phi`; its positive part, supported on
    :math:`x > \mu`, has mass :math:`\int_0^\infty \frac{y}{\sigma^2}\phi(y)\,dy =
    1/(\sigma\sqrt{2\pi})`, and normalised it is :math:`\mu + W` with
    :math:`W \sim \mathrm{Rayleigh}(\sigma) = \mathrm{Weibull}(\sqrt2\sigma, 2)`; the negative
    part is its mirror image. So :math:`c = 1/(\sigma\sqrt{2\pi})`, :math:`x^\pm = \mu \pm W`;
    coupling uses the same :math:`W` for both (Mohamed et al. 2020, §6.1, ``mohamed2020monte``;
    Heidergott et al. 2010, ``heidergott2010gradient``). Sampled as
    :math:`W = \sigma\sqrt{2E}`, :math:`E \sim \mathrm{Exp}(1)`.
    """
    shape = _shape(dist, x)
    w_plus = dist.scale * torch.sqrt(2.0 * _exponential(shape, dist.loc))
    w_minus = w_plus if coupling else dist.scale * torch.sqrt(2.0 * _exponential(shape, dist.loc))
    constant = 1.0 / (dist.scale * math.sqrt(2.0 * math.pi))
    return WeakDerivative(constant, dist.loc + w_plus, dist.loc - w_minus)


@register_weak_derivative(Normal, "scale")
def _normal_scale(dist: Normal, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Normal scale: :math:`\partial_\sigma \mathcal N = \sigma^{-1}(\mathcal M - \mathcal N)`.

    :math:`\partial_\sigma \phi = \frac1\sigma\big(\frac{(x-\mu)^2}{\sigma^2}\phi - \phi\big)`
    and :math:`\frac{(x-\mu)^2}{\sigma^2}\phi` is the double-sided Maxwell density
    :math:`\mathcal M(\mu,\sigma)`: :math:`c = 1/\sigma`, :math:`x^+ = \mu + \sigma m`,
    :math:`x^- \sim \mathcal N(\mu,\sigma^2)` (Heidergott et al. 2010,
    ``heidergott2010gradient``; Mohamed et al. 2020, §6.1, ``mohamed2020monte``).

    Coupling (Maxwell–Gaussian): if :math:`m` is standard double-sided Maxwell and
    :math:`u \sim U(0,1)`, then :math:`z = u m` is standard normal. Rather than drawing
    :math:`(m, u)` and a third sample, the pair is drawn *conditionally on the sample itself*:
    given :math:`z = (x-\mu)/\sigma`, the joint density of :math:`(m, z)` is
    :math:`\frac{m^2\phi(m)}{|m|}` on :math:`0 < z/m < 1`, so :math:`m` has the sign of
    :math:`z` and :math:`|m| = \sqrt{z^2 + 2E}`, :math:`E \sim \mathrm{Exp}(1)`. The pair
    :math:`(x^+, x^-) = (\mu + \sigma m, x)` has exactly the law of the Maxwell–Gaussian pair
    :math:`(\mu + \sigma m, \mu + \sigma u m)`, and :math:`f(x^-) = f(x)` is reused (one
    evaluation of ``f`` per coordinate instead of two). Uncoupled: independent fresh draws.
    """
    shape = _shape(dist, x)
    if coupling:
        z = (x - dist.loc) / dist.scale
        sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        m = sign * torch.sqrt(z.square() + 2.0 * _exponential(shape, dist.loc))
        return WeakDerivative(1.0 / dist.scale, dist.loc + dist.scale * m, None)
    positive = DoubleSidedMaxwell(dist.loc, dist.scale).sample((shape[0],))
    return WeakDerivative(1.0 / dist.scale, positive, dist.sample((shape[0],)))


@register_weak_derivative(Laplace, "loc")
def _laplace_loc(dist: Laplace, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Laplace location: :math:`c = 1/(2b)`, :math:`x^\pm = \mu \pm b E` with :math:`E` ~ Exp(1).

    :math:`\partial_\mu \frac{1}{2b}e^{-|x-\mu|/b} = \frac{1}{2b}\cdot\frac{\operatorname{sign}
    (x-\mu)}{b}e^{-|x-\mu|/b}`: the positive part is :math:`\frac{1}{2b}` times the density of
    :math:`\mu + \mathrm{Exp}(\text{rate } 1/b)`, the negative part its mirror image
    (Mohamed et al. 2020, §6, ``mohamed2020monte``). Coupling shares :math:`E`.
    """
    shape = _shape(dist, x)
    e_plus = dist.scale * _exponential(shape, dist.loc)
    e_minus = e_plus if coupling else dist.scale * _exponential(shape, dist.loc)
    return WeakDerivative(0.5 / dist.scale, dist.loc + e_plus, dist.loc - e_minus)


@register_weak_derivative(Laplace, "scale")
def _laplace_scale(dist: Laplace, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Laplace scale: :math:`c = 1/b`, :math:`p^+ = \mu \pm` Gamma(2, rate 1/b), :math:`p^- = p`.

    :math:`\partial_b p = \frac1b\big(\frac{|x-\mu|}{b}p - p\big)` and
    :math:`\frac{|x-\mu|}{b}p(x) = \frac{|x-\mu|}{2b^2}e^{-|x-\mu|/b}` is the density of
    :math:`\mu + s\,G` with a random sign :math:`s` and :math:`G \sim \mathrm{Gamma}(2,
    \text{rate } 1/b)` (Mohamed et al. 2020, §6, ``mohamed2020monte``). Coupling: since
    :math:`G = |x-\mu| + bE` in law, :math:`x^+ = \mu + \operatorname{sign}(x-\mu)(|x-\mu| +
    bE)` and :math:`x^- = x`, the sample itself. Uncoupled: independent fresh draws.
    """
    shape = _shape(dist, x)
    if coupling:
        offset = x - dist.loc
        sign = torch.where(offset >= 0, 1.0, -1.0).to(offset.dtype)
        grown = offset.abs() + dist.scale * _exponential(shape, dist.loc)
        return WeakDerivative(1.0 / dist.scale, dist.loc + sign * grown, None)
    sign = 2.0 * torch.bernoulli(torch.full(shape, 0.5, dtype=x.dtype, device=x.device)) - 1.0
    gamma2 = dist.scale * (_exponential(shape, dist.loc) + _exponential(shape, dist.loc))
    return WeakDerivative(1.0 / dist.scale, dist.loc + sign * gamma2, dist.sample((shape[0],)))


@register_weak_derivative(Bernoulli, "probs")
def _bernoulli_probs(dist: Bernoulli, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Bernoulli probability: :math:`\partial_p \mathbb E f = f(1) - f(0)`: :math:`c = 1`, δ₁, δ₀.

    Both parts are point masses, so coupling changes nothing (Mohamed et al. 2020, §6,
    ``mohamed2020monte``).
    """
    return WeakDerivative(torch.ones_like(dist.probs), x.new_ones(()), x.new_zeros(()))


@register_weak_derivative(Bernoulli, "logits")
def _bernoulli_logits(dist: Bernoulli, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Bernoulli logit: :math:`\partial_\ell \mathbb E f = p(1-p)\,(f(1) - f(0))`.

    The chain rule through :math:`p = \sigma(\ell)`, :math:`dp/d\ell = p(1-p)`: :math:`c =
    p(1-p)`, :math:`p^+ = \delta_1`, :math:`p^- = \delta_0` (Mohamed et al. 2020, §6,
    ``mohamed2020monte``).
    """
    probs = dist.probs
    return WeakDerivative(probs * (1.0 - probs), x.new_ones(()), x.new_zeros(()))


def _binomial(dist: Binomial, x: Tensor, coupling: bool, constant: Tensor) -> WeakDerivative:
    fewer = Binomial((dist.total_count - 1).clamp(min=0), probs=dist.probs, validate_args=False)
    y_plus = fewer.sample(x.shape[:1])
    y_minus = y_plus if coupling else fewer.sample(x.shape[:1])
    return WeakDerivative(constant, y_plus + 1.0, y_minus)


@register_weak_derivative(Binomial, "probs")
def _binomial_probs(dist: Binomial, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Binomial probability: :math:`c = n`, :math:`p^+ = 1 + \mathrm{Bin}(n-1,p)`, :math:`p^- =
    \mathrm{Bin}(n-1,p)`.

    Differentiating :math:`\binom nk p^k(1-p)^{n-k}` gives
    :math:`n\big(b_{n-1}(k-1) - b_{n-1}(k)\big)` with :math:`b_{n-1}` the
    :math:`\mathrm{Bin}(n-1,p)` mass function (Heidergott and Vázquez-Abad 2008,
    ``heidergott2008measure``). Coupling shares the :math:`\mathrm{Bin}(n-1,p)` draw.
    """
    return _binomial(dist, x, coupling, dist.total_count * torch.ones_like(dist.probs))


@register_weak_derivative(Binomial, "logits")
def _binomial_logits(dist: Binomial, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Binomial logit: as for ``probs`` with :math:`c = n\,p(1-p)` (chain rule through
    :math:`p = \sigma(\ell)`; Heidergott and Vázquez-Abad 2008, ``heidergott2008measure``).
    """
    probs = dist.probs
    return _binomial(dist, x, coupling, dist.total_count * probs * (1.0 - probs))


def _categorical(dist: Categorical, x: Tensor, coupling: bool, constant: Tensor) -> WeakDerivative:
    num = dist.probs.shape[-1]
    positive = torch.arange(num, device=x.device, dtype=x.dtype)
    if coupling:
        return WeakDerivative(constant, positive, None)
    fresh = dist.sample((num, x.shape[0])).movedim(0, -1)  # (S, *batch, K)
    return WeakDerivative(constant, positive, fresh)


@register_weak_derivative(Categorical, "probs")
def _categorical_probs(dist: Categorical, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Categorical probabilities: :math:`\partial_{\pi_j}\mathbb E f = f(j) - \mathbb E f`.

    torch normalises the probabilities, :math:`p(k) = \pi_k / \sum_i \pi_i`, and gradkit
    differentiates through that normalisation (as :func:`~gradkit.estimators.score_function`
    does); at
    :math:`\sum_i \pi_i = 1`, :math:`\partial_{\pi_j} p(k) = \delta_{jk} - p(k)`: :math:`c = 1`,
    :math:`p^+ = \delta_j`, :math:`p^- = p` itself (Mohamed et al. 2020, §6,
    ``mohamed2020monte``). Coupled: :math:`x^-` is the sample itself; uncoupled: a fresh draw.
    """
    return _categorical(dist, x, coupling, torch.ones_like(dist.probs))


@register_weak_derivative(Categorical, "logits")
def _categorical_logits(dist: Categorical, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Categorical logits: :math:`\partial_{\ell_j}\mathbb E f = \pi_j\,(f(j) - \mathbb E f)`.

    With :math:`p = \operatorname{softmax}(\ell)`, :math:`\partial_{\ell_j} p(k) =
    \pi_j(\delta_{jk} - p(k))`: :math:`c = \pi_j`, :math:`p^+ = \delta_j`, :math:`p^- = p`
    (Mohamed et al. 2020, §6, ``mohamed2020monte``). Coupled: :math:`x^-` is the sample itself;
    uncoupled: a fresh draw.
    """
    return _categorical(dist, x, coupling, dist.probs)


@register_weak_derivative(Poisson, "rate")
def _poisson_rate(dist: Poisson, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Poisson rate: :math:`c = 1`, :math:`p^+ = 1 + \mathrm{Poisson}(\lambda)`, :math:`p^- =
    \mathrm{Poisson}(\lambda)`.

    :math:`\partial_\lambda \frac{\lambda^k e^{-\lambda}}{k!} = p(k-1) - p(k)`
    (Heidergott and Vázquez-Abad 2008, ``heidergott2008measure``). Coupled: :math:`x^- = x`,
    the sample itself, and :math:`x^+ = x + 1`; uncoupled: independent fresh draws.
    """
    one = torch.ones_like(dist.rate)
    if coupling:
        return WeakDerivative(one, x + 1.0, None)
    return WeakDerivative(one, dist.sample(x.shape[:1]) + 1.0, dist.sample(x.shape[:1]))


def _geometric(dist: Geometric, x: Tensor, coupling: bool, constant: Tensor) -> WeakDerivative:
    def draw() -> Tensor:
        return dist.sample(x.shape[:1])

    if coupling:
        return WeakDerivative(constant, None, x + 1.0 + draw())
    return WeakDerivative(constant, draw(), 1.0 + draw() + draw())


@register_weak_derivative(Geometric, "probs")
def _geometric_probs(dist: Geometric, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Geometric probability: :math:`c = 1/p`, :math:`p^+ = \mathrm{Geom}(p)`, :math:`p^- = 1 +
    \mathrm{NegBin}(2, p)`.

    For :math:`P(k) = (1-p)^k p` (failures before the first success), :math:`\partial_p P(k) =
    \frac1p\big((1-p)^k p - k p^2 (1-p)^{k-1}\big)`, and :math:`k p^2(1-p)^{k-1}` is the mass of
    one plus the failures before the second success (Heidergott and Vázquez-Abad 2008,
    ``heidergott2008measure``). Coupled: :math:`x^+ = x`, the sample itself, and :math:`x^- = x
    + 1 + G'` with a fresh geometric :math:`G'`; uncoupled: independent fresh draws.
    """
    return _geometric(dist, x, coupling, 1.0 / dist.probs)


@register_weak_derivative(Geometric, "logits")
def _geometric_logits(dist: Geometric, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Geometric logit: as for ``probs`` with :math:`c = \frac1p\cdot p(1-p) = 1-p` (chain rule
    through :math:`p = \sigma(\ell)`; Heidergott and Vázquez-Abad 2008, ``heidergott2008measure``).
    """
    return _geometric(dist, x, coupling, 1.0 - dist.probs)


@register_weak_derivative(Exponential, "rate")
def _exponential_rate(dist: Exponential, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Exponential rate: :math:`c = 1/\lambda`, :math:`p^+ = \mathrm{Exp}(\lambda)`,
    :math:`p^- = \mathrm{Gamma}(2,\lambda)`.

    :math:`\partial_\lambda \lambda e^{-\lambda x} = \frac1\lambda\big(\lambda e^{-\lambda x} -
    \lambda^2 x e^{-\lambda x}\big)` (Mohamed et al. 2020, §6, ``mohamed2020monte``).
    Coupled: :math:`x^+ = x`, the sample itself, and :math:`x^- = x + E/\lambda` (a sum of two
    exponentials is Gamma(2)); uncoupled: independent fresh draws.
    """
    shape = _shape(dist, x)
    constant = 1.0 / dist.rate
    if coupling:
        return WeakDerivative(constant, None, x + _exponential(shape, dist.rate) / dist.rate)
    positive = _exponential(shape, dist.rate) / dist.rate
    negative = (_exponential(shape, dist.rate) + _exponential(shape, dist.rate)) / dist.rate
    return WeakDerivative(constant, positive, negative)


@register_weak_derivative(Gamma, "rate")
def _gamma_rate(dist: Gamma, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Gamma rate: :math:`c = \alpha/\beta`, :math:`p^+ = \mathrm{Gamma}(\alpha,\beta)`,
    :math:`p^- = \mathrm{Gamma}(\alpha+1,\beta)`.

    :math:`\partial_\beta \frac{\beta^\alpha x^{\alpha-1}e^{-\beta x}}{\Gamma(\alpha)} =
    \frac\alpha\beta\, p(x) - x\,p(x)` and :math:`\frac{\beta}{\alpha} x\, p(x)` is the
    :math:`\mathrm{Gamma}(\alpha+1,\beta)` density (Mohamed et al. 2020, §6,
    ``mohamed2020monte``). Coupled: :math:`x^+ = x`, the sample itself, and :math:`x^- = x +
    E/\beta`; uncoupled: independent fresh draws.
    """
    shape = _shape(dist, x)
    constant = dist.concentration / dist.rate
    if coupling:
        return WeakDerivative(constant, None, x + _exponential(shape, dist.rate) / dist.rate)
    bigger = Gamma(dist.concentration + 1.0, dist.rate, validate_args=False)
    return WeakDerivative(constant, dist.sample(shape[:1]), bigger.sample(shape[:1]))


@register_weak_derivative(Uniform, "high")
def _uniform_high(dist: Uniform, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Uniform upper bound: :math:`\partial_h \mathbb E f = \frac{1}{h-l}(f(h) - \mathbb E f)`.

    From :math:`\mathbb E f = \frac{1}{h-l}\int_l^h f`: :math:`c = 1/(h-l)`, :math:`p^+ =
    \delta_h`, :math:`p^- = U(l,h)` (Mohamed et al. 2020, §6, ``mohamed2020monte``). The
    support moves with :math:`h`, where the score function is biased. Coupled: :math:`x^- = x`,
    the sample itself; uncoupled: a fresh draw.
    """
    constant = 1.0 / (dist.high - dist.low)
    negative = None if coupling else dist.sample(x.shape[:1])
    return WeakDerivative(constant, dist.high, negative)


@register_weak_derivative(Uniform, "low")
def _uniform_low(dist: Uniform, x: Tensor, coupling: bool) -> WeakDerivative:
    r"""Uniform lower bound: :math:`\partial_l \mathbb E f = \frac{1}{h-l}(\mathbb E f - f(l))`.

    :math:`c = 1/(h-l)`, :math:`p^+ = U(l,h)`, :math:`p^- = \delta_l` (Mohamed et al. 2020, §6,
    ``mohamed2020monte``). Coupled: :math:`x^+ = x`, the sample itself; uncoupled: a fresh draw.
    """
    constant = 1.0 / (dist.high - dist.low)
    positive = None if coupling else dist.sample(x.shape[:1])
    return WeakDerivative(constant, positive, dist.low)


# ---------------------------------------------------------------------------------------------
# The engine.
# ---------------------------------------------------------------------------------------------


def _broadcast_part(part: object, full: tuple[int, ...], x: Tensor, where: str) -> Tensor | None:
    if part is None:
        return None
    if not isinstance(part, Tensor):
        raise TypeError(f"{where} must be a tensor or None, got {type(part).__name__}")
    try:
        return torch.broadcast_to(part, full).to(x.dtype)
    except RuntimeError as err:
        raise ValueError(
            f"{where} has shape {tuple(part.shape)}, which does not broadcast to {full} = "
            "(num_samples, *param.shape, *event_shape); return one draw per sample and "
            "parameter element"
        ) from err


def _perturbed_costs(
    problem: Problem,
    x: Tensor,
    values: Tensor,
    inner: tuple[int, ...],
    extra: tuple[int, ...],
    event: tuple[int, ...],
) -> Tensor:
    """The signal at ``x`` with one coordinate per group replaced: returns ``(G, S, *plate)``.

    Group ``g = (i, e)`` (an inner batch index and an extra parameter index, ``G = I * E``)
    replaces ``x[:, p, i]`` by ``values[:, p, i, e]`` for every plate index ``p`` at once.
    """
    num = x.shape[0]
    plate_shape = problem.plate_shape
    plate_ndim = len(plate_shape)
    n_inner, n_extra = math.prod(inner), math.prod(extra)
    groups = n_inner * n_extra
    v = values.reshape(num, *plate_shape, n_inner, n_extra, *event)
    event_dims = range(plate_ndim + 3, plate_ndim + 3 + len(event))
    v = v.permute(plate_ndim + 1, plate_ndim + 2, 0, *range(1, plate_ndim + 1), *event_dims)
    v = v.reshape(groups, num, *plate_shape, *([1] * len(inner)), *event)
    group_inner = torch.arange(groups, device=x.device) // n_extra
    positions = torch.arange(n_inner, device=x.device)
    rows = max(1, num * math.prod(plate_shape))
    row_budget = _CHUNK_ROWS.get(x.device.type, _CHUNK_ROWS["cuda"])
    chunk = max(1, min(_CHUNK_ELEMENTS // max(1, x.numel()), row_budget // rows))
    costs = []
    for start in range(0, groups, chunk):  # chunks of groups, usually one
        stop = min(groups, start + chunk)
        mask = (group_inner[start:stop, None] == positions).reshape(
            stop - start, *([1] * (1 + plate_ndim)), *inner, *([1] * len(event))
        )
        x_pert = torch.where(mask, v[start:stop], x.unsqueeze(0))
        try:
            costs.append(problem.cost(x_pert, lead=2))
        except ValueError as err:
            raise ValueError(
                f"{err} (the measure-valued estimator called f on perturbed samples of shape "
                f"{tuple(x_pert.shape)}, with an extra leading dimension; f must broadcast over "
                "leading dimensions, e.g. index x[..., i] rather than x[:, i])"
            ) from err
    return torch.cat(costs)


def _by_coordinate(
    costs: Tensor, num: int, plate_shape: tuple[int, ...], inner: tuple[int, ...], extra: int
) -> Tensor:
    """Costs ``(G, S, *plate)`` of :func:`_perturbed_costs` (group ``g = (i, e)``) laid out by
    coordinate: ``(S, *plate, *inner, extra)``."""
    plate_ndim = len(plate_shape)
    table = costs.reshape(math.prod(inner), extra, num, *plate_shape)
    table = table.permute(2, *range(3, 3 + plate_ndim), 0, 1)
    return table.reshape(num, *plate_shape, *inner, extra)


def _check_wrt(wrt: object, params: Sequence[str], base: Distribution) -> list[str]:
    if isinstance(wrt, str) or not isinstance(wrt, Sequence) or any(n not in params for n in wrt):
        raise ValueError(
            f"wrt must be a list of parameter names of {type(base).__name__}, chosen from "
            f"{sorted(params)}; got {wrt!r}"
        )
    return list(wrt)


@register_estimator("measure_valued")
class MeasureValued(Estimator):
    r"""The measure-valued (weak-derivative) estimator, rows :math:`c_i(f(x^{(i,+)}) -
    f(x^{(i,-)}))` from the weak derivatives registered with :func:`register_weak_derivative`.

    Its random draws (the perturbations) come from the call's stream: in
    :func:`~gradkit.autodiff.expectation` they are made in the backward pass, for the cost
    contracted with the upstream gradient, and the same generator state gives the same
    perturbations."""

    def targets(
        self,
        resolved: Any,
        requested: Sequence[str],
        *,
        coupling: bool = True,
        wrt: Sequence[str] | None = None,
    ) -> list[str]:
        """The parameters to estimate: ``wrt``, or the requested ones with a weak derivative.

        A requested parameter without a registered weak derivative is left out when it does
        not require grad (Gamma's concentration); one that requires grad is an error that
        lists what is registered.
        """
        base = resolved.base
        if wrt is not None:
            chosen = _check_wrt(wrt, list(resolved.params), base)
            for name in chosen:
                _lookup(type(base), name)
            return [n for n in chosen if n in requested]
        registered = []
        for name in requested:
            try:
                _lookup(type(base), name)
                registered.append(name)
            except NotImplementedError:
                if resolved.params[name].requires_grad:
                    raise  # the registry's error names the pair and lists what is registered
        if not registered and requested:
            _lookup(type(base), requested[0])  # raises: nothing to differentiate
        return registered

    def check(self, problem: Problem, *, coupling: bool = True, wrt: Any = None) -> None:
        if not isinstance(coupling, bool):
            raise TypeError(f"coupling must be True or False, got {coupling!r}")

    def estimate(
        self, problem: Problem, *, coupling: bool = True, wrt: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        with torch.no_grad(), problem.randomness():
            return _estimates(problem, coupling)


def _estimates(problem: Problem, coupling: bool) -> dict[str, Tensor]:
    resolved = problem.resolved
    base = resolved.base
    x, signal = problem.x, problem.signal  # (S, *plate) or (S,)
    batch, event = tuple(base.batch_shape), tuple(base.event_shape)
    plate_ndim = len(problem.plate_shape)
    inner = batch[plate_ndim:]
    num = x.shape[0]
    out = {}
    for name, param in problem.params.items():
        if tuple(param.shape[: len(batch)]) != batch:
            raise ValueError(
                f"parameter {name!r} of {type(base).__name__} has shape "
                f"{tuple(param.shape)}, which does not start with the batch shape {batch}; "
                "the measure-valued estimator needs batch-first parameters (build the "
                "distribution with parameters broadcast to its batch shape)"
            )
        extra = tuple(param.shape[len(batch) :])
        rule = _lookup(type(base), name)
        wd = rule(base, x, coupling)
        if not isinstance(wd, WeakDerivative):
            raise TypeError(
                f"the weak derivative registered for ({type(base).__name__}, {name!r}) "
                f"returned {type(wd).__name__}; it must return gk.WeakDerivative("
                "constant, positive, negative)"
            )
        where = f"the weak derivative for ({type(base).__name__}, {name!r})"
        full = (num, *param.shape, *event)
        parts = [
            _broadcast_part(part, full, x, f"{where}: {label}")
            for label, part in (("positive", wd.positive), ("negative", wd.negative))
        ]
        if parts[0] is None and parts[1] is None:
            raise ValueError(
                f"{where} returned None for both positive and negative parts; at most one "
                "of them may be the sample itself"
            )
        costs = [
            signal.unsqueeze(0)
            if part is None
            else _perturbed_costs(problem, x, part, inner, extra, event)
            for part in parts
        ]
        n_extra = math.prod(extra)
        diff = costs[0] - costs[1]  # (G, S, *plate): at least one part was perturbed
        diff = _by_coordinate(diff, num, batch[:plate_ndim], inner, n_extra)
        diff = diff.reshape(num, *param.shape)
        constant = torch.as_tensor(wd.constant, dtype=param.dtype, device=param.device)
        try:
            fits = torch.broadcast_shapes(constant.shape, diff.shape) == diff.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{where}: constant has shape {tuple(constant.shape)}, which does not "
                f"broadcast to {tuple(diff.shape)} = (num_samples, *param.shape)"
            )
        out[name] = (constant.detach() * diff).to(param.dtype)
    return out


def measure_valued_estimates(
    f: CostFn,
    dist: Distribution,
    x: Tensor,
    fx: Tensor,
    coupling: bool = True,
    *,
    wrt: Sequence[str] | None = None,
    plate: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""Per-sample measure-valued gradient estimates from given samples ``x`` and ``fx = f(x)``.

    For every parameter element :math:`\theta_i` with registered weak derivative
    :math:`(c_i, p^+_i, p^-_i)` and every sample :math:`x_s`:

    .. math::
        \hat\eta_{s,i} = c_i\,\big(f(x_s^{(i,+)}) - f(x_s^{(i,-)})\big),

    where :math:`x_s^{(i,\pm)}` equals :math:`x_s` except the coordinate that :math:`\theta_i`
    governs, drawn from :math:`p^\pm_i` (Pflug 1989, ``pflug1989sampling``; Mohamed et al. 2020,
    §6, ``mohamed2020monte``). Under a declared plate (``plate=True``: ``f`` returns ``(S,
    *dist.batch_shape)`` and each output element depends only on its own batch element)
    element ``b`` of the estimate uses only ``f``'s element ``b``, and one event coordinate is
    perturbed for every batch element at once, so ``f`` sees ``O(event size)`` rows rather than
    ``O(batch x event)``. Otherwise ``f`` is summed over its output dimensions and each element
    is perturbed alone. All perturbed inputs for a parameter go to ``f`` stacked along a new
    leading dimension, in chunks (at most ``2**24`` elements, and a few hundred rows on a CPU),
    under ``torch.no_grad``. A part that is ``None`` reuses ``fx``.

    Args:
        f: cost, samples ``(..., S, *batch, *event)`` -> ``(..., S, *T)``; it must broadcast
            over extra leading dimensions.
        dist: the distribution (``Independent`` wrappers allowed).
        x: samples ``(S, *dist.batch_shape, *dist.event_shape)`` drawn from ``dist``.
        fx: ``f(x)``, shape ``(S, *T)``.
        coupling: passed to the weak derivatives: share random numbers between the positive
            and negative draws (and with ``x``), or draw them independently.
        wrt: names of the parameters to estimate (default: those with a registered weak
            derivative; a parameter without one that requires grad is an error).
        plate: declare one cost per batch element (see above).
        generator: a ``torch.Generator`` for the perturbations.

    Returns:
        dict parameter name -> estimates of shape ``(S, *param.shape)``, in the parameter's dtype.

    Raises:
        NotImplementedError: for a parameter with no registered weak derivative (the message
            lists the registered pairs).
        TypeError: for a non-bool ``coupling`` or a weak derivative that returns non-tensors.
        ValueError: for an unknown name in ``wrt``, a parameter not laid out batch-first, a
            weak derivative with wrongly shaped draws, or an ``f`` that does not broadcast over
            a leading dimension, returns a different shape on perturbed samples, or returns
            NaN/inf.

    Example:
        >>> import torch
        >>> from gradkit.weak_derivatives import measure_valued_estimates
        >>> d = torch.distributions.Bernoulli(torch.tensor([0.2, 0.7]))
        >>> x = d.sample((3,))
        >>> f = lambda x: (x - 0.5) ** 2 + 2 * x  # per element: f(1) - f(0) = 2 exactly
        >>> measure_valued_estimates(f, d, x, f(x), plate=True)["probs"]
        tensor([[2., 2.],
                [2., 2.],
                [2., 2.]])
    """
    estimator = MeasureValued()
    estimator.name = "measure_valued"
    options: dict[str, Any] = {"coupling": coupling, "wrt": wrt}
    resolved = resolve(dist)
    problem = Problem(
        f,
        resolved,
        x.shape[0],
        plate=plate,
        stream=Stream(generator, resolved.device),
        names=estimator.targets(resolved, list(resolved.params), **options),
        estimator=estimator,
    )
    estimator.check(problem, **options)
    fx = fx.detach()
    problem._check_output(tuple(fx.shape[1:]))
    problem.output_shape = tuple(fx.shape[1:])
    problem.set_forward(x.detach(), fx)
    return estimator.estimate(problem, **options)
