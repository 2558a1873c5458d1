r"""Monte Carlo estimators of :math:`\nabla_\theta \mathbb{E}_{p(x;\theta)}[f(x)]`.

Three families (Mohamed, Rosca, Figurnov and Mnih 2020):

* :func:`score_function` differentiates the density: :math:`f(x)\nabla_\theta\log p(x;\theta)`.
* :func:`pathwise` differentiates the cost along a sampling path:
  :math:`\nabla_\theta f(g(\epsilon;\theta))`.
* :func:`measure_valued` differentiates the measure: :math:`c_\theta\,(f(x^+) - f(x^-))`.

Each returns *per-sample* estimates, a dict keyed by the distribution's parameter names, each of
shape ``(num_samples, *param.shape)``; the mean over dim 0 is an unbiased estimate and the
spread over dim 0 is the per-sample variance. :func:`expectation` wires any of them into
autograd.

Shapes. ``f`` maps samples of shape ``(S, *batch_shape, *event_shape)`` to ``(S, *T)``; the
target is the gradient of :math:`\mathbb{E}[f]` summed over ``T``. Batch dimensions are a plate:
when ``T == batch_shape``, output element ``b`` may depend only on ``x[:, b]``, and each
parameter element is credited only with its own element's cost (lower variance, and the
measure-valued estimator perturbs one event coordinate for the whole batch at once).
Otherwise every element is treated as coupled to every other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from gradkit import _checks
from gradkit.baselines import Baseline, Constant
from gradkit.control_variates import ControlVariate
from gradkit.distributions import base_distribution, parameters, rebuild, support_parameters

__all__ = ["ESTIMATORS", "expectation", "measure_valued", "pathwise", "score", "score_function"]

CostFn = Callable[[Tensor], Tensor]


def is_plate(dist: Distribution, fx: Tensor, lead: int = 1) -> bool:
    """Whether ``f``'s output has one value per batch element (the plate case).

    Also requires every parameter to be laid out batch-first (torch broadcasts them so), so
    that parameter element ``(b, ...)`` belongs to batch element ``b``.
    """
    batch = tuple(dist.batch_shape)
    if tuple(fx.shape[lead:]) != batch:
        return False
    return all(tuple(p.shape[: len(batch)]) == batch for p in parameters(dist).values())


def signal_for(dist: Distribution, fx: Tensor, lead: int = 1) -> Tensor:
    """The learning signal: ``fx`` per batch element (plate) or summed over ``T`` (coupled)."""
    if is_plate(dist, fx, lead):
        return fx
    return fx.reshape(*fx.shape[:lead], -1).sum(-1)


def align(signal: Tensor, param: Tensor, batch_ndim: int) -> Tensor:
    """Reshape a signal ``(S, *B)`` to broadcast against per-sample estimates ``(S, *param)``.

    ``B`` is either the batch shape (plate) or empty (coupled); parameter dimensions past
    ``B`` (event or category dimensions) get singleton axes.
    """
    extra = param.dim() - 1 - batch_ndim
    return signal.reshape(*signal.shape, *([1] * extra))


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
    num = x.shape[0]
    # inference_mode(False): the estimators work under torch.inference_mode() too
    with torch.inference_mode(False), torch.enable_grad():
        copies = {
            name: p.detach().expand(num, *p.shape).clone().requires_grad_()
            for name, p in parameters(dist).items()
        }
        log_density = rebuild(dist, copies).log_prob(x.detach().clone()).sum()
        grads = torch.autograd.grad(log_density, list(copies.values()), allow_unused=True)
    return {
        name: torch.zeros_like(c).detach() if g is None else g
        for (name, c), g in zip(copies.items(), grads, strict=True)
    }


def _check_support(dist: Distribution, names: list[str]) -> None:
    moving = [name for name in support_parameters(dist) if name in names]
    if moving:
        raise ValueError(
            f"the score-function estimator is biased for {type(dist).__name__} parameter(s) "
            f"{moving}: they move the support, so the density is not differentiable at its "
            "edge. Use gk.measure_valued (it has weak derivatives for such parameters) or a "
            "reparameterisation with gk.pathwise"
        )


def score_function_estimates(
    dist: Distribution,
    x: Tensor,
    fx: Tensor,
    baseline: Any = None,
    f: CostFn | None = None,
    scores: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per-sample score-function estimates from samples ``x`` and costs ``fx = f(x)``."""
    params = parameters(dist)
    _check_support(dist, list(params))
    if scores is None:
        scores = score(dist, x)
    signal = signal_for(dist, fx.detach())
    batch_ndim = signal.dim() - 1
    b: Tensor | dict[str, Tensor] = torch.zeros_like(signal)
    if baseline is not None and not isinstance(baseline, ControlVariate):
        if not isinstance(baseline, Baseline):
            baseline = Constant(baseline)
        b = baseline(signal, scores)
    out = {}
    for name, s in scores.items():
        b_name = b[name] if isinstance(b, dict) else align(b, s, batch_ndim)
        out[name] = (align(signal, s, batch_ndim) - b_name) * s
    if isinstance(baseline, ControlVariate):
        if f is None:
            raise ValueError("a control variate needs the cost function f")
        out = baseline.adjust(f, dist, x, signal, scores, out)
    return out


def score_function(
    f: CostFn, dist: Distribution, num_samples: int, *, baseline: Any = None
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
        baseline: ``None``, a number or tensor (a constant baseline), a
            :class:`gradkit.baselines.Baseline`, or a
            :class:`gradkit.control_variates.ControlVariate`.

    Returns:
        dict parameter name -> per-sample estimates of shape ``(S, *param.shape)``.

    Raises:
        ValueError: for a parameter that moves the support (``Uniform`` bounds), a bad
            ``num_samples``, a wrong output shape from ``f``, or NaN/inf in ``f``.
        TypeError: for a non-distribution or non-floating parameters.

    Example:
        >>> import torch, gradkit as gk
        >>> _ = torch.manual_seed(0)
        >>> d = torch.distributions.Normal(torch.tensor(1.0), torch.tensor(1.0))
        >>> g = gk.score_function(lambda x: x**2, d, 100_000)  # d/dmu E[x^2] = 2 mu = 2
        >>> round(g["loc"].mean().item(), 1)
        2.0
    """
    _checks.check_distribution(dist)
    _checks.check_num_samples(num_samples)
    parameters(dist)  # validates parameter dtypes before sampling
    with torch.no_grad():
        x = dist.sample((num_samples,))
        fx = _checks.evaluate(f, x, (num_samples,))
    return score_function_estimates(dist, x, fx, baseline, f)


def _require_rsample(dist: Distribution) -> None:
    if not dist.has_rsample:
        raise ValueError(
            f"the pathwise estimator needs a reparameterisable distribution, but "
            f"{type(dist).__name__} has no rsample (has_rsample=False). Use "
            "gk.score_function or gk.measure_valued, or a continuous relaxation "
            "(torch.distributions.RelaxedBernoulli / RelaxedOneHotCategorical)"
        )


def pathwise(f: CostFn, dist: Distribution, num_samples: int) -> dict[str, Tensor]:
    r"""Pathwise (reparameterisation) gradient estimates.

    Approximates :math:`\nabla_\theta \mathbb{E}_{p(x;\theta)}[f(x)]` with
    :math:`\nabla_\theta f(g(\epsilon_s;\theta))`, where ``dist.rsample`` realises
    :math:`x = g(\epsilon;\theta)` (Kingma and Welling 2014; Rezende et al. 2014; implicit
    reparameterisation for Gamma/Beta, Figurnov et al. 2018). Requires ``f`` differentiable
    almost everywhere *and* continuous: for a step function the estimate is zero almost surely
    and therefore wrong.

    Per-sample gradients come from one backward pass: the parameters are expanded to
    ``(S, *param.shape)`` copies, so sample ``s`` only touches copy ``s``.

    Args:
        f: differentiable cost, samples ``(S, *batch, *event)`` -> values ``(S, *T)``.
        dist: a distribution with ``has_rsample``.
        num_samples: number of samples ``S`` (>= 1).

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
    _checks.check_distribution(dist)
    _checks.check_num_samples(num_samples)
    _require_rsample(dist)
    params = parameters(dist)
    with torch.inference_mode(False), torch.enable_grad():
        copies = {
            name: p.detach().expand(num_samples, *p.shape).clone().requires_grad_()
            for name, p in params.items()
        }
        x = rebuild(dist, copies).rsample()
        fx = _checks.evaluate(f, x, (num_samples,))
        names = list(copies)
        if not fx.requires_grad:  # f is piecewise constant (a step): its gradient is zero
            return {n: torch.zeros_like(c).detach() for n, c in copies.items()}
        grads = torch.autograd.grad(fx.sum(), [copies[n] for n in names], allow_unused=True)
    return {
        n: torch.zeros_like(copies[n]) if g is None else g.detach()
        for n, g in zip(names, grads, strict=True)
    }


def _measure_valued_targets(dist: Distribution, wrt: Sequence[str] | None) -> list[str] | None:
    """Which parameters the measure-valued estimator differentiates (``None``: all of them).

    By default, a parameter without a registered weak derivative (Gamma's concentration) is
    left out when it does not require grad, so a distribution with one registered parameter
    can still be used; a parameter that requires grad but has no weak derivative is an error.
    """
    from gradkit.weak_derivatives import _lookup

    if wrt is not None:
        return list(wrt)
    params = parameters(dist)
    base, _ = base_distribution(dist)
    registered = []
    for name in params:
        try:
            _lookup(type(base), name)
            registered.append(name)
        except NotImplementedError:
            if params[name].requires_grad:
                raise  # the registry's error names the pair and lists what is registered
    if not registered:
        _lookup(type(base), next(iter(params)))  # raises: nothing to differentiate
    return None if len(registered) == len(params) else registered


def measure_valued(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    *,
    coupling: bool = True,
    wrt: Sequence[str] | None = None,
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

    Cost: two evaluations of ``f`` per parameter coordinate and sample; in the plate case
    (``f`` returns ``(S, *batch_shape)``) one coordinate is perturbed for the whole batch at
    once, so the cost grows with the event size, not with batch x event. The perturbed
    evaluations are batched along a leading dimension of ``f``'s input, in chunks.

    Args:
        f: cost, samples ``(..., S, *batch, *event)`` -> values ``(..., S, *T)``; it must
            broadcast over extra leading dimensions.
        dist: a distribution whose parameters all have registered weak derivatives.
        num_samples: number of samples ``S`` (>= 1).
        coupling: share random numbers between the positive and negative parts.
        wrt: names of the parameters to differentiate. By default all of them, except that a
            parameter with no registered weak derivative which does not require grad (Gamma's
            ``concentration``) is left out of the result.

    Returns:
        dict parameter name -> per-sample estimates of shape ``(S, *param.shape)``.

    Raises:
        NotImplementedError: for a (distribution, parameter) pair with no registered weak
            derivative that has to be differentiated; the message lists what is registered.

    Example:
        >>> import torch, gradkit as gk
        >>> _ = torch.manual_seed(0)
        >>> d = torch.distributions.Normal(torch.tensor(1.0), torch.tensor(1.0))
        >>> g = gk.measure_valued(lambda x: x**2, d, 20_000)  # exact: 2 mu = 2, 2 sigma = 2
        >>> round(g["loc"].mean().item(), 1), round(g["scale"].mean().item(), 1)
        (2.0, 2.0)
    """
    from gradkit.weak_derivatives import measure_valued_estimates

    _checks.check_distribution(dist)
    _checks.check_num_samples(num_samples)
    parameters(dist)
    with torch.no_grad():
        x = dist.sample((num_samples,))
        fx = _checks.evaluate(f, x, (num_samples,))
    targets = _measure_valued_targets(dist, wrt)
    return measure_valued_estimates(f, dist, x, fx, coupling=coupling, wrt=targets)


ESTIMATORS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "score_function": score_function,
    "pathwise": pathwise,
    "measure_valued": measure_valued,
}


def expectation(
    f: CostFn,
    dist: Distribution,
    num_samples: int,
    *,
    estimator: str = "pathwise",
    **options: Any,
) -> Tensor:
    r"""Monte Carlo estimate of :math:`\mathbb{E}_{p(x;\theta)}[f(x)]` that autograd differentiates.

    The value is the sample mean of ``f`` (shape ``T``). Calling ``backward()`` on anything
    computed from it sends the chosen estimator's gradient to whatever produced the
    distribution's parameters (an encoder, a policy network), while tensors used inside ``f``
    (a decoder's weights) get their ordinary gradient at the sampled points. If ``f`` itself
    depends on the parameters (an entropy term), that direct dependence is differentiated too.

    Any output shape ``T`` works with every estimator, and the gradient is exact for any
    upstream gradient: the score-function and measure-valued parts are computed in the backward
    pass for the cost contracted with it, :math:`\sum_t g_t f_t(x)`. When ``T`` equals the
    batch shape each output element is credited only to its own batch element (a plate). For
    the measure-valued estimator, the perturbed evaluations of ``f`` run in the backward pass.

    Args:
        f: cost, samples ``(S, *batch, *event)`` -> ``(S, *T)``.
        dist: the distribution, built from tensors that may require grad.
        num_samples: number of samples ``S``.
        estimator: ``"pathwise"``, ``"score_function"`` or ``"measure_valued"``.
        **options: passed to the estimator (``baseline=`` for the score function,
            ``coupling=`` for the measure-valued estimator).

    Example:
        >>> import torch, gradkit as gk
        >>> mu = torch.tensor(1.0, requires_grad=True)
        >>> d = torch.distributions.Normal(mu, torch.tensor(1.0))
        >>> gk.expectation(lambda x: 2 * x, d, 10).backward()  # d/dmu E[2x] = 2
        >>> round(mu.grad.item(), 4)
        2.0
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
    allowed = {"pathwise": set(), "score_function": {"baseline"}, "measure_valued": {"coupling"}}
    unknown = set(options) - allowed[estimator]
    if unknown:
        raise TypeError(
            f"estimator {estimator!r} takes options {sorted(allowed[estimator]) or 'none'}, "
            f"got {sorted(unknown)}"
        )
    _checks.check_distribution(dist)
    _checks.check_num_samples(num_samples)
    params = parameters(dist)
    if estimator == "pathwise":
        _require_rsample(dist)
        x = dist.rsample((num_samples,))
        return _checks.evaluate(f, x, (num_samples,)).mean(0)

    with torch.no_grad():
        x = dist.sample((num_samples,))
    fx = _checks.evaluate(f, x, (num_samples,))
    value = fx.mean(0)
    names = [name for name, theta in params.items() if theta.requires_grad]
    if not names:
        return value
    surrogate = _EstimatorGradient.apply(
        _Backward(f, dist, x, fx.detach(), estimator, options, names),
        *(params[name] for name in names),
    )
    return value + surrogate


class _Backward:
    r"""The estimator's gradient for an upstream gradient ``g`` of the expectation's value.

    ``backward`` receives ``g`` of shape ``T``; the gradient of :math:`\sum_t g_t
    \mathbb{E}[f_t]` is the chosen estimator applied to the contracted cost
    :math:`\sum_t g_t f_t(x)`, which keeps the plate structure when ``T == batch_shape``
    (then it is ``g_b f_b``, one value per batch element). The score function reuses the
    samples' costs; the measure-valued estimator evaluates the contracted cost at the
    perturbed points.
    """

    def __init__(
        self,
        f: CostFn,
        dist: Distribution,
        x: Tensor,
        fx: Tensor,
        estimator: str,
        options: dict[str, Any],
        names: list[str],
    ) -> None:
        self.f, self.dist, self.x, self.fx = f, dist, x, fx
        self.estimator, self.options, self.names = estimator, options, names
        self.shape = fx.shape[1:]
        self.plate = is_plate(dist, fx)
        self.scores: dict[str, Tensor] | None = None
        self.baseline: Tensor | dict[str, Tensor] | None = None
        self.targets: list[str] | None = None
        baseline = options.get("baseline")
        if estimator == "measure_valued":
            # resolved now, so an unregistered parameter fails in the forward pass
            targets = _measure_valued_targets(dist, options.get("wrt"))
            self.targets = targets if targets is None else [n for n in targets if n in names]
        if estimator == "score_function":
            _check_support(dist, names)
            self.scores = score(dist, x)
            if baseline is not None and not isinstance(baseline, ControlVariate):
                # Baselines see f in its own units, once per forward pass (a moving average
                # is updated here, whatever the loss later does with the value).
                if not isinstance(baseline, Baseline):
                    baseline = Constant(baseline)
                self.baseline = baseline(signal_for(dist, fx), self.scores)

    def contract(self, values: Tensor, g: Tensor, lead: int) -> Tensor:
        weighted = values * g
        if self.plate:
            return weighted  # one value per batch element: the plate structure is kept
        return weighted.reshape(*weighted.shape[:lead], -1).sum(-1)

    def weighted_baseline(self, g: Tensor) -> Any:
        """The forward pass's baseline (in units of ``f``), weighted like the contracted cost."""
        if self.baseline is None:
            return self.options.get("baseline")  # None or a control variate
        b = self.baseline
        if not self.plate:  # one baseline for the cost summed over T
            weight = g.mean()
            return _Fixed(
                {k: v * weight for k, v in b.items()} if isinstance(b, dict) else b * weight
            )
        if isinstance(b, dict):
            return _Fixed(
                {k: v * g.reshape(*g.shape, *[1] * (v.dim() - 1 - g.dim())) for k, v in b.items()}
            )
        return _Fixed(b * g)

    def gradients(self, g: Tensor) -> list[Tensor]:
        g = g.detach()

        def contracted(x: Tensor) -> Tensor:
            fx = self.f(x)
            return self.contract(fx, g, fx.dim() - len(self.shape))

        fx = self.contract(self.fx, g, 1)
        with torch.no_grad():
            if self.estimator == "score_function":
                grads = score_function_estimates(
                    self.dist, self.x, fx, self.weighted_baseline(g), contracted, self.scores
                )
            else:
                from gradkit.weak_derivatives import measure_valued_estimates

                grads = measure_valued_estimates(
                    contracted,
                    self.dist,
                    self.x,
                    fx,
                    coupling=self.options.get("coupling", True),
                    wrt=self.targets,
                )
        return [grads[name].mean(0) for name in self.names]


class _Fixed(Baseline):
    """A baseline computed earlier (per sample, or per parameter as a dict)."""

    def __init__(self, value: Tensor | dict[str, Tensor]) -> None:
        self.fixed = value

    def value(self, signal: Tensor, scores: Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
        return self.fixed


class _EstimatorGradient(torch.autograd.Function):
    """Zero in the forward pass; the estimator's gradient for the parameters in backward."""

    @staticmethod
    def forward(ctx: Any, backward: _Backward, *thetas: Tensor) -> Tensor:
        ctx.estimator = backward
        return thetas[0].new_zeros(backward.shape)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return (None, *ctx.estimator.gradients(grad_output))
