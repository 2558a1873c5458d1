r"""Monte Carlo expectations that autograd differentiates with any registered estimator.

:func:`expectation` returns the sample mean of ``f`` (or the estimator's own estimate of
:math:`\mathbb{E}[f]`) with a backward pass that sends the chosen estimator's gradient to the
distribution's parameters. It knows no estimator by name: it looks the name up in
``gk.ESTIMATORS`` (:mod:`gradkit.registry`), so an estimator registered with
:func:`~gradkit.registry.register_estimator` works here unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from gradkit.registry import Estimator, Problem, apply_control_variate, get_estimator

__all__ = ["expectation"]

CostFn = Callable[[Tensor], Tensor]


def expectation(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    *,
    estimator: str | Estimator = "pathwise",
    plate: bool = False,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Tensor:
    r"""Monte Carlo estimate of :math:`\mathbb{E}_{p(x;\theta)}[f(x)]` that autograd differentiates.

    The value is the sample mean of ``f`` (shape ``T``). Calling ``backward()`` on anything
    computed from it sends the chosen estimator's gradient to whatever produced the
    distribution's parameters (an encoder, a policy network), while tensors used inside ``f``
    (a decoder's weights) get their ordinary gradient at the sampled points. If ``f`` itself
    depends on the parameters (an entropy term), that direct dependence is differentiated too.

    Any output shape ``T`` works with every estimator, and the gradient is exact for any
    upstream gradient ``g``: the estimator runs in the backward pass on the cost contracted
    with it, :math:`\sum_t g_t f_t(x)`, reusing the forward samples and values. By default
    (``plate=False``) the outputs may depend on every coordinate of the sample; with
    ``plate=True`` the caller declares one cost per batch element (``T == batch_shape``, element
    ``b`` depending only on ``x[:, b]``), and each parameter element is credited with its own
    element's cost only. Pathwise estimators (``pathwise``, ``implicit_pathwise``,
    ``gumbel_softmax``, ``straight_through_gumbel``) differentiate through the samples with
    ordinary autograd; the others add their gradient in the backward pass. A stateful
    baseline is updated once per call, in the forward pass, after it was used.

    Args:
        f: cost, samples ``(S, *batch, *event)`` -> ``(S, *T)``.
        dist: the distribution, built from tensors that may require grad.
        num_samples: number of samples ``S``.
        estimator: a name in ``gk.ESTIMATORS`` (or an estimator object).
        plate: declare one cost per batch element.
        generator: a ``torch.Generator`` for all of the call's randomness, the backward pass's
            included; the global stream is untouched.
        **options: the estimator's options (``baseline=`` for the score function,
            ``coupling=`` for the measure-valued estimator, ``control_variate=`` for every
            estimator); an option it does not take is a TypeError that lists those it takes.

    Example:
        >>> import torch, gradkit as gk
        >>> mu = torch.tensor(1.0, requires_grad=True)
        >>> d = torch.distributions.Normal(mu, torch.tensor(1.0))
        >>> gk.expectation(lambda x: 2 * x, d, 10).backward()  # d/dmu E[2x] = 2
        >>> round(mu.grad.item(), 4)
        2.0
    """
    est = get_estimator(estimator)
    control_variate = options.pop("control_variate", None)
    options = est.validate(options)
    problem = est.problem(
        f,
        dist,
        num_samples,
        plate=plate,
        generator=generator,
        trainable_only=True,
        options=options,
    )
    if est.reparameterised and control_variate is None:
        x = est.forward_path(problem, **options)
        fx = problem.evaluate(x)
        value = est.value(problem, fx)
        est.finish(problem, **options)
        return value
    with torch.no_grad():
        x = est.sample(problem).detach()
    fx = problem.evaluate(x)
    problem.set_forward(x, fx.detach())
    value = est.value(problem, fx)
    if not problem.names:
        est.finish(problem, **options)
        return value
    problem.prepared = est.prepare(problem, **options)
    est.finish(problem, **options)
    backward = _Backward(est, problem, options, control_variate)
    surrogate = _EstimatorGradient.apply(backward, *problem.params.values())
    return value + surrogate


class _Backward:
    """The estimator's gradient for an upstream gradient ``g`` of the expectation's value."""

    def __init__(
        self, estimator: Estimator, problem: Problem, options: dict[str, Any], cv: Any
    ) -> None:
        self.estimator, self.problem, self.options, self.cv = estimator, problem, options, cv
        assert problem.output_shape is not None
        self.shape = problem.output_shape
        self.dtype = problem.fx.dtype

    def gradients(self, g: Tensor) -> list[Tensor]:
        problem = self.problem.weighted(g)
        est, options = self.estimator, self.options
        if self.cv is None:
            grads = est.mean_gradient(problem, **options)
        else:
            rows = est.estimate(problem, **options)
            rows = apply_control_variate(self.cv, est, problem, rows, options)
            grads = {n: v.mean(0) for n, v in rows.items()}
        return [grads[n].to(p.dtype) for n, p in problem.params.items()]


class _EstimatorGradient(torch.autograd.Function):
    """Zero in the forward pass; the estimator's gradient for the parameters in backward."""

    @staticmethod
    def forward(ctx: Any, backward: _Backward, *thetas: Tensor) -> Tensor:
        ctx.estimator = backward
        return thetas[0].new_zeros(backward.shape, dtype=backward.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        with torch.no_grad():
            return (None, *ctx.estimator.gradients(grad_output))
