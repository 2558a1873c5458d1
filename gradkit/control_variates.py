r"""Control variates for every estimator.

A control variate is a term with known expectation subtracted from an estimator (Glasserman
2003, ch. 4; Mohamed et al. 2020, §7). Baselines (:mod:`gradkit.baselines`) are the special
case :math:`b\,\nabla_\theta\log p` of the score function. A :class:`ControlVariate` works
with *every* estimator, as optax's ``control_variates_jacobians`` did: it supplies a function
:math:`\tilde f` whose expected gradient :math:`\nabla_\theta\mathbb{E}[\tilde f]` is known in
closed form; the estimator is run once on ``f`` and once on :math:`\tilde f` *with the same
samples and the same random numbers*, and the corrected rows are

.. math:: \hat g_s - \beta\,\big(\hat h_s - \nabla_\theta \mathbb{E}[\tilde f]\big),

unbiased for any :math:`\beta` that does not depend on row :math:`s`. Pass one as
``control_variate=`` to ``gk.score_function``, ``gk.pathwise``, ``gk.measure_valued``, any
registered estimator, or ``gk.expectation``.

:class:`DeltaMethod` builds :math:`\tilde f` from a second-order Taylor expansion of the cost at
the mean of the distribution (Paisley, Blei and Jordan 2012): a quadratic whose expectation, and
the gradient of that expectation, are known from the mean and covariance of the distribution.
Under a declared plate it expands each batch element's cost separately (the Hessian of a plate
is block-diagonal), so each element's estimate is corrected by its own quadratic.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution
from torch.func import grad_and_value, jacfwd

from gradkit.distributions import base_distribution, parameters, rebuild
from gradkit.registry import loo_coefficient

if TYPE_CHECKING:
    from gradkit.registry import Problem

__all__ = ["Control", "ControlVariate", "DeltaMethod", "QuadraticExpansion"]


class Control(NamedTuple):
    r"""What a control variate supplies for one call.

    ``signal(x, lead)`` is the control function at samples ``x`` with ``lead`` leading
    dimensions, shaped like the learning signal, ``(*lead, *plate_shape)``, and differentiable
    in ``x`` (a pathwise estimator differentiates it). ``expectation(dist)`` is
    :math:`\mathbb{E}_{\mathrm{dist}}[\tilde f]` summed over the plate, differentiable in the
    parameters of ``dist`` (the engine passes a rebuilt distribution whose parameters are
    leaves).
    """

    signal: Callable[[Tensor, int], Tensor]
    expectation: Callable[[Distribution], Tensor]


class ControlVariate(abc.ABC):
    """A zero-mean correction that works with every registered estimator.

    Subclasses implement :meth:`control`; :meth:`coefficient_for` chooses :math:`\beta`.
    """

    coefficient: float | None = None

    @abc.abstractmethod
    def control(self, problem: Problem) -> Control:
        """The control function and its exact expectation for this call (see :class:`Control`)."""

    def coefficient_for(self, g: Tensor, h: Tensor) -> Tensor | float:
        r""":math:`\beta` per row and element: fixed, or ``Cov(g, h)/Var(h)`` from other rows."""
        if self.coefficient is not None:
            return self.coefficient
        return loo_coefficient(g, h)


def _moments(dist: Distribution, shape: torch.Size) -> tuple[Tensor, Tensor, bool]:
    """Mean ``(D,)`` and covariance of a sample flattened to ``D`` coordinates.

    Returns ``(mean, cov, diagonal)``: ``cov`` is the variance ``(D,)`` when the coordinates
    are independent (a univariate distribution, possibly wrapped in ``Independent``), else the
    ``(N, k, k)`` covariance blocks of ``N`` independent ``k``-dimensional events.
    """
    base, _ = base_distribution(dist)
    name = type(base).__name__
    try:
        mean = dist.mean.expand(shape).reshape(-1)
        if base.event_shape == torch.Size():
            cov = dist.variance.expand(shape).reshape(-1)
            diagonal = True
        elif len(base.event_shape) == 1 and hasattr(base, "covariance_matrix"):
            k = base.event_shape[0]
            cov = base.covariance_matrix.expand(*base.batch_shape, k, k).reshape(-1, k, k)
            diagonal = False
        else:
            raise ValueError(
                f"the delta method needs the covariance of {name}, whose event coordinates "
                "are dependent and which has no covariance_matrix; use a univariate "
                "distribution (wrapped in Independent for vector events) or a "
                "MultivariateNormal, or a baseline from gradkit.baselines"
            )
    except NotImplementedError:
        raise ValueError(
            f"the delta method needs the mean and variance of {name}, which torch does not "
            "implement for it; use a baseline from gradkit.baselines instead"
        ) from None
    return mean, cov, diagonal


@dataclass(frozen=True)
class QuadraticExpansion:
    r"""A second-order Taylor expansion of a scalar cost around a point :math:`\mu_0`.

    .. math::
        \tilde f(x) = f(\mu_0) + \nabla f(\mu_0)^\top (x - \mu_0)
        + \tfrac12 (x - \mu_0)^\top H (x - \mu_0), \qquad H = \nabla^2 f(\mu_0),

    with :math:`x` flattened to :math:`D` coordinates. Under a distribution with mean
    :math:`m` and covariance :math:`C`,

    .. math::
        \mathbb{E}[\tilde f] = f(\mu_0) + \nabla f(\mu_0)^\top (m - \mu_0)
        + \tfrac12\big[(m - \mu_0)^\top H (m - \mu_0) + \operatorname{tr}(H C)\big].

    Built by :meth:`DeltaMethod.expand` (Paisley, Blei and Jordan 2012). A first-order
    expansion (``order=1``) has no Hessian (``hessian is None``): :math:`\tilde f` is linear and
    :math:`\mathbb{E}[\tilde f] = f(\mu_0) + \nabla f(\mu_0)^\top (m - \mu_0)`.

    Attributes:
        point: :math:`\mu_0`, shape ``(D,)``.
        value: :math:`f(\mu_0)`, a 0-dim tensor.
        gradient: :math:`\nabla f(\mu_0)`, shape ``(D,)``.
        hessian: :math:`H`, shape ``(D, D)``, or ``None`` for a first-order expansion.
        shape: the shape of one sample, ``batch_shape + event_shape``.

    Example:
        >>> import torch, gradkit as gk
        >>> d = torch.distributions.Normal(torch.tensor(1.0), torch.tensor(2.0))
        >>> q = gk.control_variates.DeltaMethod.expand(lambda x: x**2, d)
        >>> q(torch.tensor([0.0, 3.0]))  # a quadratic is its own expansion
        tensor([0., 9.])
        >>> q.expectation(d)  # mu^2 + sigma^2
        tensor(5.)
    """

    point: Tensor
    value: Tensor
    gradient: Tensor
    hessian: Tensor | None
    shape: torch.Size

    def __call__(self, x: Tensor) -> Tensor:
        r""":math:`\tilde f(x)` for samples ``x`` of shape ``(*lead, *shape)``; returns ``lead``.

        Any leading dimensions broadcast, as the estimators require of a cost (the
        measure-valued estimator adds one).
        """
        lead = x.shape[: x.dim() - len(self.shape)]
        delta = x.reshape(*lead, -1).to(self.point.dtype) - self.point
        linear = self.value + delta @ self.gradient
        if self.hessian is None:
            return linear
        return linear + 0.5 * ((delta @ self.hessian) * delta).sum(-1)

    def expectation(self, dist: Distribution) -> Tensor:
        r""":math:`\mathbb{E}_{x\sim\mathrm{dist}}[\tilde f(x)]` in closed form (differentiable).

        Raises:
            ValueError: if ``dist`` has no usable mean and covariance, or samples of another
                shape than the expansion.
        """
        full = dist.batch_shape + dist.event_shape
        if full != self.shape:
            raise ValueError(
                f"the expansion is for samples of shape {tuple(self.shape)}, but the "
                f"distribution draws shape {tuple(full)}; expand around this distribution"
            )
        mean, cov, diagonal = _moments(dist, full)
        delta = mean - self.point
        if self.hessian is None:
            return self.value + delta @ self.gradient
        if diagonal:
            trace = (torch.diagonal(self.hessian) * cov).sum()
        else:
            n, k, _ = cov.shape
            blocks = torch.diagonal(self.hessian.reshape(n, k, n, k), dim1=0, dim2=2)
            trace = (blocks.permute(2, 0, 1) * cov.transpose(-1, -2)).sum()
        quadratic = delta @ self.hessian @ delta
        return self.value + delta @ self.gradient + 0.5 * (quadratic + trace)


class DeltaMethod(ControlVariate):
    r"""The delta-method control variate: a Taylor expansion of ``f`` at the mean.

    With :math:`\tilde f` the second-order expansion of ``f`` at :math:`\mu_0 =
    \mathbb{E}[x]` (see :class:`QuadraticExpansion`), the term
    :math:`h_s = \tilde f(x_s)\,\nabla_\theta \log p(x_s;\theta) - \nabla_\theta
    \mathbb{E}_{p(x;\theta)}[\tilde f]` has mean zero, and the corrected estimate is

    .. math::
        \hat g_s - \beta\, h_s, \qquad \hat g_s = f(x_s)\,\nabla_\theta \log p(x_s;\theta)

    (Paisley, Blei and Jordan 2012; Mohamed et al. 2020, §7.2). With ``order=1`` the expansion
    is linear, the control variate of MuProp (Gu et al. 2016): it needs one gradient of ``f``
    at the mean and no Hessian, so it scales to many coordinates (a batch of documents'
    latent factors), and for a Bernoulli :math:`\nabla_\theta\mathbb{E}[\tilde f]` is
    :math:`\nabla f(\mu_0)^\top \nabla_\theta \psi`. The gradient of
    :math:`\mathbb{E}[\tilde f]` comes from autograd through the distribution's mean and
    (co)variance as functions of its parameters, with the expansion point held fixed. For a
    quadratic ``f`` the expansion is exact, and with :math:`\beta = 1` every per-sample estimate
    equals the true gradient.

    By default :math:`\beta` is estimated per parameter element as
    :math:`\mathrm{Cov}(\hat g, h)/\mathrm{Var}(h)` from the *other* samples (leave-one-out),
    so it is independent of sample :math:`s` and the estimator stays unbiased; this needs
    ``num_samples >= 3``. A fixed ``coefficient`` needs one sample. The Hessian costs
    :math:`D^2` for :math:`D` sample coordinates (``order=1`` avoids it), and the score
    function's run on :math:`\tilde f` needs its per-sample scores (a copy of the parameters
    per sample).

    It works with every estimator: for the pathwise estimator :math:`h_s` is the pathwise
    gradient of :math:`\tilde f` at the same sample, for the measure-valued estimator the
    difference of :math:`\tilde f` at the same perturbed points. Under a declared plate each
    batch element gets its own expansion.

    Requirements: ``f`` twice (``order=1``: once) differentiable in ``x`` by autograd;
    real-valued samples; a
    distribution whose ``mean`` and ``variance`` torch implements (univariate, optionally in
    ``Independent``) or a ``MultivariateNormal``.

    Args:
        coefficient: a fixed :math:`\beta`, or ``None`` to estimate it.
        order: 2 (the quadratic expansion) or 1 (linear, no Hessian).

    Raises:
        TypeError: for a coefficient that is not a real number.
        ValueError: for an order other than 1 or 2.

    Example:
        >>> import torch, gradkit as gk
        >>> d = torch.distributions.Normal(torch.tensor(1.0), torch.tensor(2.0))
        >>> cv = gk.control_variates.DeltaMethod(coefficient=1.0)
        >>> g = gk.score_function(lambda x: x**2, d, 4, control_variate=cv)
        >>> g["loc"].round(decimals=5), g["scale"].round(decimals=5)  # 2 mu and 2 sigma, exactly
        (tensor([2., 2., 2., 2.]), tensor([4., 4., 4., 4.]))
    """

    def __init__(self, coefficient: float | None = None, *, order: int = 2) -> None:
        if coefficient is not None and (
            isinstance(coefficient, bool)
            or not isinstance(coefficient, (int, float))
            or not math.isfinite(coefficient)
        ):
            raise TypeError(
                f"coefficient must be a finite real number or None (estimate it), got "
                f"{coefficient!r}; e.g. DeltaMethod(coefficient=1.0)"
            )
        if (
            isinstance(order, bool)
            or not isinstance(order, numbers.Integral)
            or order not in (1, 2)
        ):
            raise ValueError(
                f"order must be 1 (a linear expansion) or 2 (quadratic), got {order!r}"
            )
        self.coefficient = coefficient
        self.order: int = int(order)

    def control(self, problem: Problem) -> Control:
        """The quadratic expansion of the call's (contracted) signal at the mean.

        Raises:
            TypeError: for integer-valued samples.
            ValueError: for too few samples to estimate the coefficient, a distribution
                without usable moments, or an ``f`` that cannot be expanded.
        """
        dist = problem.dist
        if not problem.x.is_floating_point():
            raise TypeError(
                f"the delta method expands f in x, but {type(dist).__name__} draws "
                f"{problem.x.dtype} samples; use it for real-valued samples (Bernoulli is "
                "fine), or a baseline from gradkit.baselines"
            )
        rows = problem.num_samples
        if self.coefficient is None and rows < 3:
            raise ValueError(
                f"the delta method estimates its coefficient from the other samples and needs "
                f"at least 3 samples, got num_samples={rows}; draw more samples or fix "
                "it, e.g. DeltaMethod(coefficient=1.0)"
            )

        def signal(x: Tensor) -> Tensor:
            return problem.contract(problem.f(x), 1)

        expansion, values = self._expand(signal, dist, self.order)
        point, gradient, hessian = expansion.point, expansion.gradient, expansion.hessian
        plate_shape = problem.plate_shape

        def control(x: Tensor, lead: int) -> Tensor:
            lead_shape = x.shape[:lead]
            delta = x.reshape(*lead_shape, -1).to(point.dtype) - point
            terms = delta * gradient
            if hessian is not None:
                terms = terms + 0.5 * delta * (delta @ hessian)
            if plate_shape:
                return terms.reshape(*lead_shape, *plate_shape, -1).sum(-1) + values
            return terms.sum(-1) + values.sum()

        return Control(control, expansion.expectation)

    @staticmethod
    def expand(
        f: Callable[[Tensor], Tensor], dist: Distribution, *, order: int = 2
    ) -> QuadraticExpansion:
        r"""Taylor expansion of ``f`` (summed over its outputs) at ``dist.mean``: second order,
        or first with ``order=1``.

        Gradient and Hessian come from ``torch.func`` on the flattened sample.

        Args:
            f: cost, samples ``(S, *batch, *event)`` -> ``(S, *T)``.
            dist: the distribution whose mean is the expansion point.
            order: 2, or 1 for the linear expansion (no Hessian).

        Returns:
            the :class:`QuadraticExpansion`, detached from any autograd graph.

        Raises:
            ValueError: if autograd cannot differentiate ``f`` twice, or the value, gradient or
                Hessian is not finite, or the distribution has no usable mean.
        """
        return DeltaMethod._expand(f, dist, order)[0]

    @staticmethod
    def _expand(
        f: Callable[[Tensor], Tensor], dist: Distribution, order: int = 2
    ) -> tuple[QuadraticExpansion, Tensor]:
        """The expansion of ``f`` summed, and ``f`` at the point (``(*T,)``, not summed)."""
        shape = dist.batch_shape + dist.event_shape
        # A fresh copy: reading dist.mean could cache lazily derived parameters on dist itself.
        fresh = rebuild(dist, {name: p.detach() for name, p in parameters(dist).items()})
        point = _moments(fresh, shape)[0].detach()
        if not bool(torch.isfinite(point).all()):
            raise ValueError(
                f"the delta method expands f at the mean, but the mean of {type(dist).__name__} "
                "is not finite; use a baseline from gradkit.baselines"
            )

        def total(z: Tensor) -> tuple[Tensor, Tensor]:
            values = f(z.reshape(1, *shape))[0]
            return values.sum(), values

        def gradient(z: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            g, (_, values) = grad_and_value(total, has_aux=True)(z)
            return g, (g, values)

        hess: Tensor | None = None
        times = "once" if order == 1 else "twice"
        try:  # value, gradient and Hessian in one forward-over-reverse pass
            if order == 1:
                grad_point, (_, values) = grad_and_value(total, has_aux=True)(point)
            else:
                hess, (grad_point, values) = jacfwd(gradient, has_aux=True)(point)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"the delta method needs f to be {times} differentiable in x by torch autograd "
                "(torch operations only, no .item(), .numpy() or in-place writes to x, and "
                f"broadcasting over a leading sample dimension); differentiating f failed: "
                f"{error}. Use a baseline from gradkit.baselines for such f"
            ) from error
        values, grad_point = values.detach(), grad_point.detach()
        parts = {"value": values, "gradient": grad_point}
        if hess is not None:
            hess = parts["Hessian"] = hess.detach()
        bad = [name for name, part in parts.items() if not bool(torch.isfinite(part).all())]
        if bad:
            raise ValueError(
                f"the Taylor expansion of f at the mean has non-finite {', '.join(bad)}; f must "
                f"be finite and {times} differentiable at dist.mean (e.g. no log at 0 there)"
            )
        return QuadraticExpansion(point, values.sum(), grad_point, hess, shape), values
