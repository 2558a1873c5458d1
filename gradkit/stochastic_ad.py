r"""Stochastic derivatives of whole programs with discrete randomness (stochastic triples).

Arya, Schauer, Schäfer and Rackauckas (2022) differentiate :math:`\mathbb{E}[f(X(\theta))]` for
a *program*: Python code whose discrete random draws have parameters that depend on
:math:`\theta` and on earlier draws, through loops, arithmetic, comparisons and table lookups.
This module brings their method to PyTorch.

**The stochastic derivative of one draw.** Draw :math:`X \sim p_\theta` on the integers by
inversion, :math:`X = \min\{k : F_\theta(k) \ge U\}` with :math:`U` uniform and
:math:`F_\theta` the CDF. Keep :math:`U` and move :math:`\theta` to :math:`\theta+\varepsilon`:
the boundaries :math:`F_\theta(k)` move by :math:`\varepsilon\,\partial_\theta F_\theta(k)`, so
given :math:`X = k` the draw jumps

* up to :math:`k+1` with probability :math:`\varepsilon\,w_\uparrow + o(\varepsilon)`,
  :math:`w_\uparrow = \max(0, -\partial_\theta F_\theta(k)) / p_\theta(k)`,
* down to :math:`k-1` with probability :math:`\varepsilon\,w_\downarrow + o(\varepsilon)`,
  :math:`w_\downarrow = \max(0, \partial_\theta F_\theta(k-1)) / p_\theta(k)`,

and otherwise stays. Hence :math:`\frac{d}{d\theta}\mathbb{E}[f(X)] = \mathbb{E}[w_\uparrow
(f(X+1) - f(X)) + w_\downarrow (f(X-1) - f(X))]`: an unbiased estimate from one draw and one
*alternative* value per direction, with no score and no perturbed distribution. For a
Bernoulli with :math:`\partial_\theta p > 0` this is :math:`\partial_\theta p / (1-p)` times
the effect of turning a 0 into a 1; for a Poisson rate it is :math:`\partial_\theta\lambda`
times the effect of one more event.

**A program.** A run carries a *stochastic triple* for each value: its primal value, its
infinitesimal derivative :math:`\delta` (forward-mode autodiff, through continuous
dependence on :math:`\theta`), and one *alternative world* with a weight :math:`W`: the
whole program re-run with one draw jumped, every later draw coupled to the primal one through
the same :math:`U`. To first order in :math:`\varepsilon` at most one draw jumps, so

.. math::

    \frac{d}{d\theta}\mathbb{E}[f] = \mathbb{E}\Big[\delta_f + \sum_k w_k \big(f(\text{world}_k)
    - f\big)\Big],

a sum over every draw :math:`k` of the run (Arya et al. 2022, theorem 2.2). Carrying every
world is quadratic in the program's length; the paper **prunes** instead: when a draw offers
new alternatives of total weight :math:`m` while the run holds one of weight :math:`W`, the new
one is taken with probability :math:`m / (W + m)` (and among the new ones in proportion to
their weights), and the run's weight becomes :math:`W + m`. Like reservoir sampling this keeps
world :math:`k` with probability :math:`w_k / \sum_j w_j` and weight :math:`\sum_j w_j`, so
the expectation of :math:`W(f(\text{world}) - f)` given the primal run is exactly the sum
above: unbiased, at the cost of one alternative evaluation per operation. At the end of a
parameter's range (a Bernoulli at :math:`p = 1`, say) the right derivative does not exist and
the jump it would need has probability 0; there the same movement of the boundary is counted
from the other side with a negative weight (the derivative from inside), pruning draws
candidates in proportion to :math:`|w|` and keeps the sign of the one it takes. The **smoothed**
variant (``strategy="smooth"``) replaces each jump by its mean effect, :math:`\delta_X =
w_\uparrow - w_\downarrow`, and propagates it as an ordinary derivative: no alternative world
and lower variance, but biased wherever the program is nonlinear in a discrete value (and
blind to comparisons); it is marked biased.

**What a program may do.** :func:`derivative_estimates` calls ``program(theta)`` once with a
:class:`StochasticTriple` in place of ``theta``: a tensor-like value for one run (its
``shape`` is ``theta.shape``) that holds all runs at once. Every torch operation on it is
applied to the primal runs and to the alternative worlds with the semantics of
:func:`torch.func.vmap` (runs never mix), and differentiated forward; draws use this module's
samplers. A Python ``if``, ``while``, ``bool()``, ``int()``, ``float()`` or ``.item()`` on such
a value raises :class:`UnsupportedOperation` (the two worlds may need different branches:
write the branch with :func:`torch.where`); so do in-place operations, ``detach`` and torch's
own random functions inside the program (which would give every run the same draw and no
derivative). No operation drops a derivative silently; the one thing that cannot be checked is
a tensor captured from outside the program, which carries none.

The same samplers record each draw's log-probability, so :func:`score_function_estimates`
gives the score-function estimate of the same program, with a leave-one-out baseline, from
the same random numbers. For one draw from a torch distribution the estimator is registered
as ``"stochastic_ad"`` (Bernoulli, Binomial, Geometric, Poisson, Categorical) for
:func:`gradkit.autodiff.expectation` and ``gk.ESTIMATORS``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.distributions import Bernoulli, Binomial, Categorical, Geometric, Poisson
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from gradkit import _checks
from gradkit.distributions import base_distribution
from gradkit.registry import Estimator, Problem, register_estimator

__all__ = [
    "StochasticTriple",
    "UnsupportedOperation",
    "bernoulli",
    "binomial",
    "categorical",
    "derivative_estimates",
    "geometric",
    "poisson",
    "program_values",
    "score_function_estimates",
]

STRATEGIES = ("prune", "smooth")


class UnsupportedOperation(TypeError):
    """An operation inside a program that stochastic triples cannot carry (the message says
    what to write instead)."""


# -- the distributions: CDF, inverse CDF and log-probability on the integers ------------------


def _poisson_log_pmf(rate: Tensor, k: Tensor) -> Tensor:
    r""":math:`\log p_\lambda(k) = k \log\lambda - \lambda - \log k!` (0 log 0 = 0)."""
    return _xlogy(k, rate) - rate - torch.lgamma(k + 1.0)


class _PoissonCDF(torch.autograd.Function):
    """:math:`F_\\lambda(k) = Q(k+1, \\lambda)`, with :math:`\\partial_\\lambda F = -p_\\lambda(k)`
    in both autodiff modes (torch's ``gammaincc`` has no forward-mode derivative)."""

    @staticmethod
    def forward(k: Tensor, rate: Tensor) -> Tensor:
        return torch.special.gammaincc(k + 1.0, rate)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        k, rate = inputs
        pmf = _poisson_log_pmf(rate, k).exp()
        ctx.save_for_backward(pmf)
        ctx.save_for_forward(pmf)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        (pmf,) = ctx.saved_tensors
        return None, -grad * pmf

    @staticmethod
    def jvp(ctx: Any, k_tangent: Tensor | None, rate_tangent: Tensor) -> Tensor:
        (pmf,) = ctx.saved_tensors
        return -rate_tangent * pmf


def _binomial_table(n: Tensor, p: Tensor) -> Tensor:
    """``pmf[..., j]`` of Binomial(n, p) for ``j = 0..max(n)`` (zero above ``n``)."""
    top = int(n.max()) if n.numel() else 0
    j = torch.arange(top + 1, dtype=p.dtype, device=p.device)
    return _binomial_pmf(n.unsqueeze(-1), p.unsqueeze(-1), j)


def _at(table: Tensor, k: Tensor) -> Tensor:
    """``table[..., k]`` per element, ``k`` clamped into the table."""
    shape = torch.broadcast_shapes(table.shape[:-1], k.shape)
    index = k.long().clamp(0, table.shape[-1] - 1).expand(shape).unsqueeze(-1)
    return table.expand(*shape, table.shape[-1]).gather(-1, index).squeeze(-1)


@dataclass(frozen=True)
class _Family:
    """One family of integer-valued draws: how to draw by inversion and how its CDF moves.

    ``params`` are tensors broadcast to one shape per call (the probability table of a
    categorical keeps its last dimension). ``cdf`` must be differentiable in both autodiff
    modes; ``icdf`` and ``upper`` are used without derivatives.
    """

    name: str
    torch_type: type
    param_names: tuple[str, ...]
    cdf: Callable[..., Tensor]
    icdf: Callable[..., Tensor]
    log_prob: Callable[..., Tensor]
    upper: Callable[..., Tensor | None]
    check: Callable[..., None]
    integer: bool = False  # the draw is an index (long), not a count
    discrete: tuple[int, ...] = ()  # parameters without a derivative (a number of trials)
    #: the values an up and a down jump reach from ``x`` (default ``x + 1`` and ``x - 1``)
    neighbours: Callable[..., tuple[Tensor, Tensor]] | None = None

    def targets(self, params: Sequence[Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        """Where the up and the down jump from ``x`` land."""
        if self.neighbours is not None:
            return self.neighbours(*params, x)
        return x + 1, x - 1

    def rates(self, params: Sequence[Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        """Jump weights ``(up, down)`` at ``x`` from the tangents of the CDF (forward mode)."""
        plain = [_plain(p) for p in params]
        slope_at = _tangent(self.cdf(*params, x.to(plain[-1].dtype)))
        slope_below = _tangent(self.cdf(*params, x.to(plain[-1].dtype) - 1.0))
        return self.weights(plain, x, slope_at, slope_below)

    def weights(
        self, params: Sequence[Tensor], x: Tensor, slope_at: Tensor, slope_below: Tensor
    ) -> tuple[Tensor, Tensor]:
        r"""Signed jump weights from the CDF's derivatives at ``x`` and below it.

        The boundary above ``x`` moving down sends mass up, weight
        :math:`-\partial F(x)/p(x) > 0` (the right-derivative coupling); moving up it takes
        mass from the category above, counted when that category is drawn. Only where the
        category on the other side has probability 0 (a parameter at the edge of its range,
        such as :math:`p = 1`, where the right derivative does not exist and the derivative is
        the one from inside) is the movement counted here, with a negative weight. Likewise for
        the boundary below. ``slope_*`` may be per-sample gradients (the registered
        estimator) or forward tangents (programs); the weights broadcast like them.
        """
        xf = x.to(params[-1].dtype)
        above, below = self.targets(params, xf)
        tiny = torch.finfo(xf.dtype).tiny
        extra = slope_at.dim() - xf.dim()  # a categorical's table of parameters

        def per_element(t: Tensor) -> Tensor:
            return t.reshape(*t.shape, *([1] * extra))

        pmf = per_element(self.log_prob(*params, xf).exp().clamp_min(tiny))
        top = self.upper(*params)
        has_above = above != xf if top is None else (above != xf) & (above <= top)
        has_below = (below != xf) & (below >= 0)
        empty_above = per_element(has_above & (self.log_prob(*params, above).exp() == 0))
        empty_below = per_element(has_below & (self.log_prob(*params, below).exp() == 0))
        up = -slope_at / pmf
        down = slope_below / pmf
        up = torch.where(per_element(has_above) & ((up > 0) | empty_above), up, 0.0)
        down = torch.where(per_element(has_below) & ((down > 0) | empty_below), down, 0.0)
        return up, down


def _xlogy(k: Tensor, y: Tensor) -> Tensor:
    """``k log y`` with 0 where ``k = 0``, and a derivative that is 0 there too (no 0/0)."""
    empty = k == 0
    return torch.where(empty, 0.0, k * torch.log(torch.where(empty, 1.0, y)))


def _below_zero(k: Tensor, value: Tensor) -> Tensor:
    return torch.where(k < 0, torch.zeros_like(value), value)


def _range_error(sampler: str, what: str, values: Tensor, fix: str) -> ValueError:
    lo, hi = float(values.min()), float(values.max())
    return ValueError(f"{sampler} needs {what}, got values in [{lo:.4g}, {hi:.4g}]; {fix}")


def _check_unit(sampler: str, p: Tensor, *, open_low: bool = False) -> None:
    bad = ~((p > 0) if open_low else (p >= 0)) | ~(p <= 1) | torch.isnan(p)
    if bool(bad.any()):
        what = "probabilities in (0, 1]" if open_low else "probabilities in [0, 1]"
        raise _range_error(
            sampler, what, p, "pass them through torch.sigmoid or clamp them (in every run)"
        )


def _check_bernoulli(p: Tensor) -> None:
    _check_unit("bernoulli(p)", p)


def _check_binomial(n: Tensor, p: Tensor) -> None:
    if bool(((n < 0) | (n != n.round()) | torch.isnan(n)).any()):
        raise _range_error(
            "binomial(n, p)", "a whole number of trials n >= 0", n, "round or clamp n"
        )
    _check_unit("binomial(n, p)", p)


def _check_geometric(p: Tensor) -> None:
    _check_unit("geometric(p)", p, open_low=True)


def _check_poisson(rate: Tensor) -> None:
    if bool(((rate < 0) | ~torch.isfinite(rate)).any()):
        raise _range_error(
            "poisson(rate)", "finite rates >= 0", rate, "pass them through torch.exp or clamp"
        )


def _check_categorical(probs: Tensor) -> None:
    _check_unit("categorical(probs)", probs)
    if bool((probs.sum(-1) <= 0).any()):
        raise ValueError(
            "categorical(probs) needs some positive probability in every table; got a table of "
            "zeros"
        )


def _geometric_cdf(p: Tensor, k: Tensor) -> Tensor:
    """:math:`1 - (1-p)^{k+1}`: through ``expm1`` for small ``p`` (precision), as a power near
    ``p = 1`` (where the logarithm's derivative would be infinite); each branch sees a safe
    ``p`` so that neither autodiff mode meets 0 times infinity."""
    small = p < 0.5
    low = -torch.expm1((k + 1.0) * torch.log1p(-torch.where(small, p, 0.25)))
    high = 1.0 - torch.pow(1.0 - torch.where(small, 0.75, p), k + 1.0)
    return torch.where(small, low, high)


def _poisson_icdf(rate: Tensor, u: Tensor) -> Tensor:
    r"""The inverse CDF on a window of 12 standard deviations (and 20) either side of the rate,
    in float64: the CDF at the window's start by one ``gammaincc``, then a cumulative sum of
    the probabilities, each the previous times :math:`\lambda/k` (beyond the window lies less
    than 1e-30 of the mass)."""
    lam, v = rate.double(), u.double()
    spread = 12.0 * lam.sqrt() + 20.0
    start = (lam - spread).clamp_min(0.0).floor()
    width = math.ceil(float((lam - start + spread).max())) + 1 if lam.numel() else 1
    first = _poisson_log_pmf(lam, start).exp()
    steps = torch.arange(1, width, dtype=lam.dtype, device=lam.device)
    ratios = lam.unsqueeze(-1) / (start.unsqueeze(-1) + steps)  # p(k + 1) / p(k)
    pmf = first.unsqueeze(-1) * torch.cat([torch.ones_like(ratios[..., :1]), ratios], -1).cumprod(
        -1
    )
    below = torch.where(start > 0, torch.special.gammaincc(start.clamp_min(1.0), lam), 0.0)
    cdf = below.unsqueeze(-1) + pmf.cumsum(-1)
    return (start + (cdf < v.unsqueeze(-1)).sum(-1)).to(rate.dtype)


def _binomial_pmf(n: Tensor, p: Tensor, k: Tensor) -> Tensor:
    """Binomial(n, p) probabilities at ``k`` (0 outside ``0..n``), exact at ``p`` = 0 and 1."""
    inside = (k >= 0) & (k <= n)
    kk, rest = k.clamp(min=0.0), (n - k).clamp(min=0.0)
    log_pmf = (
        torch.lgamma(n + 1.0)
        - torch.lgamma(kk + 1.0)
        - torch.lgamma(rest + 1.0)
        + _xlogy(kk, p)
        + _xlogy(rest, 1.0 - p)
    )
    return torch.where(inside, log_pmf.exp(), 0.0)


class _BinomialCDF(torch.autograd.Function):
    r""":math:`F_{n,p}(k)` with :math:`\partial_p F = -n\,p_{n-1,p}(k)` in both autodiff modes
    (the sum of log-space probabilities would meet :math:`0 \cdot \infty` at ``p`` = 0 or 1)."""

    @staticmethod
    def forward(n: Tensor, p: Tensor, k: Tensor) -> Tensor:
        table = _binomial_table(n, p)
        j = torch.arange(table.shape[-1], dtype=p.dtype, device=p.device)
        return (table * (j <= k.unsqueeze(-1))).sum(-1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        n, p, k = inputs
        slope = -n * _binomial_pmf(n - 1.0, p, k)
        ctx.save_for_backward(slope)
        ctx.save_for_forward(slope)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        (slope,) = ctx.saved_tensors
        return None, grad * slope, None

    @staticmethod
    def jvp(ctx: Any, n_tangent: Any, p_tangent: Tensor, k_tangent: Any) -> Tensor:
        (slope,) = ctx.saved_tensors
        return p_tangent * slope


def _binomial_cdf(n: Tensor, p: Tensor, k: Tensor) -> Tensor:
    n, p, k = torch.broadcast_tensors(n, p, k)
    return _below_zero(k, _BinomialCDF.apply(n, p, k))


def _binomial_icdf(n: Tensor, p: Tensor, u: Tensor) -> Tensor:
    cdf = _binomial_table(n.double(), p.double()).cumsum(-1)
    below = (cdf < u.double().unsqueeze(-1)).sum(-1).to(p.dtype)
    return torch.minimum(below, n)


def _categorical_neighbours(probs: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """The nearest categories above and below ``x`` with positive probability (``x`` itself
    where there is none): an empty category has an empty interval, so a jump passes it."""
    index = torch.arange(probs.shape[-1], device=x.device)
    xi = x.long().unsqueeze(-1)
    positive = probs > 0
    above = torch.where(positive & (index > xi), index, probs.shape[-1]).amin(-1)
    below = torch.where(positive & (index < xi), index, -1).amax(-1)
    above = torch.where(above < probs.shape[-1], above, x.long())
    below = torch.where(below >= 0, below, x.long())
    return above.to(x.dtype), below.to(x.dtype)


def _check_empty_categories(probs: Tensor, moves: Tensor, where: str) -> None:
    r"""Refuse a category of probability 0 whose probability moves: its jump has weight
    :math:`\partial p / p` with nothing to sample it from."""
    if bool(((probs == 0) & (moves != 0)).any()):
        raise ValueError(
            f"{where}: a category has probability 0 while its probability changes with the "
            "parameters, so the jumps into it cannot be sampled; give every category a positive "
            "probability (e.g. torch.softmax of logits) or use the score function"
        )


def _categorical_icdf(probs: Tensor, u: Tensor) -> Tensor:
    cdf = probs.cumsum(-1)[..., :-1]
    return (cdf < u.unsqueeze(-1)).sum(-1)


_BERNOULLI = _Family(
    "bernoulli",
    Bernoulli,
    ("probs",),
    cdf=lambda p, k: _below_zero(k, torch.where(k < 1, 1.0 - p, torch.ones_like(p))),
    icdf=lambda p, u: (u > 1.0 - p).to(p.dtype),
    log_prob=lambda p, k: _xlogy(k, p) + _xlogy(1.0 - k, 1.0 - p),
    upper=lambda p: torch.ones_like(p),
    check=_check_bernoulli,
)
_BINOMIAL = _Family(
    "binomial",
    Binomial,
    ("total_count", "probs"),
    cdf=_binomial_cdf,
    icdf=_binomial_icdf,
    log_prob=lambda n, p, k: torch.log(_binomial_pmf(n, p, k)),
    upper=lambda n, p: n,
    check=_check_binomial,
    discrete=(0,),
)
_GEOMETRIC = _Family(
    "geometric",
    Geometric,
    ("probs",),
    cdf=lambda p, k: _below_zero(k, _geometric_cdf(p, k)),
    icdf=lambda p, u: (torch.ceil(torch.log1p(-u) / torch.log1p(-p)) - 1.0).clamp_min(0.0),
    log_prob=lambda p, k: _xlogy(k, 1.0 - p) + torch.log(p),
    upper=lambda p: None,
    check=_check_geometric,
)
_POISSON = _Family(
    "poisson",
    Poisson,
    ("rate",),
    cdf=lambda rate, k: _below_zero(k, _PoissonCDF.apply(k.clamp_min(0.0), rate)),
    icdf=_poisson_icdf,
    log_prob=_poisson_log_pmf,
    upper=lambda rate: None,
    check=_check_poisson,
)
_CATEGORICAL = _Family(
    "categorical",
    Categorical,
    ("probs",),
    cdf=lambda probs, k: _below_zero(k, _at(probs.cumsum(-1), k)),
    icdf=_categorical_icdf,
    log_prob=lambda probs, k: torch.log(_at(probs, k)),
    upper=lambda probs: torch.full(
        probs.shape[:-1], probs.shape[-1] - 1, dtype=probs.dtype, device=probs.device
    ),
    check=_check_categorical,
    integer=True,
    neighbours=_categorical_neighbours,
)
FAMILIES = (_BERNOULLI, _BINOMIAL, _GEOMETRIC, _POISSON, _CATEGORICAL)


def _tangent(t: Tensor) -> Tensor:
    tangent = fwAD.unpack_dual(t).tangent
    return torch.zeros_like(fwAD.unpack_dual(t).primal) if tangent is None else tangent


def _plain(t: Tensor) -> Tensor:
    return fwAD.unpack_dual(t).primal


# -- what a program may not do ----------------------------------------------------------------

_RANDOM = {
    "rand": "", "rand_like": "", "randn": "", "randn_like": "", "randint": "",
    "randint_like": "", "randperm": "", "normal": "", "normal_": "", "uniform_": "",
    "exponential_": "", "cauchy_": "", "log_normal_": "", "random_": "", "_standard_gamma": "",
    "_sample_dirichlet": "", "dropout": "", "native_dropout": "", "alpha_dropout": "",
    "feature_alpha_dropout": "", "rrelu": "", "gumbel_softmax": "",
    "bernoulli": "bernoulli", "bernoulli_": "bernoulli", "binomial": "binomial",
    "poisson": "poisson", "multinomial": "categorical", "geometric_": "geometric",
}  # fmt: skip
_BLOCKED = {
    "item": "a Python number",
    "tolist": "Python numbers",
    "numpy": "a NumPy array",
    "__array__": "a NumPy array",
    "detach": "a tensor without its derivative",
    "data": "a tensor without its derivative",
    "backward": "a reverse-mode gradient",
    "requires_grad_": "a reverse-mode leaf",
    "__setitem__": "an in-place assignment",
    "__dlpack__": "a tensor outside the runs (torch.as_tensor, torch.tensor)",
    "__dlpack_device__": "a tensor outside the runs (torch.as_tensor, torch.tensor)",
}


def _name(func: Any) -> str:
    return str(getattr(func, "__name__", repr(func)))


def _random_message(name: str) -> str:
    ours = _RANDOM.get(name, "")
    fix = (
        f"draw with gradkit.stochastic_ad.{ours}(...) instead"
        if ours
        else "draw with gradkit.stochastic_ad's samplers (bernoulli, binomial, geometric, "
        "poisson, categorical); continuous draws are not supported inside a program"
    )
    return (
        f"the program calls torch's own random function {name}: its draw would be shared by "
        f"all runs and carry no derivative; {fix}"
    )


def _control_flow(what: str) -> UnsupportedOperation:
    return UnsupportedOperation(
        f"{what} of a value that depends on theta or on a random draw cannot be followed by "
        "stochastic triples: the primal run and its alternative world may need different "
        "branches (and the value differs between runs). Write the branch with "
        "torch.where(condition, if_true, if_false), and keep values as tensors"
    )


def _refuse(func: Any, kwargs: dict[str, Any]) -> None:
    name = _name(func)
    if name in _RANDOM:
        raise UnsupportedOperation(_random_message(name))
    if name in _BLOCKED:
        raise UnsupportedOperation(
            f"{name} would turn a stochastic triple into {_BLOCKED[name]} and lose its "
            "derivative; keep the value a tensor inside the program (build tensors with "
            "torch.stack, torch.cat or torch.where, return the result)"
        )
    in_place = name.endswith("_") and not name.endswith("__")
    if in_place or (name.startswith("__i") and name.endswith("__")) or "out" in kwargs:
        raise UnsupportedOperation(
            f"the in-place operation {name} cannot be carried by stochastic triples (the runs "
            "and their alternative worlds are separate values); write it out of place, e.g. "
            "x = x + y instead of x += y, torch.where or torch.cat instead of assignment"
        )


class _Guard(TorchFunctionMode):
    """Refuses torch's own random functions while a program runs."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = _name(func)
        if name in _RANDOM:
            raise UnsupportedOperation(_random_message(name))
        if StochasticTriple in types:
            return _apply(func, args, kwargs or {})
        return func(*args, **(kwargs or {}))


# -- one call: all runs, their alternative worlds and the pruning state -------------------------


class _Run:
    """The state of one :func:`derivative_estimates` or :func:`score_function_estimates` call.

    Rows are runs: ``num_samples * d`` of them for ``d = theta.numel()`` directions, row
    ``n * d + j`` being sample ``n`` differentiated along coordinate ``j``. The rows of one
    sample share their draws (their uniforms); pruning is drawn per row.
    """

    def __init__(
        self, theta: Tensor, num_samples: int, mode: str, generator: torch.Generator | None
    ) -> None:
        self.mode = mode
        self.samples = num_samples
        self.directions = max(theta.numel(), 1)
        self.rows = num_samples * self.directions
        self.dtype, self.device = theta.dtype, theta.device
        self.generator = generator
        stream = theta.device if generator is None else generator.device
        seed = int(torch.randint(2**62, (), generator=generator, device=stream))
        self.pruner = torch.Generator(device=theta.device).manual_seed(seed)
        self.world = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self.weight = torch.zeros(self.rows, dtype=self.dtype, device=self.device)
        self.sign = torch.ones(self.rows, dtype=self.dtype, device=self.device)
        self.logp = torch.zeros(self.rows, dtype=self.dtype, device=self.device)
        self.epoch = 0
        self.next_world = 1
        self.live = True

    @property
    def prunes(self) -> bool:
        return self.mode == "prune"

    def theta(self, theta: Tensor) -> StochasticTriple:
        d = self.directions
        flat = theta.detach().reshape(1, d).expand(self.rows, d)
        tangent = torch.eye(d, dtype=self.dtype, device=self.device).repeat(self.samples, 1)
        shape = (self.rows, *theta.shape)
        with warnings.catch_warnings():
            # torch loads its forward-mode decompositions on the first dual tensor, through a
            # deprecated torch.jit.script call of its own: nothing a user can act on
            warnings.filterwarnings(
                "ignore", "`torch.jit.script` is deprecated", DeprecationWarning
            )
            primal = fwAD.make_dual(flat.reshape(shape).clone(), tangent.reshape(shape))
        return StochasticTriple(primal, primal.detach() if self.prunes else None, self)

    def uniform(self, shape: Sequence[int]) -> Tensor:
        u = torch.rand(
            (self.samples, *shape), generator=self.generator, dtype=self.dtype, device=self.device
        )
        return u.repeat_interleave(self.directions, 0)

    def alternative(self, t: StochasticTriple) -> Tensor:
        """``t`` in the run's current alternative world (its primal where that world began
        after ``t`` was made)."""
        primal = _plain(t._primal)
        if t._alt is None:
            return primal
        if t._epoch == self.epoch:
            return t._alt
        valid = (t._world == self.world).reshape(self.rows, *([1] * (primal.dim() - 1)))
        return torch.where(valid, t._alt, primal)

    def draw(self, family: _Family, values: Sequence[Any]) -> StochasticTriple:
        primal, alt = self._parameters(family, values)
        if family.integer and primal[0].dim() < 2:
            raise ValueError(
                "categorical(probs) needs a last dimension of categories, got one number per "
                "run; pass a table, e.g. torch.stack([p, 1 - p])"
            )
        family.check(*[_plain(p) for p in primal])
        if self.prunes:
            family.check(*alt)
        if family.integer:
            primal[0] = primal[0] / primal[0].sum(-1, keepdim=True)  # as torch's Categorical
            if self.prunes:
                alt[0] = alt[0] / alt[0].sum(-1, keepdim=True)
        trials = self._trials(family, primal)
        plain = [_plain(p) for p in primal]
        if family.integer:
            _check_empty_categories(plain[0], _tangent(primal[0]), "categorical(probs)")
        shape = plain[-1].shape[1:-1] if family.integer else plain[-1].shape[1:]
        u = self.uniform(shape)
        x = family.icdf(*plain, u)
        if self.mode == "score":
            lp = family.log_prob(*primal, x.to(self.dtype))
            self.logp = self.logp + lp.reshape(self.rows, -1).sum(1)
            return StochasticTriple(x, None, self)
        up, down = family.rates(primal, x)
        if self.mode == "smooth":
            if family.integer:
                raise UnsupportedOperation(
                    f"strategy='smooth' cannot carry a {family.name} draw: an index has no "
                    "derivative to smooth into; use strategy='prune' (the default)"
                )
            smoothed = up - down
            if trials is not None:  # each extra trial succeeds with probability p
                smoothed = smoothed + trials * plain[-1]
            return StochasticTriple(fwAD.make_dual(x, smoothed), None, self)
        x_alt = self._coupled(family, alt, plain, x, u)
        return StochasticTriple(x, self._prune(x, x_alt, up, down, family.targets(plain, x)), self)

    def _trials(self, family: _Family, primal: list[Tensor]) -> Tensor | None:
        """Strip the derivative of a number of trials (in place); return it where the smoothed
        strategy uses it, refuse it where a count cannot move continuously."""
        moved = None
        for i in family.discrete:
            moves = _tangent(primal[i])
            primal[i] = _plain(primal[i])
            if not bool((moves != 0).any()):
                continue
            if self.mode != "smooth":
                raise UnsupportedOperation(
                    f"{family.name}: its number of trials changes continuously with theta, and a "
                    "count has no derivative; make the number of trials a draw (it may depend on "
                    "theta through its distribution) or a constant"
                )
            moved = moves
        return moved

    def _parameters(
        self, family: _Family, values: Sequence[Any]
    ) -> tuple[list[Tensor], list[Tensor]]:
        primal, alt = [], []
        for v in values:
            if isinstance(v, StochasticTriple):
                p, a = v._primal, self.alternative(v) if self.prunes else None
            else:
                t = torch.as_tensor(v, device=self.device)
                p, a = t.expand(self.rows, *t.shape), None
            if not p.is_floating_point():
                p = p.to(self.dtype)
            primal.append(p)
            alt.append(p if a is None else a.to(p.dtype))
        if len(primal) > 1:
            ndim = max(p.dim() for p in primal)
            primal = list(torch.broadcast_tensors(*[_lift(p, ndim) for p in primal]))
            alt = list(torch.broadcast_tensors(*[_lift(a, ndim) for a in alt]))
        return primal, alt

    def _coupled(
        self, family: _Family, alt: list[Tensor], plain: list[Tensor], x: Tensor, u: Tensor
    ) -> Tensor:
        """The draw in the alternative worlds, from the same uniforms; recomputed only in the
        runs whose alternative parameters differ from the primal ones (``plain``)."""
        differs = torch.zeros(self.rows, dtype=torch.bool, device=self.device)
        for a, p in zip(alt, plain, strict=True):
            differs |= (a != p).reshape(self.rows, -1).any(1)
        if not bool(differs.any()):
            return x
        rows = differs.nonzero().squeeze(1)
        out = x.clone()
        out[rows] = family.icdf(*[a[rows] for a in alt], u[rows])
        return out

    def _prune(
        self, x: Tensor, x_alt: Tensor, up: Tensor, down: Tensor, targets: tuple[Tensor, Tensor]
    ) -> Tensor:
        """The draw's value in the run's alternative world, after offering its own jumps (to
        ``targets``, the values an up and a down jump reach)."""
        rows = self.rows
        signed = torch.cat([up.reshape(rows, -1), down.reshape(rows, -1)], 1)
        rates = signed.abs()
        mass = rates.sum(1)
        if not bool((mass > 0).any()):
            return x_alt
        count = rates.shape[1] // 2
        u = torch.rand((2, rows), generator=self.pruner, dtype=self.dtype, device=self.device)
        pick = (rates.cumsum(1) < ((1.0 - u[0]) * mass).unsqueeze(1)).sum(1)
        pick = pick.clamp(max=2 * count - 1)
        take = u[1] * (self.weight + mass) < mass
        chosen = torch.sign(signed.gather(1, pick.unsqueeze(1)).squeeze(1))
        self.sign = torch.where(take, chosen, self.sign)
        reach = torch.cat([t.reshape(rows, -1) for t in targets], 1).to(x.dtype)
        flat = x.reshape(rows, -1)
        jumped = flat.scatter(1, (pick % count).unsqueeze(1), reach.gather(1, pick.unsqueeze(1)))
        alt = torch.where(_lift(take, x.dim()), jumped.reshape(x.shape), x_alt)
        self.weight = self.weight + mass
        self.world = torch.where(take, self.next_world, self.world)
        self.next_world += 1
        self.epoch += 1
        return alt

    def estimates(self, out: Any) -> Tensor:
        """Per-row derivative estimates of the program's output."""
        value = self._output(out)
        primal = _plain(value._primal).to(self.dtype)
        est = _tangent(value._primal).to(self.dtype)
        if self.prunes:
            change = self.alternative(value).to(self.dtype) - primal
            est = est + self.sign * self.weight * change
        return est

    def _output(self, out: Any) -> StochasticTriple:
        if not isinstance(out, StochasticTriple):
            if isinstance(out, (int, float)) or (isinstance(out, Tensor) and out.dim() == 0):
                constant = torch.as_tensor(out, dtype=self.dtype, device=self.device)
                rows = constant.expand(self.rows)
                return StochasticTriple(rows, rows if self.prunes else None, self)
            raise TypeError(
                f"the program must return one scalar per run (a 0-dimensional tensor computed "
                f"from theta), got {type(out).__name__}"
                + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else "")
            )
        if out._run is not self:
            raise UnsupportedOperation(
                "the program returned a value of another derivative_estimates call"
            )
        if out.shape != ():
            raise TypeError(
                f"the program must return one scalar per run, got shape {tuple(out.shape)}: "
                "reduce it (.sum(), .mean()) or index it; the runs are vectorised for you"
            )
        if out.dtype == torch.bool:
            raise TypeError(
                "the program returned a bool; return a number, e.g. condition.to(theta.dtype)"
            )
        return out


def _lift(t: Tensor, ndim: int) -> Tensor:
    """Rows ``(R, *s)`` -> ``(R, 1, ..., 1, *s)`` with ``ndim`` dimensions (for broadcasting)."""
    return t.reshape(t.shape[0], *([1] * (ndim - t.dim())), *t.shape[1:])


_RUNS: list[_Run] = []


def _current_run(values: Sequence[Any]) -> _Run | None:
    runs = {id(v._run): v._run for v in values if isinstance(v, StochasticTriple)}
    for run in runs.values():
        if not run.live:
            raise UnsupportedOperation(
                "a stochastic triple was used after its derivative_estimates call returned; "
                "keep every use inside the program"
            )
    active = _RUNS[-1] if _RUNS else None
    if runs and (len(runs) > 1 or active is None or id(active) not in runs):
        raise UnsupportedOperation(
            "values of different derivative_estimates calls were mixed in one operation"
        )
    return active


# -- the value a program sees -------------------------------------------------------------------


class StochasticTriple:
    r"""A value of a program for one run, holding all runs of one call at once.

    It stands for a tensor of shape ``shape`` (what the program sees) and stores privately,
    with a leading dimension of runs, the primal values (a forward-mode dual tensor: each run's
    value and its derivative :math:`\delta`) and the values in each run's alternative world,
    with a record of which world they belong to. Every torch function and tensor method
    applied to it is applied run by run (the semantics of :func:`torch.func.vmap`) to both
    worlds. The program must compute from the ``theta`` it is given: a tensor captured from
    outside carries no derivative.
    """

    __slots__ = ("_alt", "_epoch", "_primal", "_run", "_world")

    def __init__(self, primal: Tensor, alt: Tensor | None, run: _Run) -> None:
        self._primal = primal
        self._alt = alt
        self._run = run
        self._world = run.world
        self._epoch = run.epoch

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        return _apply(func, args, kwargs or {})

    # -- what does not depend on the run --------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._primal.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self._primal.dtype

    @property
    def device(self) -> torch.device:
        return self._primal.device

    @property
    def ndim(self) -> int:
        return self._primal.dim() - 1

    def dim(self) -> int:
        return self.ndim

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    ndimension = dim
    nelement = numel

    def is_floating_point(self) -> bool:
        return self._primal.is_floating_point()

    def __len__(self) -> int:
        if not self.shape:
            raise UnsupportedOperation(
                "len() of a 0-d stochastic triple (torch.tensor([...]) and torch.as_tensor "
                "ask for it): build tensors from a program's values with torch.stack([...])"
            )
        return self.shape[0]

    def __iter__(self) -> Iterator[StochasticTriple]:
        return (_apply(Tensor.__getitem__, (self, i), {}) for i in range(len(self)))

    # -- what would leave the triple --------------------------------------------------------------

    def __bool__(self) -> bool:
        raise _control_flow(
            "a Python `if`, `while`, `and`/`or` or bool() (torch.distributions check their "
            "arguments this way: inside a program draw with gradkit.stochastic_ad's samplers)"
        )

    def __int__(self) -> int:
        raise _control_flow("int()")

    def __float__(self) -> float:
        raise _control_flow("float()")

    def __index__(self) -> int:
        raise _control_flow("using it as a Python index or range (int)")

    def __complex__(self) -> complex:
        raise _control_flow("complex()")

    def __round__(self, ndigits: int | None = None) -> StochasticTriple:
        kwargs = {} if ndigits is None else {"decimals": ndigits}
        return _apply(torch.round, (self,), kwargs)

    __hash__ = object.__hash__

    def __getattr__(self, name: str) -> Any:
        if name in _BLOCKED:
            _refuse(_Named(name), {})
        attr = getattr(Tensor, name, None)
        if attr is None:
            raise AttributeError(f"'StochasticTriple' (a tensor inside a program) has no {name}")
        if callable(attr):
            return lambda *args, **kwargs: _apply(attr, (self, *args), kwargs)
        return _apply(_Named(name, lambda t: getattr(t, name)), (self,), {})

    def __repr__(self) -> str:
        return (
            f"StochasticTriple(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"runs={self._primal.shape[0]})"
        )


@dataclass(frozen=True)
class _Named:
    """A function with a name (a tensor attribute read as an operation)."""

    __name__: str
    fn: Callable[[Tensor], Any] | None = None

    def __call__(self, t: Tensor) -> Any:
        assert self.fn is not None
        return self.fn(t)


def _operator(name: str) -> Callable[..., Any]:
    method = getattr(Tensor, name)

    def op(self: StochasticTriple, *args: Any) -> Any:
        return torch.overrides.handle_torch_function(method, (self, *args), self, *args)

    op.__name__ = name
    return op


_OPERATORS = (
    "__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __floordiv__ "
    "__rfloordiv__ __mod__ __pow__ __rpow__ __matmul__ __rmatmul__ __neg__ __pos__ __abs__ "
    "__invert__ __and__ __rand__ __or__ __ror__ __xor__ __rxor__ __lt__ __le__ __gt__ __ge__ "
    "__eq__ __ne__ __getitem__ __setitem__"
).split()
for _op in _OPERATORS:
    setattr(StochasticTriple, _op, _operator(_op))

_ELEMENTWISE_NAMES = (
    "add sub subtract mul multiply div divide true_divide floor_divide remainder fmod pow neg "
    "negative abs exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square reciprocal sigmoid "
    "tanh sin cos relu where clamp clip clamp_min clamp_max maximum minimum fmax fmin gt lt ge "
    "le eq ne greater less greater_equal less_equal logical_and logical_or logical_not "
    "logical_xor floor ceil round trunc sign xlogy lgamma erf float double long int bool to "
    "type_as"
).split()
_ELEMENTWISE = {
    f
    for name in _ELEMENTWISE_NAMES
    for f in (getattr(torch, name, None), getattr(Tensor, name, None))
    if f is not None
} | {
    getattr(Tensor, name)
    for name in _OPERATORS
    if name not in ("__getitem__", "__setitem__", "__matmul__", "__rmatmul__")
}


def _apply(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` run by run, in the primal runs and their alternative worlds."""
    _refuse(func, kwargs)
    leaves, spec = tree_flatten((args, kwargs))
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, StochasticTriple)]
    run = _current_run([leaves[i] for i in slots])
    assert run is not None
    triples: list[StochasticTriple] = [leaves[i] for i in slots]
    worlds = [[t._primal for t in triples]]
    if run.prunes:
        worlds.append([run.alternative(t) for t in triples])
    dtypes = {t.dtype for t in triples} | {x.dtype for x in leaves if isinstance(x, Tensor)}
    if func in _ELEMENTWISE and len(dtypes) == 1 and not (func is torch.where and len(args) == 1):
        # one dtype: broadcasting the rows promotes as torch would (a 0-d tensor of another
        # dtype would promote differently once it has a dimension of runs)
        outs = [_broadcast(func, leaves, spec, slots, triples, world) for world in worlds]
    else:
        outs = _mapped(func, leaves, spec, slots, worlds, run.rows)
    flat, out_spec = tree_flatten(outs[0])
    alts = tree_flatten(outs[1])[0] if run.prunes else [None] * len(flat)
    wrapped = []
    for p, a in zip(flat, alts, strict=True):
        if not isinstance(p, Tensor):
            raise UnsupportedOperation(
                f"{_name(func)} returned {type(p).__name__}, which stochastic triples cannot carry"
            )
        wrapped.append(StochasticTriple(p, None if a is None else _plain(a), run))
    return tree_unflatten(wrapped, out_spec)


def _broadcast(
    func: Any,
    leaves: list[Any],
    spec: Any,
    slots: list[int],
    triples: list[StochasticTriple],
    values: list[Tensor],
) -> Any:
    """An elementwise op on rows: each triple ``(R, *s)`` lifted to broadcast like ``s``."""
    ndim = max(
        [t.ndim for t in triples] + [x.dim() for x in leaves if isinstance(x, Tensor)], default=0
    )
    filled = list(leaves)
    for i, v in zip(slots, values, strict=True):
        filled[i] = _lift(v, ndim + 1)
    a, k = tree_unflatten(filled, spec)
    return func(*a, **k)


def _mapped(
    func: Any,
    leaves: list[Any],
    spec: Any,
    slots: list[int],
    worlds: list[list[Tensor]],
    rows: int,
) -> list[Any]:
    """Any other op under :func:`torch.func.vmap` over the rows of both worlds at once."""

    def one_run(*values: Tensor) -> Any:
        filled = list(leaves)
        for i, v in zip(slots, values, strict=True):
            filled[i] = v
        a, k = tree_unflatten(filled, spec)
        return func(*a, **k)

    stacked = [torch.cat(column) for column in zip(*worlds, strict=True)]
    try:
        out = torch.func.vmap(one_run)(*stacked)
    except UnsupportedOperation:
        raise
    except (RuntimeError, NotImplementedError, ValueError) as err:
        raise UnsupportedOperation(
            f"stochastic triples cannot carry {_name(func)} here (it is applied run by run "
            f"under torch.func.vmap): {err}"
        ) from err
    if len(worlds) == 1:
        return [out]
    flat, out_spec = tree_flatten(out)
    first = [x[:rows] if isinstance(x, Tensor) else x for x in flat]
    second = [x[rows:] if isinstance(x, Tensor) else x for x in flat]
    return [tree_unflatten(first, out_spec), tree_unflatten(second, out_spec)]


# -- the samplers -------------------------------------------------------------------------------


def _draw(family: _Family, values: Sequence[Any]) -> Any:
    run = _current_run(values)
    if run is None:
        tensors = [torch.as_tensor(v) for v in values]
        tensors = [t if t.is_floating_point() else t.to(torch.get_default_dtype()) for t in tensors]
        family.check(*tensors)
        dist = family.torch_type(**dict(zip(family.param_names, tensors, strict=True)))
        return dist.sample()
    with torch._C.DisableTorchFunction():
        return run.draw(family, values)


def bernoulli(p: Any) -> Any:
    r"""A Bernoulli draw (1 with probability ``p``), as ``torch.bernoulli`` would give.

    Inside a program its stochastic derivative jumps 0 → 1 with weight
    :math:`\partial p/(1-p)` when :math:`\partial p > 0`, 1 → 0 with weight
    :math:`-\partial p/p` otherwise. Outside a program it is an ordinary sample.
    """
    return _draw(_BERNOULLI, (p,))


def binomial(n: Any, p: Any) -> Any:
    r"""A Binomial(``n``, ``p``) count (``n`` a whole number of trials, without a derivative).

    Jumps: :math:`k \to k+1` with weight :math:`(n-k)\,\partial p/(1-p)` for
    :math:`\partial p > 0`, :math:`k \to k-1` with weight :math:`-k\,\partial p/p` otherwise.
    """
    return _draw(_BINOMIAL, (n, p))


def geometric(p: Any) -> Any:
    r"""The number of failures before the first success, success probability ``p`` in (0, 1].

    :math:`F(k) = 1-(1-p)^{k+1}` rises with :math:`p`: for :math:`\partial p > 0` the draw
    jumps :math:`k \to k-1` with weight :math:`k\,\partial p/(p(1-p))`, otherwise
    :math:`k \to k+1` with weight :math:`-(k+1)\,\partial p/p`.
    """
    return _draw(_GEOMETRIC, (p,))


def poisson(rate: Any) -> Any:
    r"""A Poisson(``rate``) count.

    :math:`\partial_\lambda F(k) = -p_\lambda(k)`: for :math:`\partial\lambda > 0` the draw
    gains one event with weight :math:`\partial\lambda`, otherwise it loses one with weight
    :math:`-\partial\lambda\,k/\lambda`.
    """
    return _draw(_POISSON, (rate,))


def categorical(probs: Any) -> Any:
    r"""A category index (``torch.long``) with probabilities ``probs`` over the last dimension.

    Categories are ordered by index and drawn by inversion: the boundary
    :math:`F(k) = \sum_{j\le k} p_j` moving down sends :math:`k \to k+1` with weight
    :math:`-\partial F(k)/p_k`, the boundary below moving up sends :math:`k \to k-1` with weight
    :math:`\partial F(k-1)/p_k` (both can happen; pruning picks one). A jump passes over
    categories of probability 0 that stay at 0; one whose probability moves is refused (its
    jumps could not be sampled). ``probs`` are normalised over the last dimension, as
    ``torch.distributions.Categorical`` does. A category of tiny positive probability between
    others makes the variance enormous: the coupling moves mass through it, and its own jumps,
    of weight :math:`\propto 1/p`, are seldom drawn; order the categories so that neighbours
    are alike, or use the score function. Use the index to look up a table, ``table[index]``.
    """
    return _draw(_CATEGORICAL, (probs,))


# -- the estimates ------------------------------------------------------------------------------


def _start(
    program: Any, theta: Any, num_samples: Any, generator: Any, mode: str, minimum: int = 1
) -> tuple[_Run, Tensor]:
    """Check the arguments and make the call's state."""
    if _RUNS:
        raise UnsupportedOperation(
            "derivative_estimates, score_function_estimates and program_values cannot run "
            "inside a program; call them from ordinary code"
        )
    if not callable(program):
        raise TypeError(
            f"program must be callable (theta -> one scalar per run), got {type(program).__name__}"
        )
    if not isinstance(theta, Tensor) or not theta.is_floating_point():
        got = (
            f"a tensor of dtype {theta.dtype}"
            if isinstance(theta, Tensor)
            else type(theta).__name__
        )
        raise TypeError(
            f"theta must be a floating-point torch.Tensor, got {got}; pass e.g. "
            "torch.tensor(0.3) or torch.tensor([0.3, 2.0])"
        )
    if theta.numel() == 0:
        raise ValueError("theta has no elements; pass at least one parameter")
    why = "the leave-one-out baseline needs another run" if minimum > 1 else ""
    _checks.check_num_samples(num_samples, minimum, why)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    return _Run(theta, num_samples, mode, generator), theta


def _execute(run: _Run, program: Callable[[Any], Any], theta: Tensor) -> Any:
    """Run the program once for all runs (inside a forward-mode dual level)."""
    _RUNS.append(run)
    try:
        with _Guard():
            return program(run.theta(theta))
    finally:
        _RUNS.pop()
        run.live = False


def derivative_estimates(
    program: Callable[[Any], Any],
    theta: Tensor,
    num_samples: int,
    *,
    strategy: str = "prune",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Per-sample stochastic derivatives of :math:`\frac{d}{d\theta}\mathbb{E}[P(\theta)]` for a
    program :math:`P` (the pruned stochastic triples of the module docstring).

    Args:
        program: ``program(theta)`` for one run, in torch operations, returning one scalar;
            its discrete draws use :func:`bernoulli`, :func:`binomial`, :func:`geometric`,
            :func:`poisson` and :func:`categorical`. It is called once, with a
            :class:`StochasticTriple` that holds every run.
        theta: the parameters, a floating tensor of any shape (not differentiated through: the
            estimates are values).
        num_samples: the number of independent runs.
        strategy: ``"prune"`` (unbiased, the default) or ``"smooth"`` (the smoothed stochastic
            derivative: no alternative world, biased where the program is nonlinear in a
            draw, refuses categorical draws).
        generator: supplies all randomness (the same state gives the same estimates and the
            same draws as :func:`score_function_estimates`); default the global stream.

    Returns:
        a tensor ``(num_samples, *theta.shape)``; row ``n`` is run ``n``'s estimate of every
        coordinate's derivative, and the mean over rows estimates the gradient.

    Raises:
        TypeError: for a ``theta`` that is not a floating tensor, a program that does not
            return one scalar per run, or one that does what triples cannot carry
            (:class:`UnsupportedOperation`: a Python ``if`` on a run's value, in-place
            operations, torch's own samplers).
        ValueError: for probabilities outside [0, 1] (a rate below 0, a categorical table
            that does not sum to 1), an unknown strategy.

    Example:
        >>> import torch, gradkit as gk
        >>> sad = gk.stochastic_ad
        >>> g = sad.derivative_estimates(lambda t: sad.poisson(t) ** 2, torch.tensor(2.0),
        ...     20_000, generator=torch.Generator().manual_seed(0))
        >>> round(g.mean().item(), 1)  # d/dλ (λ + λ²) = 1 + 2λ
        5.0
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    run, theta = _start(program, theta, num_samples, generator, strategy)
    with fwAD.dual_level():
        out = _execute(run, program, theta)
        est = run.estimates(out)
    return est.reshape(num_samples, *theta.shape)


def score_function_estimates(
    program: Callable[[Any], Any],
    theta: Tensor,
    num_samples: int,
    *,
    baseline: str | None = "leave_one_out",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Per-sample score-function estimates for the same program (for comparison).

    Each run's estimate is :math:`\delta_f + (f - b)\,\partial_\theta \sum_k \log p(x_k)`: the
    program's direct dependence on :math:`\theta` (draws held fixed, forward mode) plus the
    score of every draw it made, recorded by the samplers. ``baseline="leave_one_out"`` (the
    default) takes :math:`b` as the mean of the other runs' outputs (unbiased; needs two runs);
    ``None`` uses none. The same generator state gives the same draws as
    :func:`derivative_estimates`.

    Returns:
        a tensor ``(num_samples, *theta.shape)``.
    """
    if baseline not in ("leave_one_out", None):
        raise ValueError(f"baseline must be 'leave_one_out' or None, got {baseline!r}")
    minimum = 2 if baseline == "leave_one_out" else 1
    run, theta = _start(program, theta, num_samples, generator, "score", minimum)
    with fwAD.dual_level():
        out = run._output(_execute(run, program, theta))
        direct = _tangent(out._primal).to(run.dtype).reshape(num_samples, -1)
        score = _tangent(run.logp).reshape(num_samples, -1)
        value = _plain(out._primal).to(run.dtype).reshape(num_samples, -1)[:, 0]
    if baseline == "leave_one_out":
        value = value - (value.sum() - value) / (num_samples - 1)
    est = direct + value.unsqueeze(1) * score
    return est.reshape(num_samples, *theta.shape)


def program_values(
    program: Callable[[Any], Any],
    theta: Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The program's value in each run, ``(num_samples,)``: a Monte Carlo sample of
    :math:`\mathbb{E}[\mathrm{program}(\theta)]`.

    The same generator state gives the same draws as :func:`derivative_estimates` and
    :func:`score_function_estimates` (common random numbers: a finite difference of two calls
    at nearby ``theta`` with the same state is the pathwise derivative of the draws held fixed).

    Example:
        >>> import torch, gradkit as gk
        >>> v = gk.stochastic_ad.program_values(lambda t: gk.stochastic_ad.poisson(t),
        ...     torch.tensor(2.0), 5, generator=torch.Generator().manual_seed(0))
        >>> v.shape
        torch.Size([5])
    """
    run, theta = _start(program, theta, num_samples, generator, "score", minimum=1)
    with fwAD.dual_level():
        out = run._output(_execute(run, program, theta))
        value = _plain(out._primal).to(run.dtype)
    return value.reshape(num_samples, -1)[:, 0].clone()


# -- one draw from a torch distribution: the registered estimator -------------------------------

_BY_TYPE = {family.torch_type: family for family in FAMILIES}


def _family_parameters(family: _Family, dist: Any) -> list[Tensor]:
    base, _ = base_distribution(dist)
    return [getattr(base, name) for name in family.param_names]


@register_estimator("stochastic_ad")
class StochasticDerivative(Estimator):
    r"""The stochastic derivative of one draw (Arya et al. 2022), one row per sample.

    For each parameter element :math:`\theta_j` and the coordinate :math:`i` it belongs to,
    the row is :math:`w_\uparrow (f(x + e_i) - f(x)) + w_\downarrow (f(x - e_i) - f(x))` with
    the jump weights of the inversion coupling, :math:`w_\uparrow = \max(0, -\partial_j
    F(x_i))/p(x_i)` and :math:`w_\downarrow = \max(0, \partial_j F(x_i - 1))/p(x_i)` (the module
    docstring derives them; the CDF's per-sample gradients come from the engine, so ``probs``
    and ``logits`` are both handled). Unbiased; each sample costs one evaluation of ``f`` per
    coordinate and direction that can jump (one per direction under a declared plate). For
    programs with many draws use :func:`derivative_estimates`.
    """

    families = (Bernoulli, Binomial, Geometric, Poisson, Categorical)
    instead = (
        "stochastic derivatives need an integer-valued draw by inversion; for other "
        "distributions use 'score_function', 'pathwise' or 'measure_valued'"
    )

    def estimate(self, problem: Problem) -> dict[str, Tensor]:
        from gradkit.weak_derivatives import _by_coordinate, _perturbed_costs

        base: Any = problem.resolved.base
        family = _BY_TYPE[type(base)]
        x = problem.x
        xf = x.to(problem.resolved.dtype)
        batch = tuple(base.batch_shape)
        inner = batch[len(problem.plate_shape) :]
        with torch.no_grad():
            params = _family_parameters(family, problem.dist)
            reach = family.targets(params, xf)
            top = family.upper(*params)
        if family.integer and "probs" in problem.names:
            # torch normalises probs: an empty category's own entry moves its probability
            _check_empty_categories(params[0], torch.ones_like(params[0]), "stochastic_ad")
        at = problem.per_sample_gradients(lambda d: family.cdf(*_family_parameters(family, d), xf))
        below = problem.per_sample_gradients(
            lambda d: family.cdf(*_family_parameters(family, d), xf - 1.0)
        )
        extra = 1 if family.integer else 0  # a categorical's probability table
        up, down = {}, {}
        for n in at:
            up[n], down[n] = family.weights(params, xf, at[n], below[n])
        moves = [
            (w, t)
            for w, t in zip((up, down), reach, strict=True)
            if any(bool(v.any()) for v in w.values())
        ]
        rows = {n: torch.zeros_like(g) for n, g in at.items()}
        if not moves:
            return rows
        # where a jump cannot happen its weight is 0; keep its value in the support
        values = [
            torch.where((t < 0) | (t > top if top is not None else False), xf, t).to(x.dtype)
            for _, t in moves
        ]
        with torch.no_grad():
            costs = _perturbed_costs(problem, x, torch.stack(values, -1), inner, (len(moves),), ())
        num = problem.num_samples
        costs = _by_coordinate(costs, num, problem.plate_shape, inner, len(moves))
        signal = problem.signal.reshape(num, *problem.plate_shape, *([1] * (len(inner) + 1)))
        change = costs - signal
        for k, (weights, _) in enumerate(moves):
            delta = change[..., k].reshape(num, *batch, *([1] * extra))
            for n in rows:
                rows[n] = rows[n] + weights[n] * delta
        return rows
