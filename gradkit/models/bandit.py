r"""A contextual bandit and a REINFORCE learner for it, in plain PyTorch.

The environment (:class:`ContextualBandit`) has :math:`C` contexts with features
:math:`\phi_c \in \mathbb{R}^D` and :math:`K` arms. Pulling arm :math:`a` in context :math:`c`
pays a Bernoulli reward with mean :math:`\bar r(c, a)`. A policy network (:class:`PolicyNetwork`)
maps features to logits, :math:`\pi_w(a \mid c) = \mathrm{softmax}(g_w(\phi_c))_a`, and the
objective is the expected return over uniformly drawn contexts,

.. math::
    J(w) = \frac1C \sum_{c=1}^{C} \sum_{a=1}^{K} \pi_w(a \mid c)\, \bar r(c, a),
    \qquad
    J^\star = \frac1C \sum_{c=1}^{C} \max_a \bar r(c, a).

Both are finite sums, so the learning curve of any policy and the optimal return are exact.
:func:`train_reinforce` maximises :math:`J` with the score-function (REINFORCE) gradient
:math:`\nabla_w J = \mathbb{E}\big[(r - b)\,\nabla_w \log \pi_w(a \mid c)\big]` (Williams 1992,
``williams1992simple``), computed by
:func:`gradkit.expectation <gradkit.autodiff.expectation>` with ``estimator="score_function"``,
``plate=True`` (one reward per context) and any baseline from :mod:`gradkit.baselines`; every
step draws a batch of contexts and several actions per context in one vectorised call, with no
Python loop over episodes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Categorical

from gradkit import _checks
from gradkit.autodiff import expectation
from gradkit.baselines import Baseline, ExponentialMovingAverage, LeaveOneOut
from gradkit.diagnostics import repeated_gradients
from gradkit.models.training import History, fit

__all__ = [
    "BASELINES",
    "ContextualBandit",
    "PolicyNetwork",
    "exact_policy_gradient",
    "make_baseline",
    "policy_gradients",
    "surrogate_return",
    "train_reinforce",
]

#: The baselines compared in the book, by name, each a label and a factory of fresh instances.
BASELINES: dict[str, tuple[str, Callable[[], Baseline | None]]] = {
    "none": ("no baseline", lambda: None),
    "ema": ("moving average", lambda: ExponentialMovingAverage(decay=0.9)),
    "loo": ("leave-one-out", LeaveOneOut),
}


def _check_indices(name: str, values: object, upper: int, what: str) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a tensor of {what} indices, got {type(values).__name__}")
    if values.is_floating_point():
        if bool((values != values.round()).any()):
            raise ValueError(f"{name} must hold whole numbers ({what} indices), got fractions")
        values = values.long()
    if bool(((values < 0) | (values >= upper)).any()):
        raise ValueError(
            f"{name} must hold {what} indices in [0, {upper}), got values from "
            f"{int(values.min())} to {int(values.max())}"
        )
    return values


class ContextualBandit(nn.Module):
    r"""A :math:`K`-armed contextual bandit with :math:`C` contexts and Bernoulli rewards.

    Features :math:`\phi_c \sim \mathcal N(0, I_D)`. The mean rewards come from a random
    one-hidden-layer teacher network, standardised over all context-arm pairs and squashed,

    .. math::
        z(c, a) = \big(\tanh(\phi_c^\top W_1)\, W_2\big)_a, \qquad
        \bar r(c, a) = \mathrm{sigmoid}\Big(\beta\, \frac{z(c, a) - \mathrm{mean}(z)}
        {\mathrm{std}(z)}\Big),

    so the best arm depends non-linearly on the features. The environment is drawn from its
    own generator seeded with ``seed``: the same seed gives the same bandit on every device
    and in every dtype. Features and mean rewards are buffers, so ``bandit.to(device, dtype)``
    moves them.

    Args:
        num_contexts: :math:`C`.
        num_features: :math:`D`.
        num_arms: :math:`K \ge 2`.
        sharpness: :math:`\beta > 0`; larger values separate the arms more.
        hidden: width of the teacher network.
        seed: seed of the environment's own random numbers.
        device: where the buffers live (default: CPU).
        dtype: floating dtype of the buffers and rewards (default: torch's default dtype).

    Raises:
        ValueError: for non-positive sizes, fewer than two arms, or a non-positive sharpness.
        TypeError: for a non-floating dtype.

    Example:
        >>> import torch
        >>> from gradkit.models.bandit import ContextualBandit
        >>> bandit = ContextualBandit(num_contexts=4, num_features=3, num_arms=5)
        >>> bandit.features.shape, bandit.means.shape
        (torch.Size([4, 3]), torch.Size([4, 5]))
        >>> bool(bandit.optimal_return() > bandit.uniform_return())
        True
    """

    features: Tensor
    means: Tensor

    def __init__(
        self,
        num_contexts: int = 64,
        num_features: int = 8,
        num_arms: int = 10,
        *,
        sharpness: float = 2.0,
        hidden: int = 16,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in [
            ("num_contexts", num_contexts),
            ("num_features", num_features),
            ("num_arms", num_arms),
            ("hidden", hidden),
        ]:
            _checks.check_count(name, value)
        if num_arms < 2:
            raise ValueError(f"a bandit needs at least 2 arms to choose from, got {num_arms}")
        if not sharpness > 0:
            raise ValueError(f"sharpness must be positive, got {sharpness!r}")
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype such as torch.float64, got {dtype}")
        gen = torch.Generator().manual_seed(seed)
        features = torch.randn(num_contexts, num_features, generator=gen, dtype=torch.float64)
        w1 = torch.randn(num_features, hidden, generator=gen, dtype=torch.float64)
        w2 = torch.randn(hidden, num_arms, generator=gen, dtype=torch.float64)
        z = torch.tanh(features @ w1 / num_features**0.5) @ w2
        means = torch.sigmoid(sharpness * (z - z.mean()) / z.std())
        self.register_buffer("features", features.to(device=device, dtype=dtype))
        self.register_buffer("means", means.to(device=device, dtype=dtype))

    @property
    def num_contexts(self) -> int:
        """:math:`C`, the number of contexts."""
        return self.means.shape[0]

    @property
    def num_arms(self) -> int:
        """:math:`K`, the number of arms."""
        return self.means.shape[1]

    def sample_contexts(self, batch_size: int) -> Tensor:
        """``batch_size`` context indices drawn uniformly with replacement, shape ``(B,)``."""
        _checks.check_count("batch_size", batch_size)
        return torch.randint(self.num_contexts, (batch_size,), device=self.means.device)

    def mean_reward(self, contexts: Tensor, actions: Tensor) -> Tensor:
        r""":math:`\bar r(c, a)` for context indices ``(*B,)`` and actions ``(..., *B)``.

        Returns:
            shape ``(..., *B)``, in the bandit's dtype.

        Raises:
            TypeError: for non-tensors.
            ValueError: for indices out of range or fractional.
        """
        contexts = _check_indices("contexts", contexts, self.num_contexts, "context")
        actions = _check_indices("actions", actions, self.num_arms, "arm")
        return self.means[contexts, actions]

    def reward(self, contexts: Tensor, actions: Tensor) -> Tensor:
        r"""Bernoulli rewards :math:`r \sim \mathrm{Bernoulli}(\bar r(c, a))`, shaped like
        ``actions`` ``(..., *B)`` (contexts ``(*B,)`` broadcast over leading dimensions)."""
        return torch.bernoulli(self.mean_reward(contexts, actions))

    def expected_return(self, policy: Callable[[Tensor], Tensor]) -> Tensor:
        r"""The exact expected return :math:`J = \frac1C\sum_c\sum_a \pi(a \mid c)\,\bar r(c,a)`.

        Differentiable in the policy's weights (autograd gives the exact :math:`\nabla_w J`).

        Args:
            policy: maps features ``(C, D)`` to logits ``(C, K)``.

        Returns:
            a 0-dim tensor.

        Raises:
            ValueError: if the policy's logits do not have shape ``(C, K)``.
        """
        logits = policy(self.features)
        if tuple(logits.shape) != tuple(self.means.shape):
            raise ValueError(
                f"the policy must map features {tuple(self.features.shape)} to logits of shape "
                f"{tuple(self.means.shape)} = (num_contexts, num_arms), got {tuple(logits.shape)}"
            )
        return (torch.softmax(logits, dim=-1) * self.means).sum(-1).mean()

    def optimal_return(self) -> Tensor:
        r""":math:`J^\star = \frac1C\sum_c \max_a \bar r(c, a)`, the return of the greedy policy."""
        return self.means.max(-1).values.mean()

    def uniform_return(self) -> Tensor:
        r"""The return of the uniformly random policy, :math:`\frac{1}{CK}\sum_{c,a}\bar r(c,a)`."""
        return self.means.mean()


class PolicyNetwork(nn.Module):
    r"""A softmax policy :math:`\pi_w(a \mid c) = \mathrm{softmax}(g_w(\phi_c))_a`.

    :math:`g_w` is a one-hidden-layer ``tanh`` network from features to logits. Construct it
    with ``device=`` and ``dtype=`` (or move it with ``.to``) to match the bandit.

    Args:
        num_features: :math:`D`.
        num_arms: :math:`K`.
        hidden: width of the hidden layer.
        device: where the weights live.
        dtype: floating dtype of the weights.

    Example:
        >>> import torch
        >>> from gradkit.models.bandit import PolicyNetwork
        >>> policy = PolicyNetwork(num_features=3, num_arms=5, hidden=4)
        >>> policy.distribution(torch.zeros(2, 3)).sample((7,)).shape  # 7 actions per context
        torch.Size([7, 2])
    """

    def __init__(
        self,
        num_features: int,
        num_arms: int,
        hidden: int = 32,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in [("num_features", num_features), ("num_arms", num_arms)]:
            _checks.check_count(name, value)
        _checks.check_count("hidden", hidden)
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden, device=device, dtype=dtype),
            nn.Tanh(),
            nn.Linear(hidden, num_arms, device=device, dtype=dtype),
        )

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``(*B, K)`` for features ``(*B, D)``."""
        return self.net(features)

    def distribution(self, features: Tensor) -> Categorical:
        """The policy as ``Categorical(logits=...)`` with batch shape ``(*B,)``."""
        return Categorical(logits=self(features))


def surrogate_return(
    bandit: ContextualBandit,
    policy: PolicyNetwork,
    contexts: Tensor,
    num_samples: int,
    baseline: Baseline | None = None,
) -> Tensor:
    r"""A Monte Carlo estimate of :math:`J` whose gradient is the REINFORCE estimate of
    :math:`\nabla_w J`.

    For each context :math:`c_b` in ``contexts``, ``num_samples`` actions
    :math:`a_{sb} \sim \pi_w(\cdot \mid c_b)` are drawn and rewarded in one call; the value is
    the mean reward and ``backward()`` sends

    .. math:: \frac1{BS}\sum_{b,s} (r_{sb} - b_{sb})\,\nabla_w \log \pi_w(a_{sb} \mid c_b)

    to the policy (Williams 1992, ``williams1992simple``), through
    ``gk.expectation(reward, policy.distribution(...), num_samples,
    estimator="score_function", plate=True, baseline=baseline)``. The contexts are declared a
    plate: each context's actions' rewards only multiply its own scores, and a leave-one-out
    baseline is formed per context.

    Args:
        bandit: the environment.
        policy: the policy network.
        contexts: context indices ``(B,)``, e.g. from :meth:`ContextualBandit.sample_contexts`.
        num_samples: actions per context :math:`S` (``>= 2`` for a leave-one-out baseline).
        baseline: ``None`` or a :class:`gradkit.baselines.Baseline`.

    Returns:
        a 0-dim tensor, the mean reward of the sampled actions.

    Raises:
        TypeError: for a baseline that is not a :class:`~gradkit.baselines.Baseline`.
        ValueError: for contexts out of range or too few samples for the baseline.

    Example:
        >>> import torch
        >>> from gradkit.models.bandit import ContextualBandit, PolicyNetwork, surrogate_return
        >>> bandit, policy = ContextualBandit(4, 3, 5), PolicyNetwork(3, 5, hidden=4)
        >>> surrogate_return(bandit, policy, torch.arange(4), num_samples=8).backward()
        >>> policy.net[0].weight.grad.shape
        torch.Size([4, 3])
    """
    if baseline is not None and not isinstance(baseline, Baseline):
        raise TypeError(
            f"baseline must be None or a gradkit.baselines.Baseline (e.g. "
            f"gk.baselines.LeaveOneOut()), got {type(baseline).__name__}"
        )
    contexts = _check_indices("contexts", contexts, bandit.num_contexts, "context")
    dist = policy.distribution(bandit.features[contexts])

    def reward(actions: Tensor) -> Tensor:
        return bandit.reward(contexts, actions)

    value = expectation(
        reward, dist, num_samples, estimator="score_function", plate=True, baseline=baseline
    )  # (B,): one value per context
    return value.mean()


def make_baseline(name: str) -> Baseline | None:
    """A fresh baseline by its name in :data:`BASELINES` (``"none"``, ``"ema"``, ``"loo"``).

    Raises:
        ValueError: for an unknown name.

    Example:
        >>> from gradkit.models.bandit import make_baseline
        >>> type(make_baseline("loo")).__name__, make_baseline("none")
        ('LeaveOneOut', None)
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    return BASELINES[name][1]()


def train_reinforce(
    bandit: ContextualBandit,
    policy: PolicyNetwork,
    *,
    baseline: Baseline | None = None,
    steps: int = 500,
    batch_size: int = 32,
    num_samples: int = 8,
    lr: float = 0.05,
    eval_every: int = 1,
    label: str = "",
    progress: bool = False,
) -> History:
    r"""Train ``policy`` on ``bandit`` with REINFORCE and Adam; record the exact return.

    Each step draws ``batch_size`` contexts, takes the gradient of :func:`surrogate_return`
    (``num_samples`` actions per context, the score-function estimator with ``baseline``)
    and applies one Adam step (Kingma and Ba 2015, ``kingma2015adam``) to ascend :math:`J`;
    :func:`gradkit.models.training.fit` runs the steps. At step 0, every ``eval_every`` steps
    (by default after every step) and at the end, a record holds, besides ``step``,
    ``seconds`` and ``median_step_seconds``, the exact ``expected_return`` :math:`J(w)`
    (:meth:`ContextualBandit.expected_return`) and the ``regret`` :math:`J^\star - J(w)`.

    Args:
        bandit: the environment.
        policy: the policy to train (modified in place).
        baseline: ``None`` or a :class:`gradkit.baselines.Baseline` (stateful baselines such as
            :class:`~gradkit.baselines.ExponentialMovingAverage` keep their state across steps).
        steps: number of gradient steps.
        batch_size: contexts per step.
        num_samples: actions per context.
        lr: Adam's learning rate.
        eval_every: steps between records of the exact return.
        label: a name for the run.
        progress: show a ``tqdm.auto`` progress bar.

    Returns:
        a :class:`~gradkit.models.training.History`, with ``policy`` as ``model``.

    Raises:
        ValueError: for non-positive sizes or learning rate, or a policy and bandit on
            different devices or in different dtypes.
        TypeError: for a baseline that is not a :class:`~gradkit.baselines.Baseline`.

    Example:
        >>> import torch
        >>> from gradkit.models.bandit import ContextualBandit, PolicyNetwork, train_reinforce
        >>> _ = torch.manual_seed(0)
        >>> bandit, policy = ContextualBandit(8, 3, 4), PolicyNetwork(3, 4, hidden=8)
        >>> run = train_reinforce(bandit, policy, steps=30, batch_size=8, lr=0.1)
        >>> returns = run.column("expected_return")
        >>> len(returns), returns[-1] > returns[0]
        (31, True)
    """
    for name, value in [("steps", steps), ("batch_size", batch_size)]:
        _checks.check_count(name, value)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    weight = next(policy.parameters())
    if weight.device != bandit.means.device or weight.dtype != bandit.means.dtype:
        raise ValueError(
            f"the policy ({weight.device}, {weight.dtype}) and the bandit "
            f"({bandit.means.device}, {bandit.means.dtype}) must share device and dtype; "
            "move one with .to(device=..., dtype=...)"
        )
    optimiser = torch.optim.Adam(policy.parameters(), lr=lr)
    optimal = float(bandit.optimal_return())

    def step(_: int) -> None:
        contexts = bandit.sample_contexts(batch_size)
        loss = -surrogate_return(bandit, policy, contexts, num_samples, baseline)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    def evaluate(_: int) -> dict[str, float]:
        with torch.no_grad():
            value = float(bandit.expected_return(policy))
        return {"expected_return": value, "regret": optimal - value}

    return fit(
        step,
        evaluate,
        steps=steps,
        eval_every=eval_every,
        device=weight.device,
        label=label or "REINFORCE",
        model=policy,
        show="expected_return",
        progress=progress,
    )


def exact_policy_gradient(bandit: ContextualBandit, policy: PolicyNetwork) -> Tensor:
    r"""The exact gradient :math:`\nabla_w J(w)`, flattened over the policy's parameters, ``(P,)``.

    Autograd through the finite sum :meth:`ContextualBandit.expected_return`; the policy's
    ``.grad`` is left untouched.

    Example:
        >>> from gradkit.models.bandit import ContextualBandit, PolicyNetwork, exact_policy_gradient
        >>> exact_policy_gradient(ContextualBandit(4, 3, 5), PolicyNetwork(3, 5, hidden=4)).shape
        torch.Size([41])
    """
    params = list(policy.parameters())
    grads = torch.autograd.grad(bandit.expected_return(policy), params)
    return torch.cat([g.reshape(-1) for g in grads])


def policy_gradients(
    bandit: ContextualBandit,
    policy: PolicyNetwork,
    baseline: Baseline | None = None,
    *,
    repeats: int = 100,
    num_samples: int = 8,
    warmup: int = 0,
    contexts: Tensor | None = None,
) -> Tensor:
    r"""``repeats`` repeated REINFORCE estimates of :math:`\nabla_w J`, flattened, ``(R, P)``.

    Each estimate is the gradient of :func:`surrogate_return` with every context once
    (:math:`B = C`, the default), so its mean is exactly :func:`exact_policy_gradient`; compare
    the two, and reduce the rows with :func:`gradkit.diagnostics.gradient_variance`. ``warmup``
    estimates are drawn and discarded first, so that a stateful baseline (a moving average)
    has a history.

    Args:
        bandit: the environment.
        policy: the policy (its ``.grad`` is left untouched).
        baseline: ``None`` or a :class:`gradkit.baselines.Baseline`.
        repeats: number of estimates :math:`R`.
        num_samples: actions per context.
        warmup: estimates discarded first.
        contexts: the contexts of every estimate (default: each context once); repeating every
            context equally often, ``torch.arange(C).repeat(n)``, keeps the mean exact and
            averages ``n`` draws per estimate in one call.

    Raises:
        ValueError: for a non-positive ``repeats``, a negative ``warmup`` or contexts out of
            range.

    Example:
        >>> import torch, gradkit as gk
        >>> from gradkit.models.bandit import ContextualBandit, PolicyNetwork, policy_gradients
        >>> bandit, policy = ContextualBandit(4, 3, 5), PolicyNetwork(3, 5, hidden=4)
        >>> g = policy_gradients(bandit, policy, gk.baselines.LeaveOneOut(), repeats=3)
        >>> g.shape
        torch.Size([3, 41])
    """
    _checks.check_count("repeats", repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if contexts is None:
        contexts = torch.arange(bandit.num_contexts, device=bandit.means.device)
    chosen = _check_indices("contexts", contexts, bandit.num_contexts, "context")

    def estimate() -> Tensor:
        return surrogate_return(bandit, policy, chosen, num_samples, baseline)

    params = list(policy.parameters())
    if warmup:
        repeated_gradients(estimate, params, warmup)
    return repeated_gradients(estimate, params, repeats)
