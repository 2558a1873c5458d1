r"""Stochastic computation graphs: one surrogate loss for score-function and pathwise parts.

A model that samples several random variables in sequence, some reparameterisable and some
not, needs a gradient estimator that uses the pathwise derivative where it can and the score
function where it must. Schulman, Heess, Weber and Abbeel (2015) showed that differentiating a
*surrogate* objective

.. math::
    L = \sum_{c} c + \sum_{w \in \mathcal S} \log p(w \mid \mathrm{parents}(w))\,
        \bot\Big(\sum_{c \,\succ\, w} c\Big)

gives an unbiased gradient, where :math:`\mathcal S` are the non-reparameterised stochastic
nodes, :math:`c \succ w` the costs downstream of :math:`w`, and :math:`\bot` stops gradients;
reparameterised nodes are differentiated through by autograd. DiCE (Foerster et al. 2018)
writes the same objective with the "magic box"
:math:`\square(\tau) = \exp(\tau - \bot\tau)`, which equals 1 but has derivative
:math:`\square(\tau)\nabla\tau`:

.. math:: L_\square = \sum_c \square\Big(\sum_{w \in \mathcal S,\, w \prec c}
    \log p(w \mid \mathrm{parents}(w))\Big)\, c .

Its value is the total cost and its gradient (of any order) is an unbiased estimate.
Baselines :math:`b_w` enter as :math:`\sum_w (1 - \square(\log p(w)))\, b_w`, which has value
zero and mean-zero gradient (Mao et al. 2019).

:class:`StochasticComputationGraph` records the nodes as a model samples them and builds
:math:`L_\square`; :func:`per_sample_estimates` gives each sample's own gradient of such a
surrogate (to measure variance) in one backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from gradkit import _checks
from gradkit._engine import leaf_gradients
from gradkit.baselines import Baseline

__all__ = ["StochasticComputationGraph", "magic_box", "per_sample_estimates"]


def magic_box(tau: Tensor) -> Tensor:
    r"""The DiCE operator :math:`\square(\tau) = \exp(\tau - \bot\tau)`.

    Its value is 1 and :math:`\nabla\square(\tau) = \square(\tau)\,\nabla\tau`, so multiplying a
    cost by :math:`\square(\sum \log p)` adds the score-function term to every derivative
    without changing the value (Foerster et al. 2018).

    Args:
        tau: a tensor (usually a sum of log-probabilities), any shape.

    Returns:
        a tensor of ones shaped like ``tau`` that carries ``tau``'s gradient.

    Example:
        >>> import torch, gradkit as gk
        >>> t = torch.tensor(0.3, requires_grad=True)
        >>> box = gk.scg.magic_box(2 * t)
        >>> box.backward()
        >>> box.item(), t.grad.item()
        (1.0, 2.0)
    """
    return torch.exp(tau - tau.detach())


@dataclass
class _Node:
    value: Tensor
    log_prob: Tensor | None  # None for a reparameterised node


class StochasticComputationGraph:
    r"""Records stochastic nodes and costs; :meth:`surrogate` builds the DiCE objective.

    Usage: sample every random variable through :meth:`sample` (reparameterised ones with
    ``rsample``, the others with ``sample`` plus their log-probability), add every cost with
    :meth:`add_cost`, and differentiate ``graph.surrogate().mean()``. A cost depends, by
    default, on every non-reparameterised node sampled before it was added (the causal order
    of the program); pass ``depends_on`` to name fewer and cut variance.

    Leading dimensions index independent samples (and plate elements): a node's
    log-probability is summed over the dimensions past a cost's shape before it multiplies
    that cost, so a cost of shape ``(S,)`` collects all of a sample's nodes, and a cost of
    shape ``(S, B)`` collects per-element nodes of shape ``(S, B, ...)`` element by element.

    Example:
        >>> import torch, gradkit as gk
        >>> theta = torch.tensor(0.0, requires_grad=True)
        >>> g = gk.scg.StochasticComputationGraph()
        >>> z = g.sample("z", torch.distributions.Bernoulli(logits=theta), (4,))
        >>> g.add_cost(3.0 * z)
        >>> g.surrogate().shape
        torch.Size([4])
    """

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {}
        self.costs: list[tuple[Tensor, tuple[str, ...]]] = []

    def sample(
        self,
        name: str,
        dist: Distribution,
        sample_shape: Sequence[int] = (),
        *,
        reparameterize: bool | None = None,
    ) -> Tensor:
        r"""Draw a node :math:`w \sim` ``dist`` and record it.

        Args:
            name: a unique name for the node.
            dist: its distribution (parameters may depend on earlier nodes and on leaves).
            sample_shape: passed to ``sample``/``rsample``.
            reparameterize: use ``rsample`` (pathwise) or ``sample`` plus the score; by default
                ``dist.has_rsample``.

        Returns:
            the sample; it carries gradients only when reparameterised.

        Raises:
            ValueError: for a repeated name, or ``reparameterize=True`` for a distribution
                without ``rsample``.
        """
        _checks.check_distribution(dist)
        if name in self.nodes:
            raise ValueError(f"a node named {name!r} exists already; give every node its own name")
        if reparameterize is None:
            reparameterize = dist.has_rsample
        if reparameterize:
            if not dist.has_rsample:
                raise ValueError(
                    f"node {name!r}: {type(dist).__name__} has no rsample, so it cannot be "
                    "reparameterised; pass reparameterize=False to use its score function"
                )
            value = dist.rsample(torch.Size(sample_shape))
            self.nodes[name] = _Node(value, None)
        else:
            value = dist.sample(torch.Size(sample_shape))
            self.nodes[name] = _Node(value, dist.log_prob(value))
        return value

    def add_cost(self, value: Tensor, *, depends_on: Iterable[str] | None = None) -> None:
        """Add a cost: a tensor of shape ``(S, *plate)``, one per sample (and plate element).

        Args:
            value: the cost, computed from the nodes (and any leaves).
            depends_on: names of the non-reparameterised nodes it depends on; by default all
                of those sampled so far.

        Raises:
            TypeError: if ``value`` is not a tensor.
            ValueError: for an unknown node name.
        """
        if not isinstance(value, Tensor):
            raise TypeError(f"a cost must be a tensor, got {type(value).__name__}")
        if depends_on is None:
            names = tuple(n for n, node in self.nodes.items() if node.log_prob is not None)
        else:
            names = tuple(depends_on)
            unknown = [n for n in names if n not in self.nodes]
            if unknown:
                raise ValueError(
                    f"cost depends on unknown node(s) {unknown}; known: {sorted(self.nodes)}"
                )
        self.costs.append((value, names))

    def _log_prob(self, name: str, shape: torch.Size) -> Tensor:
        """Node ``name``'s log-probability summed down to ``shape`` (its leading dims)."""
        log_prob = self.nodes[name].log_prob
        if log_prob is None:
            return torch.zeros(())
        extra = log_prob.dim() - len(shape)
        if extra > 0:
            log_prob = log_prob.sum(dim=tuple(range(len(shape), log_prob.dim())))
        return log_prob

    def surrogate(self, *, baselines: Mapping[str, Any] | None = None) -> Tensor:
        r"""The DiCE surrogate :math:`L_\square`, one value per sample.

        Its value equals the summed costs; the gradient of its mean over samples is an
        unbiased estimate of the gradient of the expected total cost, combining pathwise
        derivatives (through reparameterised nodes) and score-function terms (for the rest).
        Costs may have different shapes, one per sample ``(S,)`` beside one per plate element
        ``(S, B)``: the sample shape is the shortest cost shape, which every other cost's shape
        must start with, and each cost term is summed over its dimensions past it.

        Args:
            baselines: optional ``{node name: b}``; each adds
                :math:`(1 - \square(\log p(w)))\,\bot b` (value 0). ``b`` is a tensor that
                does not depend on the node's own sample or anything downstream of it, or a
                :class:`gradkit.baselines.Baseline` (``LeaveOneOut()``,
                ``ExponentialMovingAverage()``), computed from the costs downstream of the node
                per sample and, if stateful, updated after use.

        Returns:
            the surrogate, shaped like the sample shape.

        Raises:
            ValueError: if no cost was added, costs do not share a leading sample shape, or
                a baseline names an unknown or reparameterised node.
        """
        if not self.costs:
            raise ValueError("the graph has no cost: call add_cost(value) before surrogate()")
        lead = min((cost.shape for cost, _ in self.costs), key=len)
        for cost, _ in self.costs:
            if tuple(cost.shape[: len(lead)]) != tuple(lead):
                shapes = [tuple(c.shape) for c, _ in self.costs]
                raise ValueError(
                    f"costs of shapes {shapes} share no leading sample shape: every cost must "
                    f"start with the shortest one, {tuple(lead)} (one value per sample, then "
                    "plate dimensions)"
                )

        def per_sample(t: Tensor) -> Tensor:
            extra = tuple(range(len(lead), t.dim()))
            return t.sum(extra) if extra else t

        total: Tensor = torch.zeros(())
        for cost, names in self.costs:
            tau = sum((self._log_prob(n, cost.shape) for n in names), torch.zeros(()))
            total = total + per_sample(magic_box(tau.to(cost)) * cost)
        updates = []
        for name, b in (baselines or {}).items():
            node = self.nodes.get(name)
            if node is None or node.log_prob is None:
                raise ValueError(
                    f"baseline for {name!r}: baselines apply to non-reparameterised nodes, "
                    f"which are {[n for n, v in self.nodes.items() if v.log_prob is not None]}"
                )
            if isinstance(b, Baseline):
                signal = sum(
                    (per_sample(c.detach()) for c, names in self.costs if name in names),
                    torch.zeros(lead),
                )
                computed = b(signal, {})
                if isinstance(computed, dict):
                    raise TypeError(
                        f"baseline for {name!r}: {type(b).__name__} returns one baseline per "
                        "parameter, which a graph node has not; use LeaveOneOut, "
                        "ExponentialMovingAverage or a constant"
                    )
                value = computed
                updates.append((b, signal))
            else:
                value = torch.as_tensor(b).detach()
            log_prob = self._log_prob(name, lead)
            total = total + (1.0 - magic_box(log_prob)) * value
        for baseline, signal in updates:
            baseline.update(signal)
        return total


def per_sample_estimates(
    objective: Callable[..., Tensor], params: Sequence[Tensor], num_samples: int
) -> list[Tensor]:
    r"""Per-sample gradients :math:`\nabla_\theta L_s` of a sampled objective, in one backward pass.

    Each parameter is expanded to ``num_samples`` independent copies, shape
    ``(S, *param.shape)``, and ``objective`` is called with the copies; it must return
    ``(S,)`` values where value ``s`` uses only copy ``s`` (draw with ``sample_shape=()`` from
    distributions whose batch dimension is the copies' leading dimension). The gradient of the
    summed values with respect to the copies then holds every sample's own gradient: O(S) work,
    no loop over samples (the per-sample engine of every gradkit estimator). With a
    :meth:`StochasticComputationGraph.surrogate` as the objective these are per-sample gradient
    estimates, whose mean is the estimate and whose spread is its per-sample variance.

    Args:
        objective: ``(*copies) -> (S,)`` values.
        params: parameter tensors (their values are used; they need not require grad).
        num_samples: ``S`` (>= 1).

    Returns:
        one tensor of shape ``(S, *param.shape)`` per parameter (zeros where unused).

    Raises:
        ValueError: if ``objective`` does not return shape ``(S,)``, or for a bad
            ``num_samples``.

    Example:
        >>> import torch, gradkit as gk
        >>> w = torch.tensor(2.0)
        >>> gk.scg.per_sample_estimates(lambda w: w * torch.tensor([1.0, 3.0]), [w], 2)
        [tensor([1., 3.])]
    """
    _checks.check_num_samples(num_samples)

    def values(*copies: Tensor) -> Tensor:
        out = objective(*copies)
        if not isinstance(out, Tensor) or tuple(out.shape) != (num_samples,):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"objective returned {shape}; it must return one value per sample, shape "
                f"({num_samples},): sum plate dimensions inside the objective"
            )
        return out

    return leaf_gradients(list(params), values, num_samples)
