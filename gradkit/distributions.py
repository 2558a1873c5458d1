"""Helpers that treat a ``torch.distributions.Distribution`` as a function of its parameters.

Every estimator in gradkit differentiates with respect to *the distribution's own parameter
tensors*, named as torch names them (``loc``, ``scale``, ``rate``, ``probs`` or ``logits``...).
This module finds those tensors (:func:`parameters`), rebuilds a distribution of the same type
from new values of them (:func:`rebuild`, used with ``torch.func``), and tells which parameters
move the support (:func:`support_parameters`), where the score function does not apply.

It also holds :class:`DoubleSidedMaxwell`, the positive part of the weak derivative of a
Gaussian with respect to its scale (Heidergott, Vázquez-Abad, Pflug and Farenhorst-Yuan 2010;
Mohamed, Rosca, Figurnov and Mnih 2020, §6).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    Gamma,
    Independent,
    TransformedDistribution,
    constraints,
)
from torch.distributions.utils import broadcast_all, lazy_property

__all__ = [
    "DoubleSidedMaxwell",
    "base_distribution",
    "parameters",
    "rebuild",
    "support_parameters",
]

_SKIP_INIT_ARGS = {"self", "validate_args", "batch_shape", "event_shape"}


def base_distribution(dist: Distribution) -> tuple[Distribution, int]:
    """Unwrap nested :class:`~torch.distributions.Independent` wrappers.

    Returns the innermost distribution and the total number of batch dimensions that the
    wrappers reinterpret as event dimensions.
    """
    ndims = 0
    while isinstance(dist, Independent):
        ndims += dist.reinterpreted_batch_ndims
        dist = dist.base_dist
    return dist, ndims


_INIT_ARGUMENTS: dict[type, tuple[inspect.Parameter, ...]] = {}


def _init_arguments(cls: type) -> tuple[inspect.Parameter, ...]:
    """The constructor's named arguments (cached per class: inspect is slow)."""
    if cls not in _INIT_ARGUMENTS:
        _INIT_ARGUMENTS[cls] = tuple(
            arg
            for arg in inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
            if arg.name not in _SKIP_INIT_ARGS
            and arg.kind not in (arg.VAR_POSITIONAL, arg.VAR_KEYWORD)
        )
    return _INIT_ARGUMENTS[cls]


_ALTERNATIVES: dict[tuple[type, str], bool] = {}


def _is_alternative(cls: type, name: str) -> bool:
    """True for parameters torch computes lazily from an alternative (``probs``/``logits``)."""
    key = (cls, name)
    if key not in _ALTERNATIVES:  # cached per class: inspect is slow
        _ALTERNATIVES[key] = isinstance(inspect.getattr_static(cls, name, None), lazy_property)
    return _ALTERNATIVES[key]


def _constructor_parameters(base: Distribution) -> dict[str, Tensor]:
    """The parameter tensors ``base`` was built from, in ``arg_constraints`` order."""
    names = list(base.arg_constraints)
    if not any(n in vars(base) for n in names):
        # The parameters live in a wrapped distribution: LogNormal, RelaxedBernoulli (a base
        # distribution), OneHotCategorical (a Categorical).
        inner = getattr(base, "_categorical", None)
        if isinstance(base, TransformedDistribution):
            inner = base_distribution(base.base_dist)[0]
        if inner is not None:
            found = _constructor_parameters(inner)
            return {name: value for name, value in found.items() if name in names}
    present = {}
    for name in names:
        if name in vars(base):
            present[name] = vars(base)[name]
        elif not _is_alternative(type(base), name) and hasattr(base, name):
            present[name] = getattr(base, name)  # a plain property, e.g. Beta.concentration1
    alternatives = [name for name in present if _is_alternative(type(base), name)]
    if len(alternatives) > 1:
        # torch caches the lazily derived alternative on first access (dist.logits after
        # Bernoulli(probs=...)); the one the distribution was built from is stored as _param.
        # Without _param (Geometric, MultivariateNormal) the constructor's argument is the
        # first of them set on the instance: the derived ones are cached later.
        chosen = getattr(base, "_param", None)
        keep = [name for name in alternatives if present[name] is chosen]
        keep = keep or [next(n for n in vars(base) if n in alternatives)]
        for name in alternatives:
            if name not in keep:
                del present[name]
    return present


def parameters(dist: Distribution) -> dict[str, Tensor]:
    """The differentiable parameters of ``dist``, keyed by torch's names for them.

    For ``Bernoulli``/``Categorical`` this is ``probs`` or ``logits``, whichever the
    distribution was built from. ``Independent`` wrappers are looked through. Integer-valued
    arguments such as ``Binomial.total_count`` are not parameters in this sense and are left out.

    Raises:
        TypeError: if ``dist`` is not a Distribution, or a parameter is not a floating tensor.

    Example:
        >>> import torch, gradkit as gk
        >>> sorted(gk.distributions.parameters(torch.distributions.Normal(0.0, 1.0)))
        ['loc', 'scale']
    """
    if not isinstance(dist, Distribution):
        raise TypeError(
            f"expected a torch.distributions.Distribution, got {type(dist).__name__}; "
            "build one, e.g. torch.distributions.Normal(loc, scale)"
        )
    base, _ = base_distribution(dist)
    out: dict[str, Tensor] = {}
    for name, value in _constructor_parameters(base).items():
        if base.arg_constraints[name].is_discrete:
            continue
        if not isinstance(value, Tensor) or not value.is_floating_point():
            dtype = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(
                f"parameter '{name}' of {type(base).__name__} has dtype {dtype}; gradient "
                "estimators need floating-point parameters: build the distribution from float "
                "tensors (e.g. torch.tensor(1.0) instead of torch.tensor(1))"
            )
        out[name] = value
    if not out:
        raise ValueError(
            f"{type(base).__name__} has no floating-point parameters to differentiate; "
            "gradient estimators need a distribution built from parameter tensors"
        )
    return out


def rebuild(dist: Distribution, params: dict[str, Tensor]) -> Distribution:
    """A distribution of the same type as ``dist`` with some parameters replaced.

    ``params`` maps parameter names (as :func:`parameters` returns them) to new tensors, which
    may carry extra leading dimensions (the new distribution's batch shape grows with them).
    Arguments not named are taken from ``dist``. Validation is switched off so the function
    can run under ``torch.func`` transforms.
    """
    if isinstance(dist, Independent):
        return Independent(
            rebuild(dist.base_dist, params), dist.reinterpreted_batch_ndims, validate_args=False
        )
    stored = _constructor_parameters(dist)
    kwargs: dict[str, Any] = {}
    for arg in _init_arguments(type(dist)):
        if arg.name in params:
            kwargs[arg.name] = params[arg.name]
        elif arg.name in stored:
            kwargs[arg.name] = stored[arg.name]
        elif arg.name not in dist.arg_constraints and hasattr(dist, arg.name):
            kwargs[arg.name] = getattr(dist, arg.name)
    return type(dist)(**kwargs, validate_args=False)


def support_parameters(dist: Distribution) -> list[str]:
    """Names of the parameters that the support of ``dist`` depends on.

    The support of ``Uniform(low, high)`` is ``[low, high]``: moving either bound moves the
    support, the density is not differentiable there, and the score-function estimator is biased.
    """
    base, _ = base_distribution(dist)
    support = base.support
    bounds = [v for v in vars(support).values() if isinstance(v, Tensor)]
    if not bounds:  # a fixed support (real line, unit interval, integers)
        return []
    names = _constructor_parameters(base)
    return [name for name, value in names.items() if any(value is b for b in bounds)]


class DoubleSidedMaxwell(Distribution):
    r"""The double-sided Maxwell distribution with location ``loc`` and scale ``scale``.

    .. math::
        p(x; \mu, \sigma) = \frac{(x-\mu)^2}{\sigma^3 \sqrt{2\pi}}
        \exp\!\Big(-\frac{(x-\mu)^2}{2\sigma^2}\Big), \qquad x \in \mathbb{R}.

    It is the positive part of the weak derivative of :math:`\mathcal N(\mu, \sigma^2)` with
    respect to :math:`\sigma`: :math:`\partial_\sigma \mathcal N = \sigma^{-1}(M - \mathcal N)`.
    Sampling: :math:`x = \mu + \sigma\, b\sqrt{2 g}` with a random sign :math:`b = \pm 1`
    (a Bernoulli(1/2) draw) and :math:`g \sim \mathrm{Gamma}(3/2, 1)`, because :math:`(x-\mu)^2
    / \sigma^2 \sim \chi^2_3`. If :math:`m` is a standard double-sided Maxwell draw and
    :math:`u \sim U(0, 1)`, then :math:`u m \sim \mathcal N(0, 1)` (the Maxwell–Gaussian coupling).

    Example:
        >>> import torch, gradkit as gk
        >>> d = gk.DoubleSidedMaxwell(torch.tensor(0.0), torch.tensor(2.0))
        >>> d.sample((3,)).shape
        torch.Size([3])
        >>> round(float(d.variance), 6)  # 3 sigma^2
        12.0
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(
        self, loc: Tensor | float, scale: Tensor | float, validate_args: bool | None = None
    ) -> None:
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size | list[int] | tuple[int, ...], _instance: Any = None
    ) -> DoubleSidedMaxwell:
        new = self._get_checked_instance(DoubleSidedMaxwell, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(DoubleSidedMaxwell, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc + self.scale  # one of the two modes, mu +- sigma

    @property
    def variance(self) -> Tensor:
        return 3.0 * self.scale.pow(2)

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        ones = torch.ones(shape, dtype=self.loc.dtype, device=self.loc.device)
        radius = torch.sqrt(2.0 * Gamma(1.5 * ones, ones).sample())
        sign = 2.0 * torch.bernoulli(0.5 * ones) - 1.0
        return self.loc + self.scale * sign * radius

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self.loc) / self.scale
        return (
            2.0 * torch.log(z.abs())
            - torch.log(self.scale)
            - 0.5 * math.log(2 * math.pi)
            - (0.5 * z.pow(2))
        )

    def cdf(self, value: Tensor) -> Tensor:
        z = (value - self.loc) / self.scale
        # P(Z <= z) = Phi(z) - z phi(z) for the standard double-sided Maxwell
        phi = torch.exp(-0.5 * z.pow(2)) / math.sqrt(2 * math.pi)
        big_phi = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
        return big_phi - z * phi
