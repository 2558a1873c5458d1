r"""Estimators for discrete latent variables: ARM, DisARM, straight-through and enumeration.

For a Bernoulli variable :math:`z \sim \mathrm{Bern}(\sigma(\phi))` the score function is the
only general estimator of :math:`\nabla_\phi \mathbb{E}[f(z)]` that needs nothing of ``f``;
the estimators here use the structure of the discrete variable instead. All are registered in
``gk.ESTIMATORS`` and work with :func:`~gradkit.autodiff.expectation` and ``plate=``:

* ``arm`` (Yin and Zhou 2019) and ``disarm`` (Dong, Mnih and Tucker 2020; Yin et al. 2020)
  draw antithetic pairs from one uniform :math:`u` and difference the cost over the pair;
  ``num_samples`` counts the draws (an even number, two per pair) and the rows are one per pair.
* ``straight_through`` (Bengio, Léonard and Courville 2013) evaluates ``f`` at the discrete
  sample and passes the gradient of the sample's mean back: biased by design.
* ``indecater`` (De Smet et al. 2023) sums every category of each categorical variable
  exactly while the others stay at the sample.
* :func:`vimco` (Mnih and Rezende 2016) estimates another objective, the multi-sample bound
  :math:`\log \frac1K \sum_k e^{f(z_k)}`, so it is a function of its own.
* ``gumbel_rao`` (Paulus, Maddison and Krause 2021) averages the straight-through
  Gumbel-softmax gradient over the noise conditioned on the sample: biased by design.
* ``enumerate`` sums ``f`` over every state of a small discrete site, exactly (no variance),
  with ``f`` evaluated with gradients on, so that parameters inside ``f`` get their exact
  gradients too, as Pyro's enumeration does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

from gradkit import _checks
from gradkit._engine import log_prob
from gradkit.distributions import base_distribution
from gradkit.estimators import PathwiseEstimator
from gradkit.registry import ESTIMATORS, Estimator, Problem, register_estimator
from gradkit.reparam import _check_temperature

__all__ = [
    "ARM",
    "REBAR",
    "RELAX",
    "AdditiveSurrogate",
    "DisARM",
    "Enumerate",
    "GumbelRao",
    "IndeCateR",
    "StraightThrough",
    "disarm_bound",
    "vimco",
]

_MAX_STATES = 2**16


def _bernoulli(problem: Problem, name: str) -> Bernoulli:
    base = problem.resolved.base
    if not isinstance(base, Bernoulli):
        raise ValueError(
            f"the {name} estimator is defined for Bernoulli variables, got "
            f"{type(base).__name__}; for categorical variables use 'score_function', "
            "'rao_blackwell' or 'enumerate', and for continuous ones 'pathwise'"
        )
    return base


class _Antithetic(Estimator):
    """Shared by ARM and DisARM: the antithetic pair drawn from one uniform per coordinate."""

    families = (Bernoulli,)
    min_samples = 2

    def check(self, problem: Problem, **options: Any) -> None:
        _bernoulli(problem, self.name)
        if problem.num_samples % 2:
            raise ValueError(
                f"the {self.name} estimator draws antithetic pairs, so num_samples (the number "
                f"of draws) must be even, got {problem.num_samples}; use "
                f"{problem.num_samples + 1}"
            )

    def _base(self, problem: Problem) -> Bernoulli:
        return _bernoulli(problem, self.name)

    def _uniform(self, problem: Problem) -> Tensor:
        base = self._base(problem)
        shape = (problem.num_samples // 2, *base.batch_shape)
        probs = base.probs
        with problem.forward_randomness():  # replayed in the backward pass: the same u
            return torch.rand(shape, dtype=probs.dtype, device=probs.device)

    def sample(self, problem: Problem) -> Tensor:
        """``b~ = 1[1 - u < p]`` for the first half of the draws, ``b = 1[u < p]`` after it."""
        u = self._uniform(problem)
        p = self._base(problem).probs.detach()
        return torch.cat([(1.0 - u < p).to(u.dtype), (u < p).to(u.dtype)])

    def _differences(self, problem: Problem) -> tuple[Tensor, Tensor, Tensor]:
        """``u``, the signal difference ``f(b~) - f(b)`` per pair, and the logits."""
        u = self._uniform(problem)
        half = problem.num_samples // 2
        signal = problem.signal
        return u, signal[:half] - signal[half:], self._base(problem).logits.detach()

    def _rows(self, problem: Problem, per_logit: Tensor) -> dict[str, Tensor]:
        """Rows for the logits, converted for a distribution built from ``probs``."""
        (name,) = problem.names
        if name == "probs":
            p = self._base(problem).probs.detach()
            per_logit = per_logit / (p * (1.0 - p))
        return {name: per_logit}


@register_estimator("arm")
class ARM(_Antithetic):
    r"""The augment-REINFORCE-merge estimator (Yin and Zhou 2019).

    With one :math:`u \sim U(0, 1)` per coordinate, :math:`\tilde b = \mathbf 1[u > \sigma(-\phi)]`
    and :math:`b = \mathbf 1[u < \sigma(\phi)]` are both :math:`\mathrm{Bern}(\sigma(\phi))`,
    and

    .. math:: \hat g_\phi = \big(f(\tilde b) - f(b)\big)\,\big(u - \tfrac12\big)

    is unbiased for :math:`\nabla_\phi \mathbb{E}[f(b)]`: augmenting the Bernoulli with the
    uniform it thresholds and applying REINFORCE to :math:`u` gives :math:`f(b)(1 - 2u)` per
    coordinate, and merging it with its antithetic copy at :math:`1 - u` gives the difference.
    Each pair costs two evaluations of ``f``; rows are one per pair.
    """

    def estimate(self, problem: Problem) -> dict[str, Tensor]:
        u, diff, _ = self._differences(problem)
        (name,) = problem.names
        return self._rows(problem, problem.broadcast(diff, name) * (u - 0.5))


@register_estimator("disarm")
class DisARM(_Antithetic):
    r"""DisARM, ARM with the antithetic uniform integrated out (Dong, Mnih and Tucker 2020).

    With the same pair as :class:`ARM`, conditioning on :math:`(b, \tilde b)` and integrating
    over the :math:`u` that produce it gives

    .. math:: \hat g_\phi = \tfrac12\big(f(b) - f(\tilde b)\big)\,(-1)^{\tilde b}\,
        \mathbf 1[b \ne \tilde b]\,\sigma(|\phi|),

    unbiased, with a variance never larger than ARM's (a Rao-Blackwellisation; Yin, Ho and Zhou
    2020 derive the same estimator as U2G). Rows are one per pair.
    """

    def estimate(self, problem: Problem) -> dict[str, Tensor]:
        u, diff, logits = self._differences(problem)
        p = torch.sigmoid(logits)
        b_tilde = (1.0 - u < p).to(u.dtype)
        b = (u < p).to(u.dtype)
        (name,) = problem.names
        sign = 1.0 - 2.0 * b_tilde  # (-1)^{b~}
        weight = sign * (b != b_tilde).to(u.dtype) * torch.sigmoid(logits.abs())
        # f(b) - f(b~) = -diff
        return self._rows(problem, -0.5 * problem.broadcast(diff, name) * weight)


@register_estimator("straight_through")
class StraightThrough(PathwiseEstimator):
    r"""Straight-through (Bengio, Léonard and Courville 2013): the discrete sample forward, the
    gradient of its mean backward.

    ``f`` is evaluated at :math:`z \sim p_\theta` and differentiated as if :math:`z` were its
    mean, :math:`z + (\mathbb{E}[z] - \bot\mathbb{E}[z])`: the estimate is
    :math:`\nabla_z f(z)\,\partial\mathbb{E}[z]/\partial\theta`, biased for any ``f`` that is not
    linear. ``f`` must be differentiable in the (one-hot) sample, so a categorical variable is
    given as ``OneHotCategorical``.
    """

    families = (Bernoulli, OneHotCategorical)
    biased = True
    instead = (
        "it passes gradients through the sample itself: for a categorical variable build "
        "OneHotCategorical(logits=...) (f then receives one-hot vectors)"
    )

    def path(self, dist: Distribution, sample_shape: tuple[int, ...], **options: Any) -> Tensor:
        with torch.no_grad():
            z = dist.sample(torch.Size(sample_shape))
        mean = base_distribution(dist)[0].mean
        return z + (mean - mean.detach())


@register_estimator("enumerate", families=(Bernoulli, Categorical, OneHotCategorical))
class Enumerate(PathwiseEstimator):
    r"""Exact marginalisation of a small discrete site: :math:`\sum_z p_\theta(z) f(z)`.

    Every joint state of the site's coordinates is enumerated: under a declared plate, the
    coordinates of one batch element (each element takes its :math:`j`-th state at once, which
    is exact because its cost depends on it alone); otherwise all of them, which must number at
    most :math:`2^{16}` states. The value in :func:`~gradkit.autodiff.expectation` is the exact
    expectation, differentiated by autograd through :math:`p_\theta(z)` and through ``f``, so a
    decoder inside ``f`` gets its exact gradient too. The per-sample interface returns one row,
    the exact gradient, whatever ``num_samples`` is.
    """

    families = (Bernoulli, Categorical, OneHotCategorical)
    benefits_from_plate = True

    instead = (
        "it sums over the states of a discrete site; for continuous distributions use "
        "'pathwise' or gk.quadrature"
    )

    def check(self, problem: Problem, **options: Any) -> None:
        super().check(problem)
        self._problem_states(problem)  # raises when there are too many

    def _problem_states(self, problem: Problem) -> Tensor:
        return problem.memo("states", lambda: self._states(problem.dist, problem.plate))

    @staticmethod
    def _states(dist: Distribution, plate: bool) -> Tensor:
        """Every joint state, ``(N, *batch_shape, *event_shape)``, each plate element alike."""
        base: Any = base_distribution(dist)[0]
        one_hot = isinstance(base, OneHotCategorical)
        values = 2 if isinstance(base, Bernoulli) else base.probs.shape[-1]
        plate_ndim = len(dist.batch_shape) if plate else 0
        coords = tuple(base.batch_shape)[plate_ndim:]
        count = values ** math.prod(coords)
        if count > _MAX_STATES:
            hint = "" if plate else " Declare plate=True if the cost is one value per element."
            raise ValueError(
                f"enumerating {values}^{math.prod(coords)} = {count} joint states is too many "
                f"(at most {_MAX_STATES}).{hint} Otherwise use a sampling estimator "
                "('score_function', 'rao_blackwell', 'disarm')"
            )
        device = base.probs.device
        coordinates = math.prod(coords)  # per plate element, or in all; 1 for a single one
        grids = torch.meshgrid(*[torch.arange(values, device=device)] * coordinates, indexing="ij")
        index = torch.stack([g.reshape(-1) for g in grids], -1)  # (count, coordinates)
        plate_shape = tuple(base.batch_shape)[:plate_ndim]
        states = index.reshape(count, *([1] * plate_ndim), *coords)
        states = states.expand(count, *plate_shape, *coords)
        dtype = base.probs.dtype
        if one_hot:
            return torch.nn.functional.one_hot(states, values).to(dtype)
        return states.to(dtype) if isinstance(base, Bernoulli) else states

    def forward_path(self, problem: Problem, **options: Any) -> Tensor:
        return self._problem_states(problem)

    def sample(self, problem: Problem) -> Tensor:
        return self._problem_states(problem)

    def _weights(self, dist: Distribution, states: Tensor, plate: bool) -> Tensor:
        """:math:`p_\\theta(z_j)`, ``(N, *plate_shape)``: one weight per state (and element)."""
        log_p = log_prob(dist, states)
        if not plate:
            log_p = log_p.reshape(log_p.shape[0], -1).sum(-1)
        return log_p.exp()

    def value(self, problem: Problem, fx: Tensor) -> Tensor:
        states = self._problem_states(problem)
        weights = self._weights(problem.dist, states, problem.plate)
        weights = weights.reshape(*weights.shape, *([1] * (fx.dim() - weights.dim())))
        return (weights * fx).sum(0)

    def estimate(self, problem: Problem, **options: Any) -> dict[str, Tensor]:
        states = self._problem_states(problem)

        def exact(rebuilt: Distribution) -> Tensor:
            weights = self._weights(rebuilt, states, problem.plate)
            return (weights * problem.signal_with_grad(states)).sum().unsqueeze(0)

        return problem.per_sample_gradients(exact, rows=1)


def _swapped_bounds(fx: Tensor, replacements: Tensor) -> Tensor:
    """``log mean_j exp fx_j`` with ``fx_k`` replaced by ``replacements_k``, for every ``k``."""
    k = fx.shape[0]
    swapped = fx.unsqueeze(0).expand(k, *fx.shape).clone()
    index = torch.arange(k, device=fx.device)
    swapped[index, index] = replacements
    return torch.logsumexp(swapped, 1) - math.log(k)  # (K, *T)


def vimco(
    f: Callable[[Tensor], Tensor],
    dist: Distribution,
    num_samples: int,
    *,
    plate: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The multi-sample bound :math:`\log \frac1K \sum_k e^{f(z_k)}` with VIMCO's gradient.

    For :math:`K` draws :math:`z_k \sim q_\theta` and a log-weight ``f`` (in a variational
    model, :math:`\log p(x, z) - \log q(z)`), the value is the bound
    :math:`\hat L = \log \frac1K \sum_k e^{f(z_k)}`, whose expectation is a tighter bound than the
    ELBO as :math:`K` grows. Its score-function gradient gives each sample the learning signal
    :math:`\hat L - \hat L_{-k}`, where :math:`\hat L_{-k}` replaces :math:`f(z_k)` by the mean
    of the other log-weights: a baseline that does not depend on :math:`z_k`, so the estimate
    stays unbiased for :math:`\nabla_\theta \mathbb{E}[\hat L]` (Mnih and Rezende 2016). Tensors
    inside ``f`` get their ordinary gradient, weighted by the normalised importance weights.

    Args:
        f: log-weights, samples ``(K, *batch, *event)`` -> ``(K, *T)``.
        dist: the proposal :math:`q_\theta`, with a differentiable ``log_prob``.
        num_samples: :math:`K \ge 2`.
        plate: declare one bound per batch element (``T == batch_shape``, element ``b``
            depending only on ``z[:, b]``); then each element's proposal is credited with its
            own bound.
        generator: a ``torch.Generator`` for the draws.

    Returns:
        the bound, shape ``T``; ``backward()`` gives VIMCO's gradient.

    Raises:
        ValueError: for ``num_samples < 2`` or a plate with the wrong output shape.

    Example:
        >>> import torch, gradkit as gk
        >>> logits = torch.zeros(3, requires_grad=True)
        >>> q = torch.distributions.Bernoulli(logits=logits)
        >>> bound = gk.vimco(lambda z: -((z - 0.3) ** 2), q, 8, plate=True)
        >>> bound.shape, bool((bound <= 0).all())
        (torch.Size([3]), True)
    """
    est = ESTIMATORS["score_function"]
    if isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples < 2:
        raise ValueError(
            f"VIMCO's baseline for each sample averages the other samples, so num_samples must "
            f"be at least 2, got {num_samples}; draw K >= 2 samples"
        )
    problem = est.problem(f, dist, num_samples, plate=plate, generator=generator, options={})
    with torch.no_grad():
        z = est.sample(problem).detach()
    fx = problem.evaluate(z)  # (K, *T), with f's own gradients
    k = num_samples
    bound = torch.logsumexp(fx, 0) - math.log(k)
    with torch.no_grad():
        others = (fx.sum(0, keepdim=True) - fx) / (k - 1)  # mean of the other log-weights
        signal = bound.detach().unsqueeze(0) - _swapped_bounds(fx.detach(), others)
    log_q = log_prob(problem.dist, z)  # (K, *batch_shape)
    if not plate:
        log_q = log_q.reshape(k, -1).sum(-1)
    log_q = log_q.reshape(*log_q.shape, *([1] * (signal.dim() - log_q.dim())))
    surrogate = (signal * (log_q - log_q.detach())).sum(0)
    return bound + surrogate


def disarm_bound(
    f: Callable[[Tensor], Tensor],
    dist: Distribution,
    num_samples: int,
    *,
    plate: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The multi-sample bound :math:`\log \frac1K \sum_k e^{f(b_k)}` with the local DisARM
    gradient (Dong, Mnih and Tucker 2020, section 4) for Bernoulli variables.

    The same objective as :func:`vimco`, with DisARM in place of the score function: each draw
    :math:`b_k = \mathbf 1[u_k < \sigma(\phi)]` gets its antithetic partner
    :math:`\tilde b_k = \mathbf 1[u_k > \sigma(-\phi)]`, and with the other draws held fixed
    the bound is a function of :math:`b_k` alone, so DisARM applies to it coordinate by
    coordinate:

    .. math:: \hat g_\phi = \sum_k \tfrac12\big(\hat L - \hat L^{(k)}\big)(-1)^{\tilde b_k}\,
        \mathbf 1[b_k \ne \tilde b_k]\,\sigma(|\phi|),

    where :math:`\hat L^{(k)}` is the bound with :math:`b_k` replaced by :math:`\tilde b_k`.
    Unbiased for :math:`\nabla_\phi \mathbb{E}[\hat L]`; :math:`2K` evaluations of ``f``.
    Tensors inside ``f`` get the bound's ordinary gradient through the draws :math:`b_k`.

    Args:
        f: log-weights, samples ``(K, *batch, *event)`` -> ``(K, *T)``.
        dist: a ``Bernoulli`` proposal (``Independent`` wrappers allowed), probs or logits.
        num_samples: :math:`K \ge 2` draws in the bound.
        plate: declare one bound per batch element (``T == batch_shape``).
        generator: a ``torch.Generator`` for the draws.

    Returns:
        the bound at the draws :math:`b_k`, shape ``T``; ``backward()`` gives the gradient.

    Raises:
        ValueError: for a distribution that is not Bernoulli, ``num_samples < 2`` or a plate
            with the wrong output shape.

    Example:
        >>> import torch, gradkit as gk
        >>> logits = torch.zeros(3, requires_grad=True)
        >>> q = torch.distributions.Bernoulli(logits=logits)
        >>> bound = gk.discrete.disarm_bound(lambda z: -((z - 0.3) ** 2), q, 4, plate=True)
        >>> bound.sum().backward(); logits.grad.shape
        torch.Size([3])
    """
    est = ESTIMATORS["disarm"]
    if isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples < 2:
        raise ValueError(
            f"the multi-sample bound averages K >= 2 draws, got num_samples={num_samples}; for "
            "one draw (the ELBO) use gk.expectation(..., estimator='disarm')"
        )
    problem = est.problem(f, dist, 2 * num_samples, plate=plate, generator=generator, options={})
    k = num_samples
    with torch.no_grad():
        pairs = est.sample(problem).detach()  # (2K, ...): the partners first, then the draws
    partner, draw = pairs[:k], pairs[k:]
    fx = problem.evaluate(draw)  # (K, *T), with f's own gradients
    with torch.no_grad():
        fx_partner = problem.evaluate(partner)
    bound = torch.logsumexp(fx, 0) - math.log(k)
    base = _bernoulli(problem, "disarm")
    with torch.no_grad():
        signal = bound.detach().unsqueeze(0) - _swapped_bounds(fx.detach(), fx_partner)
        logits = base.logits.detach()
        factor = (draw != partner).to(draw.dtype) * (1.0 - 2.0 * partner)  # (-1)^{b~}
        factor = factor * torch.sigmoid(logits.abs())  # (K, *base_batch)
    # a surrogate of shape T whose gradient, contracted with the upstream one, is the estimate
    step = base.logits - base.logits.detach()
    local = factor * step  # (K, *base_batch)
    if plate:
        per = local.reshape(k, *problem.plate_shape, -1).sum(-1)  # (K, *batch)
        surrogate = (0.5 * signal * per).sum(0)
    else:
        total = local.reshape(k, -1).sum(-1)  # (K,)
        total = total.reshape(k, *([1] * (signal.dim() - 1)))
        surrogate = (0.5 * signal * total).sum(0)
    return bound + surrogate


@register_estimator("indecater")
class IndeCateR(Estimator):
    r"""IndeCateR (De Smet, Sansone and Zuidberg Dos Martires 2023): every category of every
    variable summed exactly, the other variables held at the sample.

    For independent categorical variables :math:`z_1, \dots, z_n` with probabilities
    :math:`p_i` and a cost that may couple them,

    .. math:: \nabla_\theta \mathbb{E}[f(z)] = \sum_i \mathbb{E}_{z_{-i}}\Big[\sum_k
        \nabla_\theta p_i(k)\, f(z_{-i}, z_i = k)\Big],

    because :math:`z_i` is independent of :math:`z_{-i}`: the inner sum over :math:`k` is done
    exactly (a Rao-Blackwellisation of the score function, coordinate by coordinate) and only
    :math:`z_{-i}` is sampled. With logits this is :math:`p_{ij}\,(F_{ij} - \sum_k p_{ik}
    F_{ik})` for :math:`F_{ij} = f(z_{-i}, z_i = j)`. Each sample costs :math:`nK` evaluations
    of ``f``; under a declared plate every batch element is set to category :math:`k` at once,
    :math:`K` evaluations per inner coordinate.
    """

    families = (Categorical, OneHotCategorical)
    instead = "for Bernoulli variables use 'disarm' or 'measure_valued'"

    def estimate(self, problem: Problem) -> dict[str, Tensor]:
        from gradkit.weak_derivatives import _by_coordinate, _perturbed_costs

        base: Any = problem.resolved.base
        (name,) = problem.names
        param = problem.resolved.params[name]
        categories = base.probs.shape[-1]
        batch, event = tuple(base.batch_shape), tuple(base.event_shape)
        inner = batch[len(problem.plate_shape) :]
        x, num = problem.x, problem.num_samples
        if isinstance(base, OneHotCategorical):
            eye = torch.eye(categories, dtype=x.dtype, device=x.device)
            values = eye.expand(num, *batch, categories, categories)
        else:
            values = torch.arange(categories, device=x.device).expand(num, *batch, categories)
        with torch.no_grad():
            costs = _perturbed_costs(problem, x, values, inner, (categories,), event)
        table = _by_coordinate(costs, num, problem.plate_shape, inner, categories)
        table = table.reshape(num, *param.shape)
        p = base.probs.detach()
        centred = table - (p * table).sum(-1, keepdim=True)
        return {name: (p * centred if name == "logits" else centred).to(param.dtype)}


def _check_relaxations(num_relaxations: object) -> int:
    if isinstance(num_relaxations, bool) or not isinstance(num_relaxations, int):
        raise TypeError(f"num_relaxations must be a Python int, got {num_relaxations!r}")
    if num_relaxations < 1:
        raise ValueError(
            f"num_relaxations must be at least 1, got {num_relaxations}; it is how many "
            "conditional relaxations average the straight-through gradient (e.g. 10)"
        )
    return num_relaxations


@register_estimator("gumbel_rao")
class GumbelRao(PathwiseEstimator):
    r"""Gumbel-Rao (Paulus, Maddison and Krause 2021): straight-through Gumbel-softmax with the
    relaxation averaged over the Gumbel noise that produced the sample.

    The forward value is the discrete sample :math:`D`; the backward pass uses
    :math:`\frac1M\sum_m \nabla_\theta \operatorname{softmax}((\theta + G_m)/\tau)` with
    :math:`G_m` drawn from the Gumbel noise *conditioned on* :math:`\arg\max(\theta + G) = D`
    (the maximum is Gumbel with location :math:`\log\sum_k e^{\theta_k}`, the others Gumbels
    truncated below it). Conditioning on :math:`D` Rao-Blackwellises the straight-through
    Gumbel-softmax gradient: same bias, less variance. For a Bernoulli the noise is logistic,
    conditioned on its sign. Biased by design; ``temperature`` :math:`\tau > 0`,
    ``num_relaxations`` :math:`M`.
    """

    families = (Bernoulli, OneHotCategorical)
    biased = True
    instead = StraightThrough.instead

    def check(
        self, problem: Problem, *, temperature: float | Tensor = 1.0, num_relaxations: int = 10
    ) -> None:
        super().check(problem)
        _check_temperature(temperature)
        _check_relaxations(num_relaxations)

    def path(
        self,
        dist: Distribution,
        sample_shape: tuple[int, ...],
        *,
        temperature: float | Tensor = 1.0,
        num_relaxations: int = 10,
    ) -> Tensor:
        tau = _check_temperature(temperature)
        m = _check_relaxations(num_relaxations)
        base: Any = base_distribution(dist)[0]
        with torch.no_grad():
            hard = dist.sample(torch.Size(sample_shape))
        tiny = torch.finfo(hard.dtype).tiny
        if isinstance(base, Bernoulli):
            logits = base.logits
            shape = (m, *hard.shape)
            with torch.no_grad():
                threshold = torch.sigmoid(-logits.detach())  # P(z = 0)
                u = torch.rand(shape, dtype=hard.dtype, device=hard.device)
                u = torch.where(hard.bool(), threshold + u * (1 - threshold), u * threshold)
                noise = torch.logit(u.clamp(tiny, 1 - torch.finfo(hard.dtype).eps))
            soft = torch.sigmoid((logits + noise) / tau).mean(0)
        else:
            logits = base.logits
            shape = (m, *hard.shape)
            with torch.no_grad():
                exponentials = torch.empty(
                    (m, *hard.shape[:-1], hard.shape[-1] + 1), dtype=hard.dtype, device=hard.device
                ).exponential_()
                gumbel = -torch.log(exponentials.clamp_min(tiny))
                # the maximum's own Gumbel (independent of the others), then one per category
                top = torch.logsumexp(logits.detach(), -1, keepdim=True) + gumbel[..., :1]
                gumbel = gumbel[..., 1:]
                others = -torch.log(torch.exp(-top) + torch.exp(-(logits.detach() + gumbel)))
                perturbed = torch.where(hard.bool(), top, others)
                noise = perturbed - logits.detach()
            soft = torch.softmax((logits + noise) / tau, -1).mean(0)
        return hard + (soft - soft.detach())

    def estimate(
        self, problem: Problem, *, temperature: float | Tensor = 1.0, num_relaxations: int = 10
    ) -> dict[str, Tensor]:
        return super().estimate(problem, temperature=temperature, num_relaxations=num_relaxations)


def _sigmoid_pair(logits: Tensor, noise: Tensor, b: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    r"""The relaxed sample :math:`z = \phi + L` and :math:`\tilde z \sim p(z \mid b)`.

    :math:`L` is the logistic noise that made :math:`b = \mathbf 1[z > 0]`; :math:`\tilde z`
    thresholds a uniform drawn from the part of :math:`(0, 1)` that gives :math:`b`, written in
    logs so it stays finite for large :math:`|\phi|`. Both are differentiable in ``logits``.
    """
    z = logits + noise
    up = F.logsigmoid(logits)  # log theta
    down = F.logsigmoid(-logits)  # log (1 - theta)
    log_v, log_1mv = torch.log(v), torch.log1p(-v)
    # b = 1: u = 1 - theta (1 - v); b = 0: u = v (1 - theta)
    one = torch.logaddexp(down, log_v + up) - (up + log_1mv)
    zero = (log_v + down) - torch.log1p(-torch.exp(log_v + down))
    return z, logits + torch.where(b.bool(), one, zero)


def _gumbel_pair(
    logits: Tensor, noise: Tensor, index: Tensor, fresh: Tensor
) -> tuple[Tensor, Tensor]:
    r"""The relaxed sample :math:`z = \theta + G` and :math:`\tilde z \sim p(z \mid b)`.

    Given :math:`b = \arg\max z`, the maximum is Gumbel with location
    :math:`\log\sum_k e^{\theta_k}` and every other coordinate a Gumbel truncated below it
    (``fresh`` holds :math:`K + 1` new Gumbels: the maximum's, then one per category).
    """
    z = logits + noise
    top = torch.logsumexp(logits, -1, keepdim=True) + fresh[..., :1]
    others = -torch.logaddexp(-top, -(logits + fresh[..., 1:]))
    chosen = F.one_hot(index, logits.shape[-1]).bool()
    return z, torch.where(chosen, top, others)


class _Relaxed(Estimator, torch.nn.Module):
    r"""Shared by REBAR and RELAX: :math:`(f(b) - c(\tilde z))\nabla\log p(b) + \nabla c(z) -
    \nabla c(\tilde z)`, and the variance objective that tunes :math:`c`.

    The forward samples :math:`b = H(z)` come from the relaxed variable :math:`z` (logistic
    noise for a Bernoulli, Gumbel noise for a categorical); the backward pass replays that
    noise and draws the conditional :math:`\tilde z \sim p(z \mid b)` in the estimator's phase.
    """

    families: tuple[type, ...] = (Bernoulli, Categorical, OneHotCategorical)
    instead = (
        "it relaxes a discrete variable; for continuous distributions use 'pathwise' or "
        "'score_function'"
    )

    def __init__(self) -> None:
        super().__init__()

    # -- the noise ----------------------------------------------------------------------------

    def _categories(self, problem: Problem) -> int | None:
        base: Any = problem.resolved.base
        return None if isinstance(base, Bernoulli) else int(base.logits.shape[-1])

    def _shape(self, problem: Problem, extra: int = 0) -> tuple[int, ...]:
        base: Any = problem.resolved.base
        k = self._categories(problem)
        tail = () if k is None else (k + extra,)
        return (problem.num_samples, *base.batch_shape, *tail)

    @staticmethod
    def _uniform(shape: tuple[int, ...], like: Tensor) -> Tensor:
        u = torch.rand(shape, dtype=like.dtype, device=like.device)
        info = torch.finfo(like.dtype)
        return u.clamp(info.tiny, 1.0 - info.eps)

    def _noise(self, problem: Problem) -> Tensor:
        """The forward noise (logistic or Gumbel), replayed wherever it is asked for."""
        like = problem.resolved.base.logits  # type: ignore[attr-defined]
        with problem.forward_randomness():
            u = self._uniform(self._shape(problem), like)
        if self._categories(problem) is None:
            return torch.log(u) - torch.log1p(-u)
        return -torch.log(-torch.log(u))

    def _conditional_noise(self, problem: Problem) -> Tensor:
        like = problem.resolved.base.logits  # type: ignore[attr-defined]
        with problem.randomness():
            u = self._uniform(self._shape(problem, extra=1), like)
        return u if self._categories(problem) is None else -torch.log(-torch.log(u))

    def sample(self, problem: Problem) -> Tensor:
        """:math:`b = H(z)`: the relaxed variable thresholded (an exact draw from ``dist``)."""
        base: Any = problem.resolved.base
        z = base.logits.detach() + self._noise(problem)
        if isinstance(base, Bernoulli):
            return (z > 0).to(z.dtype)
        index = z.argmax(-1)
        if isinstance(base, OneHotCategorical):
            return F.one_hot(index, z.shape[-1]).to(z.dtype)
        return index

    def _index(self, problem: Problem) -> Tensor:
        base = problem.resolved.base
        x = problem.x
        if isinstance(base, Bernoulli):
            return x
        return x.argmax(-1) if isinstance(base, OneHotCategorical) else x.long()

    # -- the control variate ------------------------------------------------------------------

    def control(self, problem: Problem, z: Tensor) -> Tensor:
        """:math:`c(z)` in the signal's units, ``(S, *plate_shape)`` (REBAR's and RELAX's own)."""
        raise NotImplementedError(f"{type(self).__name__} must define its control variate c(z)")

    @property
    def tuning(self) -> bool:
        """Whether estimates also accumulate the variance objective's gradient (see below)."""
        return self.training and any(p.requires_grad for p in self.parameters())

    def check(self, problem: Problem, *, leave_one_out: bool = False) -> None:
        super().check(problem)
        if not isinstance(leave_one_out, bool):
            raise TypeError(f"leave_one_out must be True or False, got {leave_one_out!r}")
        if leave_one_out and problem.num_samples < 2:
            raise ValueError(
                f"the leave-one-out baseline averages the other samples, so num_samples must "
                f"be at least 2, got {problem.num_samples}"
            )

    def rows(
        self, problem: Problem, *, create_graph: bool = False, leave_one_out: bool = False
    ) -> dict[str, Tensor]:
        r"""Per-sample estimates; with ``create_graph`` they stay differentiable in the
        estimator's own parameters (for the variance objective). With ``leave_one_out`` the
        score term's coefficient :math:`f(b_s) - c(\tilde z_s)` also subtracts its mean over
        the other samples, a baseline independent of sample :math:`s` (unbiased, as for the
        score function)."""
        num = problem.num_samples
        noise, fresh = self._noise(problem), self._conditional_noise(problem)
        index = self._index(problem)
        pair = _sigmoid_pair if self._categories(problem) is None else _gumbel_pair
        scores = problem.scores()
        captured: dict[str, Tensor] = {}

        def controls(rebuilt: Distribution) -> Tensor:
            """:math:`c(z) - c(\tilde z)` per sample, from per-sample copies of the parameters."""
            logits = base_distribution(rebuilt)[0].logits  # type: ignore[attr-defined]
            z, z_tilde = pair(logits, noise, index, fresh)
            captured["c_tilde"] = self.control(problem, z_tilde)
            return self.control(problem, z) - captured["c_tilde"]

        with torch.inference_mode(False), torch.enable_grad():
            grads = problem.per_sample_gradients(controls, create_graph=create_graph)
            coefficient = problem.signal - captured["c_tilde"]
            if leave_one_out:
                coefficient = coefficient - (coefficient.sum(0) - coefficient) / (num - 1)
            if not create_graph:
                coefficient = coefficient.detach()
            return {
                name: problem.broadcast(coefficient, name) * scores[name] + grads[name]
                for name in problem.names
            }

    def variance(self, rows: dict[str, Tensor]) -> Tensor:
        r"""The variance objective :math:`\frac1S\sum_s \lVert \hat g_s \rVert^2`.

        The mean of the estimate does not depend on :math:`c`, so the gradient of this with
        respect to :math:`c`'s parameters is an unbiased estimate of the gradient of the
        estimator's (per-sample, summed over parameter elements) variance.
        """
        return sum((r.reshape(r.shape[0], -1) ** 2).sum(-1).mean() for r in rows.values())  # type: ignore[return-value]

    def estimate(self, problem: Problem, *, leave_one_out: bool = False) -> dict[str, Tensor]:
        # a control variate's copy of the problem (another signal) does not tune the estimator
        if not self.tuning or problem.replaces_signal:
            return self.rows(problem, leave_one_out=leave_one_out)
        rows = self.rows(problem, create_graph=True, leave_one_out=leave_one_out)
        own = [p for p in self.parameters() if p.requires_grad]
        with torch.inference_mode(False), torch.enable_grad():
            grads = torch.autograd.grad(self.variance(rows), own, allow_unused=True)
        for p, g in zip(own, grads, strict=True):
            if g is not None:
                p.grad = g.detach() if p.grad is None else p.grad + g.detach()
        return {n: r.detach() for n, r in rows.items()}


@register_estimator("rebar")
class REBAR(_Relaxed):
    r"""REBAR (Tucker, Mnih, Maddison, Lawson and Sohl-Dickstein 2017): the score function with
    the concrete relaxation as its control variate.

    For :math:`b = H(z)`, where :math:`z` is the relaxed variable (:math:`z = \phi + L` with
    logistic :math:`L` for a Bernoulli, :math:`z = \theta + G` with Gumbel :math:`G` for a
    categorical) and :math:`\tilde z \sim p(z \mid b)` its conditional given the sample, both
    written as differentiable functions of the parameters and of noise,

    .. math:: \hat g = \big(f(b) - \eta f(\sigma_\lambda(\tilde z))\big)\nabla\log p(b)
        + \eta\nabla f(\sigma_\lambda(z)) - \eta\nabla f(\sigma_\lambda(\tilde z))

    is unbiased for :math:`\nabla\mathbb{E}[f(b)]` for every scale :math:`\eta` and temperature
    :math:`\lambda`: the last two terms have the mean of the score term of
    :math:`c(z) = \eta f(\sigma_\lambda(z))`, which they replace by reparameterised gradients.
    :math:`\sigma_\lambda` is the sigmoid (softmax) at temperature :math:`\lambda`. ``f`` is
    evaluated at relaxed points, so it must accept them: a Bernoulli's values in
    :math:`(0, 1)`, a categorical's as ``OneHotCategorical`` (probability vectors). Three
    evaluations of ``f`` per sample.

    The instance is a ``torch.nn.Module`` whose parameters are :math:`\log\lambda` and
    :math:`\eta`: put them in an optimiser. In training mode (the default) every estimate also
    adds to their ``.grad`` the gradient of the variance objective, the mean squared norm of
    the per-sample estimates (its mean part does not depend on them), as the paper tunes
    them; ``requires_grad_(False)`` or ``eval()`` fixes them. The instance
    registered as ``"rebar"`` is fixed at :math:`\eta = 1`, :math:`\lambda = 0.5`. The
    option ``leave_one_out=True`` (``num_samples >= 2``) also subtracts from the coefficient
    :math:`f(b_s) - c(\tilde z_s)` its mean over the other samples, a baseline that keeps the
    estimate unbiased.

    Args:
        temperature: the initial :math:`\lambda > 0`.
        scale: the initial :math:`\eta`.
    """

    name = "rebar"
    families = (Bernoulli, OneHotCategorical)
    instead = (
        "REBAR evaluates f at relaxed points: for a categorical variable build "
        "OneHotCategorical(logits=...) (f then receives one-hot or probability vectors), or "
        "use 'relax', which evaluates f only at discrete points"
    )

    def __init__(self, temperature: float = 0.5, scale: float = 1.0) -> None:
        super().__init__()
        tau = float(_check_temperature(temperature))
        self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(tau)))
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    @property
    def temperature(self) -> Tensor:
        """:math:`\\lambda = e^{\\log\\lambda}`."""
        return self.log_temperature.exp()

    def control(self, problem: Problem, z: Tensor) -> Tensor:
        tau = self.temperature.to(z.dtype)
        if self._categories(problem) is None:
            relaxed = torch.sigmoid(z / tau)
        else:
            relaxed = torch.softmax(z / tau, -1)
        return self.scale.to(z.dtype) * problem.signal_with_grad(relaxed)


class AdditiveSurrogate(torch.nn.Module):
    r"""A learnable additive surrogate :math:`c(z) = \sum_i g(\sigma(z_i))` for :class:`RELAX`.

    :math:`g` is a small network from one number to one number shared by every coordinate
    (for a categorical, every category's perturbed logit), so the surrogate fits any shape and
    respects a plate. The last layer starts at zero, so an untrained surrogate is
    :math:`c = 0` (RELAX is then the plain score function).

    Args:
        hidden: the width of :math:`g`'s hidden layer.
    """

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        _checks.check_count("hidden", hidden)
        self.inner = torch.nn.Linear(1, hidden)
        self.outer = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.outer.weight)
        torch.nn.init.zeros_(self.outer.bias)

    def forward(self, z: Tensor) -> Tensor:
        """``(S, *batch[, K])`` -> one value per coordinate, the same shape."""
        features = torch.sigmoid(z).to(self.inner.weight).unsqueeze(-1)
        return self.outer(torch.tanh(self.inner(features))).squeeze(-1).to(z)


class RELAX(_Relaxed):
    r"""RELAX (Grathwohl, Choi, Wu, Roeder and Duvenaud 2018): the score function with a learned
    surrogate :math:`c_\psi` as its control variate.

    With :math:`b = H(z)` and :math:`\tilde z \sim p(z \mid b)` as in :class:`REBAR`,

    .. math:: \hat g = \big(f(b) - c_\psi(\tilde z)\big)\nabla\log p(b)
        + \nabla c_\psi(z) - \nabla c_\psi(\tilde z)

    is unbiased for any :math:`c_\psi`, and :math:`\psi` is trained to minimise the estimator's
    variance. ``f`` is evaluated only at the discrete sample (once per sample), the surrogate at
    the relaxed points :math:`z` (a Bernoulli's logistic variable, shape of the sample; a
    categorical's perturbed logits, ``(S, *batch, K)``).

    The surrogate is a ``torch.nn.Module`` (default :class:`AdditiveSurrogate`) that maps the
    relaxed points to one value per sample, ``(S,)``, or under a declared plate one per batch
    element, ``(S, *batch_shape)``, approximating ``f`` (summed over its outputs, or per
    element); any dimensions after those are summed. It must treat samples separately (no
    batch normalisation across samples) and, under a plate, element ``b`` must depend on
    ``z[:, b]`` only. The instance is a ``torch.nn.Module`` holding the surrogate: in training
    mode every estimate adds the variance objective's gradient (the mean squared norm of the
    per-sample estimates) to the surrogate's ``.grad``. The instance registered as
    ``"relax"`` has a fixed, untrained additive surrogate (:math:`c = 0`); train your own.
    The option ``leave_one_out=True`` (``num_samples >= 2``) adds the leave-one-out baseline to
    the score term, as for :class:`REBAR`; with it an untrained surrogate starts as the
    leave-one-out score function rather than the plain one. Move the instance to the device
    of the samples (``relax.to(device)``), as any module.

    Args:
        surrogate: the network :math:`c_\psi` (default: ``AdditiveSurrogate()``).
    """

    name = "relax"

    def __init__(self, surrogate: torch.nn.Module | None = None) -> None:
        super().__init__()
        if surrogate is not None and not callable(surrogate):
            raise TypeError(
                f"surrogate must be a torch.nn.Module mapping relaxed samples to values, got "
                f"{type(surrogate).__name__}"
            )
        self.surrogate = AdditiveSurrogate() if surrogate is None else surrogate

    def control(self, problem: Problem, z: Tensor) -> Tensor:
        out = self.surrogate(z)
        lead = (problem.num_samples, *problem.plate_shape)
        if not isinstance(out, Tensor) or tuple(out.shape[: len(lead)]) != lead:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"RELAX's surrogate returned {got} for relaxed samples of shape "
                f"{tuple(z.shape)}; it must return one value per sample"
                + (" and batch element" if problem.plate else "")
                + f", shape {lead} (further dimensions are summed)"
            )
        if out.dim() > len(lead):
            out = out.reshape(*lead, -1).sum(-1)
        return problem.to_signal_units(out.to(z.dtype))


# the registered instances are fixed (no tuning, no state shared between callers): build your
# own REBAR() or RELAX(surrogate) to train the control variate. The default surrogate's
# initialisation must not move the global random stream at import time.
with torch.random.fork_rng(devices=[]):
    register_estimator("relax")(RELAX)
for _name in ("rebar", "relax"):
    ESTIMATORS[_name].requires_grad_(False)  # type: ignore[attr-defined]
