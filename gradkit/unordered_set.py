r"""The unordered-set estimator: categories drawn without replacement, weighted as a set.

Kool, van Hoof and Welling (2020, "Estimating gradients for discrete random variables by
sampling without replacement") estimate :math:`\nabla_\theta \mathbb{E}_{x \sim p_\theta}[f(x)]`
for a categorical variable on :math:`D = \{1, \dots, K\}` from :math:`k` *distinct* categories.
Perturb the log-probabilities with independent standard Gumbels and keep the :math:`k`
largest (Gumbel-top-:math:`k`): the ordered draw is a draw without replacement, and its
unordered set :math:`S` has the probability :math:`p(S)` of all its orderings together. Think
of the ordered draw as a first category :math:`x_1 \sim p_\theta` followed by :math:`k - 1`
more. Given the set, the first one is :math:`s \in S` with probability

.. math:: p(x_1 = s \mid S) = \frac{p(s)\, p^{D \setminus \{s\}}(S \setminus \{s\})}{p(S)}
    = p(s)\, R(S, s),

where :math:`p^{D \setminus \{s\}}` is the categorical renormalised without :math:`s` and
:math:`R(S, s)` is the *leave-one-out ratio*. Averaging the one-sample score function
:math:`f(x_1) \nabla_\theta \log p(x_1)` over this conditional (a Rao-Blackwellisation, so
unbiased with no more variance) gives the unordered-set estimator

.. math:: \hat g = \sum_{s \in S} p(s)\, R(S, s)\, f(s)\, \nabla_\theta \log p(s)
    = \sum_{s \in S} R(S, s)\, f(s)\, \nabla_\theta p(s),

and in the same way :math:`\sum_{s \in S} p(s) R(S, s) f(s)` is an unbiased estimate of
:math:`\mathbb{E}[f]` (the weights :math:`p(s) R(S, s)` sum to one). The estimator has a
baseline of its own: the other :math:`k - 1` categories are an unordered sample of
:math:`D \setminus \{x_1\}`, so the same construction one level down,

.. math:: B(S, s) = \sum_{s' \in S} p(s')\, R^{D \setminus \{s\}}(S, s')\, f(s'), \qquad
    R^{D \setminus \{s\}}(S, s') = \begin{cases}
        p^{D \setminus \{s, s'\}}(S \setminus \{s, s'\}) \big/
        p^{D \setminus \{s\}}(S \setminus \{s\}) & s' \ne s, \\ 1 & s' = s, \end{cases}

estimates :math:`\mathbb{E}[f]` whatever :math:`x_1 = s` was, so subtracting it keeps the
estimate unbiased:

.. math:: \hat g = \sum_{s \in S} p(s)\, R(S, s)\, \nabla_\theta \log p(s)\,
    \big(f(s) - B(S, s)\big).

With :math:`k = K` the set is always all of :math:`D`, :math:`p(s) R(S, s) = p(s)` and
:math:`B = \mathbb{E}[f]`: the exact gradient, with no variance. With :math:`k = 1` there is
no other category for the baseline and the estimate is the one-sample score function.

**The probability of a set.** With exponential race times :math:`E_i \sim \mathrm{Exp}(p_i)`
(the Gumbel-max order is the order of arrival), :math:`S` is drawn when all of its categories
arrive before the first of the others, which arrives at a time distributed as
:math:`\mathrm{Exp}(q)`, :math:`q = p(D \setminus S)`. Scaling time by :math:`q` and writing it
as :math:`e^z`,

.. math:: p(S) = \int_{-\infty}^{\infty} \exp\Big(z - e^z + \sum_{s \in S}
    \log\big(1 - \exp(-e^{z + \rho_s})\big)\Big)\, dz, \qquad \rho_s = \log \frac{p(s)}{q}.

This is the paper's integral over :math:`u \in (0, 1)` with :math:`u = e^{-e^z}`. The
integrals for :math:`S \setminus \{s\}` in :math:`D \setminus \{s\}` and for
:math:`S \setminus \{s, s'\}` in :math:`D \setminus \{s, s'\}` are the same integrand with
those terms left out (renormalising the categorical leaves every :math:`\rho` unchanged). In
:math:`z` every such integrand is log-concave, peaks in :math:`(0, \log(k + 1))` and decays
at least exponentially on the left and double-exponentially on the right, so one uniform grid
(about 240 nodes in float64, 70 in float32) integrated with the trapezoid rule in log-space gives
every ratio to the dtype's precision for any probabilities; the paper's appendix used the
trapezoid rule on :math:`u` instead. The weights are normalised with the identity
:math:`p(S) = \sum_{s \in S} p(s) p^{D \setminus \{s\}}(S \setminus \{s\})` (and its analogue
one level down), so they sum to one exactly and the baseline cancels a constant cost exactly.

The estimator is registered as ``"unordered_set"`` for ``Categorical`` and
``OneHotCategorical`` (``f`` receives indices or one-hot vectors). ``num_samples`` is the set
size :math:`k \le K`; the :math:`k` draws are used together, so the per-sample interface
returns one row per parameter. A batch of categoricals needs a declared plate, one cost per
categorical, each with its own set: the estimator is not defined for a cost that couples
several categorical variables (use ``indecater`` or ``score_function`` there).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, OneHotCategorical
from torch.nn.functional import one_hot

from gradkit._engine import log_prob
from gradkit.registry import Estimator, Problem, register_estimator

__all__ = ["UnorderedSet", "log_set_probability"]


def _log1mexp_exp(y: Tensor) -> Tensor:
    r""":math:`\log(1 - \exp(-e^y))` for finite or ``-inf`` ``y``, to the dtype's precision.

    Below ``y = -50`` it is ``y`` (the next term, :math:`-e^y/2`, is below any rounding); the
    clamp keeps ``exp`` from underflowing to an exact zero there.
    """
    clamped = y.clamp_min(-50.0)
    return torch.log(-torch.expm1(-clamped.exp())) + (y - clamped)


def _grid(k: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, float]:
    """Trapezoid nodes in ``z`` for every integrand of a set of size at most ``k``, and the step.

    Each integrand is log-concave with its peak in ``(0, log(k + 1))``; on the left its log
    falls at least as fast as ``-z``, on the right faster than ``-e^z``. The range keeps what
    lies within ``margin`` (the dtype's precision, with room) of the peak; the step makes the
    trapezoid rule's (geometrically small) error as small as the dtype's rounding.
    """
    digits = -math.log(torch.finfo(dtype).eps)
    margin = digits + math.log(k + 1) + 3.0
    lo = -(margin + 1.0)
    hi = math.log(2.0 * (k + 1) + margin) + 1.0
    step = 0.8 * math.pi**2 / (digits + 5.0)
    count = math.ceil((hi - lo) / step) + 1
    return lo + step * torch.arange(count, dtype=dtype, device=device), step


_BLOCK = 2**23  # integrand values materialised at once (64 MiB in float64)


def _log_integrals(log_ratio: Tensor, order: int) -> list[Tensor]:
    r"""Log set probabilities from :math:`\rho_s = \log p(s) - \log p(D \setminus S)`.

    ``log_ratio`` has shape ``(..., k)``. Returns ``[log p(S)]`` ``(...)``, then (``order >= 1``)
    :math:`\log p^{D\setminus\{s\}}(S \setminus \{s\})` ``(..., k)``, then (``order >= 2``)
    :math:`\log p^{D\setminus\{s,s'\}}(S \setminus \{s, s'\})` ``(..., k, k)`` (symmetric; zero
    on the diagonal, where it has no meaning): one integrand per set, all on the same nodes,
    in log-space. The sets are processed in blocks that bound the memory of the integrands
    (one block unless a block of ``2**23`` integrand values is exceeded).
    """
    lead, k = log_ratio.shape[:-1], log_ratio.shape[-1]
    dtype, device = log_ratio.dtype, log_ratio.device
    z, step = _grid(k, dtype, device)
    nodes = z.shape[0]
    # rho = inf (nothing outside the set) is a factor of one; keep it finite for the clamp
    ceiling = -2.0 * math.log(torch.finfo(dtype).tiny)
    flat = log_ratio.clamp_max(ceiling).reshape(-1, k)
    first, second = torch.triu_indices(k, k, 1, device=device)  # each pair once
    width = 1 + (k if order >= 1 else 0) + (first.numel() if order >= 2 else 0)
    blocks: list[list[Tensor]] = []
    for block in flat.split(max(1, _BLOCK // (width * nodes))):
        terms = _log1mexp_exp(block.unsqueeze(-1) + z)  # (B, k, N)
        full = z - z.exp() + terms.sum(-2)  # (B, N)
        out = [torch.logsumexp(full, -1)]
        if order >= 1:
            without = full.unsqueeze(-2) - terms  # (B, k, N)
            out.append(torch.logsumexp(without, -1))
            if order >= 2:
                pairs = without[:, first] - terms[:, second]  # (B, P, N)
                out.append(torch.logsumexp(pairs, -1))
        blocks.append(out)
    results = [torch.cat([b[i] for b in blocks]) + math.log(step) for i in range(min(order, 2) + 1)]
    out = [results[0].reshape(lead)]
    if order >= 1:
        out.append(results[1].reshape(*lead, k))
    if order >= 2:
        pairs = results[2].new_zeros(results[2].shape[0], k, k)
        pairs[:, first, second] = results[2]
        pairs[:, second, first] = results[2]
        out.append(pairs.reshape(*lead, k, k))
    return out


def _log_ratios(log_p: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """The members' log-probabilities ``(..., k)`` and :math:`\\rho_s` for sets ``index``."""
    log_p_set = log_p.gather(-1, index)
    members = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, index, True)
    log_rest = torch.logsumexp(log_p.masked_fill(members, -math.inf), -1, keepdim=True)
    # a member of probability zero stays finite (its set has probability ~0); an empty
    # complement (k = K, or the rest rounding to zero) gives rho = inf: each factor is 1
    floor = 2.0 * math.log(torch.finfo(log_p.dtype).tiny)
    return log_p_set, log_p_set.clamp_min(floor) - log_rest


def log_set_probability(logits: Tensor, index: Tensor) -> Tensor:
    r"""Log-probability :math:`\log p(S)` that ``k`` draws without replacement give the set ``S``.

    :math:`p(S)` sums the Plackett-Luce probabilities of every ordering of :math:`S`, the law
    of the unordered Gumbel-top-:math:`k` set; it is computed by the quadrature of the module
    docstring, without enumerating the :math:`k!` orderings.

    Args:
        logits: log-probabilities (normalised or not) ``(..., K)``.
        index: the sets, ``k`` distinct categories each, ``(..., k)`` (broadcast against
            ``logits``'s leading dimensions).

    Returns:
        :math:`\log p(S)`, shape ``(...)``.

    Example:
        >>> import torch
        >>> from gradkit.unordered_set import log_set_probability
        >>> p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
        >>> # {0, 1}: 0 then 1, or 1 then 0
        >>> exact = 0.5 * 0.3 / 0.5 + 0.3 * 0.5 / 0.7
        >>> bool(torch.isclose(log_set_probability(p.log(), torch.tensor([0, 1])).exp(),
        ...                    torch.tensor(exact, dtype=torch.float64)))
        True
    """
    log_p = torch.log_softmax(logits, -1)
    index = index.long()
    lead = torch.broadcast_shapes(log_p.shape[:-1], index.shape[:-1])
    log_p = log_p.expand(*lead, log_p.shape[-1])
    index = index.expand(*lead, index.shape[-1])
    _, log_ratio = _log_ratios(log_p, index)
    return _log_integrals(log_ratio, 0)[0]


def _set_weights(log_p: Tensor, index: Tensor, baseline: bool) -> tuple[Tensor, Tensor | None]:
    r"""The estimator's weights for sets ``index`` ``(..., k)`` of categories of ``log_p``.

    Returns :math:`\alpha_s = p(s) R(S, s)` ``(..., k)`` (summing to one) and, with the
    baseline and ``k > 1``, :math:`\beta_{s s'} = p(s') R^{D \setminus \{s\}}(S, s')`
    ``(..., k, k)`` (each row summing to one), so that :math:`B(S, s) = \sum_{s'}
    \beta_{s s'} f(s')`.
    """
    k = index.shape[-1]
    log_p_set, log_ratio = _log_ratios(log_p, index)
    order = 2 if baseline and k > 1 else 1
    if k == log_p.shape[-1]:  # the set is all of D: every probability of a set is one
        zeros = log_p_set.new_zeros(log_p_set.shape)
        log_without, rest = zeros, [zeros.unsqueeze(-1).expand(*zeros.shape, k)]
    else:
        _, log_without, *rest = _log_integrals(log_ratio, order)
    # p(S) = sum_s p(s) p^{D-s}(S - s): normalising by it makes the weights sum to one exactly
    alpha = torch.softmax(log_p_set + log_without, -1)
    if order < 2:
        return alpha, None
    (log_pairs,) = rest
    eye = torch.eye(k, dtype=torch.bool, device=log_p.device)
    # row s: p^{D-s}(S - s) = sum_{s' != s} p(s') p^{D-s-s'}(S - s - s') / (1 - p(s))
    pair_logits = (log_p_set.unsqueeze(-2) + log_pairs).masked_fill(eye, -math.inf)
    # a row whose other members all have probability zero (a set larger than the support)
    # has no mass to share: zeros, not the NaN of a softmax over nothing
    others = torch.softmax(pair_logits, -1).nan_to_num(0.0)
    others = others * (-torch.expm1(log_p_set)).unsqueeze(-1)
    return alpha, others + torch.diag_embed(log_p_set.exp())


def _gumbel_top_k(log_p: Tensor, k: int) -> Tensor:
    """``k`` distinct categories ``(..., k)`` per row of ``log_p`` ``(..., K)`` (Gumbel-top-k)."""
    exponentials = torch.empty_like(log_p).exponential_()
    gumbel = -torch.log(exponentials.clamp_min(torch.finfo(log_p.dtype).tiny))
    return (log_p + gumbel).topk(k, dim=-1).indices


@register_estimator("unordered_set")
class UnorderedSet(Estimator):
    r"""The unordered-set estimator with its built-in baseline (Kool, van Hoof and Welling 2020).

    Draws ``num_samples`` :math:`= k` distinct categories :math:`S` of each categorical by
    Gumbel-top-:math:`k` and returns one row per parameter,

    .. math:: \hat g = \sum_{s \in S} p(s)\, R(S, s)\, \nabla_\theta \log p(s)\,
        \big(f(s) - B(S, s)\big),

    with the leave-one-out ratio :math:`R(S, s) = p^{D \setminus \{s\}}(S \setminus \{s\}) /
    p(S)` and the baseline :math:`B(S, s)` of the module docstring (``baseline=False`` drops
    it: :math:`B = 0`). Unbiased for every :math:`1 \le k \le K`; exact for :math:`k = K`. In
    :func:`~gradkit.autodiff.expectation` the value is the set's unbiased estimate
    :math:`\sum_{s \in S} p(s) R(S, s) f(s)` of :math:`\mathbb{E}[f]`, so tensors inside ``f``
    get that estimate's gradient. Declare ``plate=True`` for a batch of categoricals (one cost
    each, each with its own set); a cost coupling several categoricals is refused.
    """

    families = (Categorical, OneHotCategorical)
    instead = (
        "for Bernoulli variables use 'disarm' (or 'arm'), for continuous ones 'pathwise' or "
        "'score_function'"
    )

    def check(self, problem: Problem, *, baseline: bool = True) -> None:
        super().check(problem)
        if not isinstance(baseline, bool):
            raise TypeError(
                f"baseline must be True or False, got {baseline!r}; True subtracts the "
                "estimator's built-in leave-one-out baseline"
            )
        base: Any = problem.resolved.base
        categories = base.logits.shape[-1]
        k = problem.num_samples
        coupled = math.prod(tuple(base.batch_shape)[len(problem.plate_shape) :])
        if coupled > 1:
            dist = problem.dist
            raise ValueError(
                f"the unordered_set estimator draws one set per categorical variable and is "
                f"defined for a cost of one variable, but here each cost couples {coupled} "
                f"categorical variables (batch_shape {tuple(dist.batch_shape)}, event_shape "
                f"{tuple(dist.event_shape)}, plate={problem.plate}). If f returns one cost per "
                "categorical (output b depending on x[:, b] only), declare plate=True; for a "
                "cost that couples several categoricals use 'indecater' or 'score_function'"
            )
        if k > categories:
            raise ValueError(
                f"the unordered_set estimator draws num_samples distinct categories without "
                f"replacement, so num_samples (the set size k) must be at most the number of "
                f"categories K = {categories}, got {k}; use num_samples <= {categories} "
                f"(num_samples = {categories} gives the exact gradient)"
            )

    @staticmethod
    def _log_probs(problem: Problem) -> Tensor:
        """Normalised log-probabilities, one row per set: ``(*plate_shape, K)``, detached."""
        logits = problem.resolved.base.logits.detach()  # type: ignore[attr-defined]
        return logits.reshape(*problem.plate_shape, logits.shape[-1])

    def sample(self, problem: Problem) -> Tensor:
        """``k`` distinct categories per categorical, ``(k, *batch, *event)``, Gumbel-top-k."""
        log_p = self._log_probs(problem)
        k = problem.num_samples
        with problem.forward_randomness():
            index = _gumbel_top_k(log_p, k)
        base = problem.resolved.base
        x = index.movedim(-1, 0).reshape(k, *base.batch_shape)
        if isinstance(base, OneHotCategorical):
            return one_hot(x, log_p.shape[-1]).to(log_p.dtype)
        return x

    def _weights(self, problem: Problem) -> tuple[Tensor, Tensor | None]:
        """:math:`\\alpha` ``(*plate, k)`` and :math:`\\beta` ``(*plate, k, k)`` (or ``None``)."""

        def compute() -> tuple[Tensor, Tensor | None]:
            x = problem.x
            if isinstance(problem.resolved.base, OneHotCategorical):
                x = x.argmax(-1)
            index = x.reshape(x.shape[0], *problem.plate_shape).movedim(0, -1).long()
            baseline = problem.options.get("baseline", True)
            return _set_weights(self._log_probs(problem), index, baseline)

        weights: tuple[Tensor, Tensor | None] = problem.memo("unordered_set", compute)
        return weights

    def value(self, problem: Problem, fx: Tensor) -> Tensor:
        r"""The set's unbiased estimate :math:`\sum_{s \in S} p(s) R(S, s) f(s)` of
        :math:`\mathbb{E}[f]` (``fx`` keeps f's graph)."""
        alpha = self._weights(problem)[0].movedim(-1, 0).to(fx.dtype)  # (k, *plate)
        alpha = alpha.reshape(*alpha.shape, *([1] * (fx.dim() - alpha.dim())))
        return (alpha * fx).sum(0)

    def estimate(self, problem: Problem, *, baseline: bool = True) -> dict[str, Tensor]:
        alpha, beta = self._weights(problem)
        signal = problem.signal.movedim(0, -1)  # (*plate, k)
        centred = signal
        if beta is not None:
            centred = signal - (beta.to(signal.dtype) @ signal.unsqueeze(-1)).squeeze(-1)
        weights = problem.broadcast((alpha.to(signal.dtype) * centred).movedim(-1, 0))
        x = problem.x

        def surrogate(rebuilt: Distribution) -> Tensor:
            return weights * log_prob(rebuilt, x)

        return {n: g.unsqueeze(0) for n, g in problem.summed_gradients(surrogate).items()}
