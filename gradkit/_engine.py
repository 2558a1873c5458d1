r"""The per-sample engine every estimator shares.

Three things are written once here:

* :func:`resolve` reads a distribution once per call: its base distribution under
  ``Independent`` wrappers, its parameters (as torch names them), which of them move the
  support, and its shapes. Every helper of an estimator works from the :class:`Resolved`
  record instead of inspecting the distribution again.
* :func:`gradients` differentiates a function of a rebuilt distribution with respect to its
  parameters, either per sample (each parameter is copied once per sample, ``(S,
  *param.shape)``, the distribution is rebuilt from the copies and one backward pass gives
  every sample's own gradient) or summed (one backward pass through the parameters
  themselves: what :func:`~gradkit.autodiff.expectation` needs, at the cost of the parameters
  alone).
* :class:`Stream` turns a ``torch.Generator`` into the random numbers of one call. torch's
  ``sample``/``rsample`` take no generator, so each phase of a call (the forward samples, the
  estimator's own draws) runs in a forked copy of the device's global stream, seeded from a
  number drawn from the generator when the call starts; the global stream is restored
  afterwards. The same generator state gives the same samples, so estimators compared at the
  same state see common random numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    Exponential,
    Gamma,
    Laplace,
    Normal,
    OneHotCategorical,
    Poisson,
)
from torch.nn.functional import one_hot

from gradkit import _checks
from gradkit.distributions import base_distribution, parameters, rebuild, support_parameters

__all__ = [
    "Resolved",
    "Stream",
    "closed_form_scores",
    "flat_index",
    "gradients",
    "leaf_gradients",
    "log_prob",
    "resolve",
]


@dataclass
class Resolved:
    """One distribution, read once: base, parameters, support and shapes.

    Attributes:
        dist: the distribution as the user built it.
        base: the distribution under any ``Independent`` wrappers.
        params: parameter name -> tensor (the distribution's own tensors, not copies).
        support: names of the parameters that move the support (``Uniform`` bounds).
        batch_shape: ``dist.batch_shape``.
        event_shape: ``dist.event_shape``.
    """

    dist: Distribution
    base: Distribution
    params: dict[str, Tensor]
    support: tuple[str, ...]
    batch_shape: torch.Size
    event_shape: torch.Size
    batch_first: dict[str, bool] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def rebuild(self, params: dict[str, Tensor]) -> Distribution:
        """The same distribution with the named parameters replaced (copies, leaves)."""
        return rebuild(self.dist, params)


def resolve(dist: object) -> Resolved:
    """Read ``dist`` once (raises the input checks' errors for a non-distribution)."""
    d = _checks.check_distribution(dist)
    params = parameters(d)
    base, _ = base_distribution(d)
    batch = tuple(d.batch_shape)
    return Resolved(
        dist=d,
        base=base,
        params=params,
        support=tuple(n for n in support_parameters(d) if n in params),
        batch_shape=d.batch_shape,
        event_shape=d.event_shape,
        batch_first={n: tuple(p.shape[: len(batch)]) == batch for n, p in params.items()},
    )


def flat_index(x: Tensor, batch: tuple[int, ...], categories: int) -> Tensor:
    """Positions of categories ``x`` ``(*lead, *batch)`` in a flattened ``(*batch, K)`` table."""
    offsets = torch.arange(math.prod(batch), device=x.device).reshape(batch) * categories
    return x.long() + offsets


def log_prob(dist: Distribution, x: Tensor) -> Tensor:
    """``dist.log_prob(x)`` without broadcasting category tables to every sample.

    torch's ``Categorical.log_prob`` expands the logits to ``(S, *batch, K)`` before a gather;
    for a large ``K`` that costs ``S`` copies of the table. Here the normalised table is
    gathered directly, shape ``(S, *batch)``; other distributions use their own ``log_prob``.
    """
    base, ndims = base_distribution(dist)
    batch = tuple(base.batch_shape)
    if (
        type(base) is Categorical
        and x.dim() > len(batch)
        and tuple(x.shape[x.dim() - len(batch) :]) == batch
    ):
        # index the flattened table: the backward pass scatters into a table-sized gradient
        table = base.logits  # normalised by the constructor
        out = table.reshape(-1)[flat_index(x, batch, table.shape[-1])]
    elif type(base) is OneHotCategorical:
        out = (x * base.logits.clamp_min(torch.finfo(base.logits.dtype).min)).sum(-1)
    else:
        out = base.log_prob(x)
    if ndims:
        out = out.sum(tuple(range(out.dim() - ndims, out.dim())))
    return out


def _closed_form(base: Any, x: Tensor, name: str) -> Tensor | None:
    """:math:`\\partial_\\theta \\log p(x;\\theta)` per element where it has a short closed form."""
    kind = type(base)
    if kind is Bernoulli:
        p = base.probs
        if name == "logits":
            return x - p
        if name == "probs":
            return (x - p) / (p * (1.0 - p))
    elif kind is Normal:
        z = (x - base.loc) / base.scale
        if name == "loc":
            return z / base.scale
        if name == "scale":
            return (z * z - 1.0) / base.scale
    elif kind is Categorical and name == "logits":
        return one_hot(x.long(), base.logits.shape[-1]).to(base.logits) - base.probs
    elif kind is Poisson and name == "rate":
        return x / base.rate - 1.0
    elif kind is Exponential and name == "rate":
        return 1.0 / base.rate - x
    elif kind is Gamma:
        if name == "rate":
            return base.concentration / base.rate - x
        if name == "concentration":
            return torch.log(base.rate) + torch.log(x) - torch.digamma(base.concentration)
    elif kind is Laplace:
        offset = x - base.loc
        if name == "loc":
            return torch.sign(offset) / base.scale
        if name == "scale":
            return (offset.abs() / base.scale - 1.0) / base.scale
    return None


def closed_form_scores(
    resolved: Resolved, x: Tensor, names: Sequence[str]
) -> dict[str, Tensor] | None:
    """Per-sample scores ``(S, *param.shape)`` in closed form, or ``None`` if any is missing.

    For the common families (Bernoulli, Normal, Categorical logits, Poisson, Exponential,
    Gamma, Laplace) the score needs no autograd; a test checks every formula against the
    autograd engine. Elsewhere :func:`gradients` differentiates ``log_prob``.
    """
    out = {}
    for name in names:
        param = resolved.params[name]
        score = _closed_form(resolved.base, x, name)
        if score is None or tuple(score.shape) != (x.shape[0], *param.shape):
            return None
        out[name] = score.detach()
    return out


def leaf_gradients(
    tensors: Sequence[Tensor],
    fn: Callable[..., Tensor],
    num_samples: int | None,
    *,
    create_graph: bool = False,
) -> list[Tensor]:
    r"""Gradients of ``fn(*leaves).sum()`` with respect to fresh leaves made from ``tensors``.

    The one place where gradkit copies parameters: with ``num_samples=S`` each tensor becomes
    ``S`` copies, ``(S, *shape)``, so that anything ``fn`` computes for sample ``s`` from copy
    ``s`` alone yields sample ``s``'s own gradient in one backward pass; with ``None`` the
    leaves have the tensors' own shapes (the summed gradient, at their memory cost). Unused
    leaves get zeros. Works under ``torch.inference_mode`` and ``torch.no_grad``. With
    ``create_graph`` the gradients keep their graph (to tensors ``fn`` closes over, such as an
    estimator's own parameters) instead of being detached.
    """
    with torch.inference_mode(False), torch.enable_grad():
        leaves = []
        for t in tensors:
            p = t.detach()
            if num_samples is not None:
                p = p.expand(num_samples, *p.shape).clone()
            elif p.is_inference():
                p = p.clone()
            leaves.append(p.requires_grad_())
        value = fn(*leaves)
        if not value.requires_grad:
            return [torch.zeros_like(p).detach() for p in leaves]
        grads = torch.autograd.grad(
            value.sum(), leaves, allow_unused=True, create_graph=create_graph
        )
    return [
        torch.zeros_like(p).detach() if g is None else (g if create_graph else g.detach())
        for p, g in zip(leaves, grads, strict=True)
    ]


def gradients(
    resolved: Resolved,
    fn: Callable[[Distribution], Tensor],
    names: Sequence[str],
    num_samples: int | None = None,
    *,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    r"""Gradients of ``fn(rebuilt distribution).sum()`` with respect to parameters ``names``.

    With ``num_samples=S`` each parameter is copied ``S`` times, ``(S, *param.shape)``, the
    distribution is rebuilt with batch shape ``(S, *batch_shape)``, and sample ``s`` of
    anything ``fn`` computes must use copy ``s`` only: then the gradient with respect to the
    copies holds every sample's own gradient (one backward pass, no loop). With
    ``num_samples=None`` the parameters are detached leaves of their own shape and the result
    is the summed gradient, at the memory cost of the parameters. Parameters not in ``names``
    keep their values (no gradient). See :func:`leaf_gradients`.
    """
    names = list(names)

    def of_leaves(*leaves: Tensor) -> Tensor:
        return fn(resolved.rebuild(dict(zip(names, leaves, strict=True))))

    tensors = [resolved.params[n] for n in names]
    grads = leaf_gradients(tensors, of_leaves, num_samples, create_graph=create_graph)
    return dict(zip(names, grads, strict=True))


_SEED_HIGH = 2**62


def _index(device: torch.device) -> tuple[str, int]:
    """A device with its index filled in (``cuda`` is the current CUDA device)."""
    if device.index is not None or device.type != "cuda":
        return device.type, device.index or 0
    return device.type, torch.cuda.current_device()


class Stream:
    """The random numbers of one estimator call, drawn from one ``torch.Generator``.

    ``phase(name)`` runs a block of random draws: phase ``"forward"`` draws the samples, phase
    ``"estimator"`` the estimator's own random numbers (perturbations, relaxations), in the
    forward or the backward pass. Re-entering a phase replays its numbers (a pathwise
    estimator redraws its forward samples from per-sample copies; a control variate sees the
    estimator's perturbations again), and the global stream is left as the first run left it.

    With a ``generator``, two seeds are drawn from it when the call starts, and each phase runs
    in a forked copy of the device's global stream seeded with its own seed; the global stream
    is restored afterwards (untouched). Without one, the first run of a phase draws from the
    device's global stream as torch's own samplers do, and its state is recorded for replays.
    """

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
                "pass e.g. torch.Generator().manual_seed(0)"
            )
        self.device = device
        self.seeds: dict[str, int] | None = None
        self.states: dict[str, Tensor] = {}
        if generator is not None:
            if _index(generator.device) != _index(device):
                raise ValueError(
                    f"the generator is on {generator.device} but the distribution's parameters "
                    f"are on {device}; create it there, torch.Generator(device={str(device)!r})"
                )
        elif device.type not in ("cpu", "cuda"):
            generator = torch.default_generator  # no state capture there: seed from it
        if generator is not None:
            seeds = torch.randint(_SEED_HIGH, (2,), generator=generator, device=generator.device)
            forward, estimator = (int(s) for s in seeds.tolist())
            self.seeds = {"forward": forward, "estimator": estimator}

    def _get_state(self) -> Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set_state(self, state: Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run the block in phase ``name`` of this call's stream (a context manager)."""
        if self.seeds is None:
            saved = self.states.get(name)
            if saved is None:  # first run: draw from the global stream, remember where from
                self.states[name] = self._get_state()
                yield
                return
            current = self._get_state()
            self._set_state(saved)
            try:
                yield
            finally:
                self._set_state(current)
            return
        seed = self.seeds[name]
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else 0
            with torch.random.fork_rng(devices=[index], device_type="cuda"):
                torch.cuda.manual_seed(seed)
                torch.default_generator.manual_seed(seed)
                yield
        elif self.device.type == "cpu":
            state = torch.get_rng_state()
            torch.default_generator.manual_seed(seed)
            try:
                yield
            finally:
                torch.set_rng_state(state)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                yield
