r"""Monte Carlo estimators of :math:`\nabla_\theta \mathbb{E}_{p(x;\theta)}[f(x)]`.

Three families (Mohamed, Rosca, Figurnov and Mnih 2020):

* :func:`score_function` differentiates the density: :math:`f(x)\nabla_\theta\log p(x;\theta)`.
* :func:`pathwise` differentiates the cost along a sampling path:
  :math:`\nabla_\theta f(g(\epsilon;\theta))`.
* :func:`measure_valued` differentiates the measure: :math:`c_\theta\,(f(x^+) - f(x^-))`.

Each returns *per-sample* estimates, a dict keyed by the distribution's parameter names, each of
shape ``(num_samples, *param.shape)``; the mean over dim 0 is an unbiased estimate and the
spread over dim 0 is the per-sample variance. :func:`~gradkit.autodiff.expectation` wires any
registered estimator into autograd. All three are registered in ``gk.ESTIMATORS``
(:mod:`gradkit.registry`).

Shapes. ``f`` maps samples of shape ``(S, *batch_shape, *event_shape)`` to ``(S, *T)``; the
target is the gradient of :math:`\mathbb{E}[f]` summed over ``T``. **Independence is declared,
never guessed**: by default (``plate=False``) every output element may depend on every sample
coordinate, and the estimate is unbiased for any ``f``. With ``plate=True`` the caller declares
that ``f`` returns ``(S, *batch_shape)`` and that output element ``b`` depends only on
``x[:, b]``; then each parameter element is credited only with its own element's cost (lower
variance), and the measure-valued estimator perturbs one event coordinate for the whole batch
at once. ``generator`` (a ``torch.Generator``) supplies all of a call's randomness.

Keys and shapes follow the tensors the distribution stores: torch broadcasts ``Normal``'s
``loc`` and ``scale`` to the batch shape, so a scalar ``scale`` shared by a batch of three has
per-sample estimates of shape ``(S, 3)``, one per element it was broadcast to; their sum over
the batch is the estimate for the scalar (which is what :func:`~gradkit.autodiff.expectation`
sends to it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution

from gradkit import weak_derivatives as _weak_derivatives  # noqa: F401 (registers it)
from gradkit._engine import closed_form_scores, flat_index, gradients, log_prob, resolve
from gradkit.baselines import Baseline, Constant
from gradkit.registry import ESTIMATORS, Estimator, Problem, register_estimator

__all__ = [
    "Pathwise",
    "PathwiseEstimator",
    "ScoreFunction",
    "measure_valued",
    "pathwise",
    "score",
    "score_function",
]

CostFn = Callable[[Tensor], Tensor]


def score(dist: Distribution, x: Tensor) -> dict[str, Tensor]:
    r"""Per-sample scores :math:`\nabla_\theta \log p(x_s;\theta)` for every parameter.

    One vectorised backward pass, no Python loop over samples: the parameters are copied once
    per sample, ``(S, *param.shape)``, the distribution is rebuilt from the copies, and the
    summed log-density is differentiated; sample ``s`` only touches copy ``s``. This equals
    ``torch.func.vmap(torch.func.grad(log_prob))`` over the samples (a test checks it) and
    runs about twice as fast. Batch elements are independent, so the gradient of the summed
    log-density gives each element's own score, laid out like the parameter.

    Args:
        dist: the distribution.
        x: samples of shape ``(S, *dist.batch_shape, *dist.event_shape)``.

    Returns:
        dict name -> tensor of shape ``(S, *param.shape)``.

    Example:
        >>> import torch, gradkit as gk
        >>> d = torch.distributions.Normal(torch.tensor(0.0), torch.tensor(1.0))
        >>> s = gk.score(d, torch.tensor([1.0, -2.0]))
        >>> s["loc"], s["scale"]  # (x - mu)/sigma^2 and ((x - mu)^2 - sigma^2)/sigma^3
        (tensor([ 1., -2.]), tensor([0., 3.]))
    """
    resolved = resolve(dist)
    x = x.detach()
    return gradients(resolved, lambda d: log_prob(d, x), list(resolved.params), x.shape[0])


def _as_baseline(baseline: object) -> Baseline | None:
    if baseline is None or isinstance(baseline, Baseline):
        return baseline
    from gradkit.control_variates import ControlVariate

    if isinstance(baseline, ControlVariate):
        raise TypeError(
            f"{type(baseline).__name__} is a control variate, not a baseline: pass it as "
            "control_variate=..., which works with every estimator"
        )
    return Constant(baseline)  # type: ignore[arg-type]


@register_estimator("score_function")
class ScoreFunction(Estimator):
    r"""The score-function (REINFORCE, likelihood-ratio) estimator.

    Rows: :math:`(f(x_s) - b_s)\,\nabla_\theta \log p(x_s;\theta)`, one per sample. In
    :func:`~gradkit.autodiff.expectation` only the mean is needed, and it is computed as the
    gradient of :math:`\frac1S\sum_s (f(x_s) - b_s) \log p(x_s;\theta)` at the parameters
    themselves: memory and time of ``O(parameter size + samples x batch)`` (no per-sample copies)
    unless the baseline needs per-sample scores (:class:`gradkit.baselines.OptimalConstant`).
    """

    def check(self, problem: Problem, **options: Any) -> None:
        moving = [name for name in problem.resolved.support if name in problem.names]
        if moving:
            raise ValueError(
                f"the score-function estimator is biased for "
                f"{type(problem.resolved.base).__name__} parameter(s) {moving}: they move the "
                "support, so the density is not differentiable at its edge. Use "
                "gk.measure_valued (it has weak derivatives for such parameters) or a "
                "reparameterisation with gk.pathwise"
            )

    def prepare(self, problem: Problem, *, baseline: Any = None) -> Any:
        b = _as_baseline(baseline)
        if b is None:
            return None
        scores = problem.scores() if b.needs_scores else {}
        return b(problem.forward_signal, scores)

    def finish(self, problem: Problem, *, baseline: Any = None) -> None:
        if isinstance(baseline, Baseline):
            baseline.update(problem.forward_signal)

    def _centred(self, problem: Problem) -> Tensor:
        """The signal less the baseline, ``(S, *plate_shape)``."""
        signal = problem.signal
        b = problem.prepared
        if isinstance(b, Tensor):
            signal = signal - problem.to_signal_units(b)
        return signal

    def _per_parameter(self, problem: Problem) -> dict[str, Tensor]:
        """Rows for a per-parameter baseline (a dict, e.g. the optimal constant)."""
        b = problem.prepared
        scores = problem.scores()
        out = {}
        for name, s in scores.items():
            if not problem.resolved.batch_first[name] and problem.plate:
                raise ValueError(
                    f"a per-parameter baseline needs batch-first parameters under a plate, "
                    f"but {name!r} has shape {tuple(problem.resolved.params[name].shape)}; "
                    "broadcast the parameters to the batch shape"
                )
            weights = problem.broadcast(problem.signal, name)
            out[name] = (weights - problem.to_signal_units(b[name], name)) * s
        return out

    def estimate(self, problem: Problem, *, baseline: Any = None) -> dict[str, Tensor]:
        if isinstance(problem.prepared, dict):
            return self._per_parameter(problem)
        centred, x = self._centred(problem), problem.x
        closed = closed_form_scores(problem.resolved, x, problem.names)
        if closed is not None and all(problem.resolved.batch_first[n] for n in closed):
            return {n: problem.broadcast(centred, n) * s for n, s in closed.items()}
        weights = problem.broadcast(centred)
        return problem.per_sample_gradients(lambda d: weights * log_prob(d, x))

    def mean_gradient(self, problem: Problem, *, baseline: Any = None) -> dict[str, Tensor]:
        if isinstance(problem.prepared, dict):
            return {n: v.mean(0) for n, v in self._per_parameter(problem).items()}
        centred, x = self._centred(problem), problem.x
        resolved = problem.resolved
        if all(resolved.batch_first[n] for n in problem.names):
            if type(resolved.base) is Categorical and problem.names == ["logits"]:
                return {"logits": _categorical_logits_mean(resolved.base, x, centred, problem)}
            closed = closed_form_scores(resolved, x, problem.names)
            if closed is not None and type(resolved.base) is not Categorical:
                return {n: (problem.broadcast(centred, n) * s).mean(0) for n, s in closed.items()}
        weights = problem.broadcast(centred) / problem.num_samples
        return problem.summed_gradients(lambda d: weights * log_prob(d, x))


def _categorical_logits_mean(
    base: Categorical, x: Tensor, centred: Tensor, problem: Problem
) -> Tensor:
    r""":math:`\frac1S\sum_s w_s(\mathbf{1}[x_s] - \pi)` without forming ``S`` one-hot tables.

    The weights are scattered into a table-sized tensor: memory ``O(parameter size + S x
    batch)``, where the per-sample scores would take ``S x parameter size``.
    """
    logits = base.logits
    batch = tuple(base.batch_shape)
    # the signal (S, *plate) padded against the base's batch (Independent adds dimensions)
    extra = len(batch) - (centred.dim() - 1)
    weights = centred.reshape(*centred.shape, *([1] * extra)).expand(x.shape).to(logits.dtype)
    table = torch.zeros(math.prod(batch) * logits.shape[-1], dtype=logits.dtype, device=x.device)
    table.index_add_(0, flat_index(x, batch, logits.shape[-1]).reshape(-1), weights.reshape(-1))
    total = weights.sum(0).unsqueeze(-1)  # (*B, 1)
    return (table.reshape(logits.shape) - total * base.probs.detach()) / x.shape[0]


class PathwiseEstimator(Estimator):
    """Base of the estimators that differentiate the cost along a sampling path.

    A subclass implements ``path``; the per-sample rows come from one backward pass through
    per-sample copies of the parameters, with the path redrawn in the call's forward stream so
    that its values are the forward samples (a mismatch is an error, never a wrong number).
    """

    reparameterised = True
    benefits_from_plate = False

    def sample(self, problem: Problem) -> Tensor:
        with torch.no_grad(), problem.forward_randomness():
            return self.path(problem.dist, (problem.num_samples,), **problem.options)

    def estimate(self, problem: Problem, **options: Any) -> dict[str, Tensor]:
        def signal(rebuilt: Distribution) -> Tensor:
            with problem.forward_randomness():
                x = self.path(rebuilt, (), **options)
            if problem.has_forward and not torch.allclose(
                x.detach(), problem.x, rtol=1e-5, atol=1e-6
            ):
                raise RuntimeError(
                    f"the {self.name} estimator redrew its samples from per-sample copies of "
                    f"the parameters and got other values than the forward pass: "
                    f"{type(problem.dist).__name__}'s sampler draws differently for a batched "
                    "distribution. Report this with the distribution; use "
                    "gk.expectation(..., estimator='pathwise') without control_variate"
                )
            return problem.signal_with_grad(x)

        return problem.per_sample_gradients(signal)


@register_estimator("pathwise")
class Pathwise(PathwiseEstimator):
    r"""The pathwise (reparameterisation) estimator: :math:`\nabla_\theta f(g(\epsilon;\theta))`."""

    def check(self, problem: Problem, **options: Any) -> None:
        if not problem.dist.has_rsample:
            raise ValueError(
                f"the pathwise estimator needs a reparameterisable distribution, but "
                f"{type(problem.dist).__name__} has no rsample (has_rsample=False). Use "
                "gk.score_function or gk.measure_valued, estimator='implicit_pathwise' for a "
                "scalar distribution with a CDF, or a continuous relaxation "
                "(estimator='gumbel_softmax')"
            )

    def path(self, dist: Distribution, sample_shape: tuple[int, ...], **options: Any) -> Tensor:
        return dist.rsample(torch.Size(sample_shape))


def _unknown(name: str, unknown: dict[str, Any]) -> None:
    if unknown:
        ESTIMATORS[name].validate(unknown)  # raises the TypeError that lists the options


def score_function(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    *,
    baseline: Any = None,
    control_variate: Any = None,
    plate: bool = False,
    generator: torch.Generator | None = None,
    **unknown: Any,
) -> dict[str, Tensor]:
    r"""Score-function (REINFORCE, likelihood-ratio) gradient estimates.

    Approximates :math:`\nabla_\theta \mathbb{E}_{p(x;\theta)}[f(x)]` with
    :math:`(f(x_s) - b)\,\nabla_\theta \log p(x_s;\theta)`, :math:`x_s \sim p(x;\theta)`
    (Williams 1992; Glynn 1990). Unbiased for any baseline ``b`` that does not depend on
    :math:`x_s`. Requires only that ``f`` can be evaluated (not differentiated) and that
    ``log_prob`` is differentiable in the parameters on a support that does not move with them.

    Args:
        f: cost, samples ``(S, *batch, *event)`` -> values ``(S, *T)``.
        dist: any ``torch.distributions.Distribution``.
        num_samples: number of samples ``S`` (>= 1).
        baseline: ``None``, a number or tensor (a constant baseline), or a
            :class:`gradkit.baselines.Baseline`; a stateful one is updated once, after use.
        control_variate: a :class:`gradkit.control_variates.ControlVariate`.
        plate: declare that ``f`` returns ``(S, *batch_shape)`` with element ``b`` depending
            only on ``x[:, b]`` (each parameter element is then credited with its own cost).
        generator: a ``torch.Generator`` for all of the call's randomness.

    Returns:
        dict parameter name -> per-sample estimates of shape ``(S, *param.shape)``.

    Raises:
        ValueError: for a parameter that moves the support (``Uniform`` bounds), a bad
            ``num_samples``, a wrong output shape from ``f``, or NaN/inf in ``f``.
        TypeError: for a non-distribution, non-floating parameters or an unknown option.

    Example:
        >>> import torch, gradkit as gk
        >>> d = torch.distributions.Normal(torch.tensor(1.0), torch.tensor(1.0))
        >>> gen = torch.Generator().manual_seed(0)
        >>> g = gk.score_function(lambda x: x**2, d, 100_000, generator=gen)  # 2 mu = 2
        >>> round(g["loc"].mean().item(), 1)
        2.0
    """
    _unknown("score_function", unknown)
    return ESTIMATORS["score_function"](
        f,
        dist,
        num_samples,
        baseline=baseline,
        control_variate=control_variate,
        plate=plate,
        generator=generator,
    )


def pathwise(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    *,
    control_variate: Any = None,
    plate: bool = False,
    generator: torch.Generator | None = None,
    **unknown: Any,
) -> dict[str, Tensor]:
    r"""Pathwise (reparameterisation) gradient estimates.

    Approximates :math:`\nabla_\theta \mathbb{E}_{p(x;\theta)}[f(x)]` with
    :math:`\nabla_\theta f(g(\epsilon_s;\theta))`, where ``dist.rsample`` realises
    :math:`x = g(\epsilon;\theta)` (Kingma and Welling 2014; Rezende et al. 2014; implicit
    reparameterisation for Gamma/Beta, Figurnov et al. 2018). Requires ``f`` differentiable
    almost everywhere *and* continuous: for a step function the estimate is zero almost surely
    and therefore wrong.

    Per-sample gradients come from one backward pass: the parameters are expanded to
    ``(S, *param.shape)`` copies, so sample ``s`` only touches copy ``s``. The estimate is the
    same with or without ``plate`` (autograd follows the real dependence).

    Args:
        f: differentiable cost, samples ``(S, *batch, *event)`` -> values ``(S, *T)``.
        dist: a distribution with ``has_rsample``.
        num_samples: number of samples ``S`` (>= 1).
        control_variate: a :class:`gradkit.control_variates.ControlVariate`.
        plate: declare one cost per batch element (checked; see :func:`score_function`).
        generator: a ``torch.Generator`` for all of the call's randomness.

    Returns:
        dict parameter name -> per-sample estimates of shape ``(S, *param.shape)``.

    Raises:
        ValueError: for a distribution without ``rsample``, a bad ``num_samples``, a wrong
            output shape from ``f``, or NaN/inf in ``f``.

    Example:
        >>> import torch, gradkit as gk
        >>> d = torch.distributions.Normal(torch.tensor(1.0), torch.tensor(2.0))
        >>> g = gk.pathwise(lambda x: x, d, 5)  # d/dmu E[x] = 1 exactly, per sample
        >>> g["loc"]
        tensor([1., 1., 1., 1., 1.])
    """
    _unknown("pathwise", unknown)
    return ESTIMATORS["pathwise"](
        f, dist, num_samples, control_variate=control_variate, plate=plate, generator=generator
    )


def measure_valued(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    *,
    coupling: bool = True,
    wrt: Sequence[str] | None = None,
    control_variate: Any = None,
    plate: bool = False,
    generator: torch.Generator | None = None,
    **unknown: Any,
) -> dict[str, Tensor]:
    r"""Measure-valued (weak-derivative) gradient estimates.

    Each scalar parameter :math:`\theta_i` has a weak derivative
    :math:`\partial_{\theta_i} p = c_{\theta_i}(p^+_i - p^-_i)` with probability measures
    :math:`p^\pm_i` (Pflug 1989; Heidergott and Vázquez-Abad 2008), giving the estimate
    :math:`c_{\theta_i}(f(x^+) - f(x^-))`, where :math:`x^\pm` equal the sample except in the
    coordinate that :math:`\theta_i` governs, which is drawn from :math:`p^\pm_i`. ``f`` need
    not be differentiable. With ``coupling=True`` the two draws share their randomness (and
    the other coordinates), which lowers the variance. The weak derivatives come from the
    registry in :mod:`gradkit.weak_derivatives` (add one with
    :func:`~gradkit.weak_derivatives.register_weak_derivative`).

    Cost: two evaluations of ``f`` per parameter coordinate and sample. Under a declared plate
    (``plate=True``: ``f`` returns ``(S, *batch_shape)``, element ``b`` depending only on
    ``x[:, b]``) one coordinate is perturbed for the whole batch at once, so the cost grows with
    the event size, not with batch x event. The perturbed evaluations are batched along a
    leading dimension of ``f``'s input, in chunks.

    Args:
        f: cost, samples ``(..., S, *batch, *event)`` -> values ``(..., S, *T)``; it must
            broadcast over extra leading dimensions.
        dist: a distribution whose parameters all have registered weak derivatives.
        num_samples: number of samples ``S`` (>= 1).
        coupling: share random numbers between the positive and negative parts.
        wrt: names of the parameters to differentiate. By default all of them, except that a
            parameter with no registered weak derivative which does not require grad (Gamma's
            ``concentration``) is left out of the result.
        control_variate: a :class:`gradkit.control_variates.ControlVariate`.
        plate: declare one cost per batch element.
        generator: a ``torch.Generator`` for all of the call's randomness (the samples and the
            perturbations).

    Returns:
        dict parameter name -> per-sample estimates of shape ``(S, *param.shape)``.

    Raises:
        NotImplementedError: for a (distribution, parameter) pair with no registered weak
            derivative that has to be differentiated; the message lists what is registered.

    Example:
        >>> import torch, gradkit as gk
        >>> d = torch.distributions.Normal(torch.tensor(1.0), torch.tensor(1.0))
        >>> gen = torch.Generator().manual_seed(0)
        >>> g = gk.measure_valued(lambda x: x**2, d, 20_000, generator=gen)  # 2 mu, 2 sigma
        >>> round(g["loc"].mean().item(), 1), round(g["scale"].mean().item(), 1)
        (2.0, 2.0)
    """
    _unknown("measure_valued", unknown)
    return ESTIMATORS["measure_valued"](
        f,
        dist,
        num_samples,
        coupling=coupling,
        wrt=wrt,
        control_variate=control_variate,
        plate=plate,
        generator=generator,
    )
