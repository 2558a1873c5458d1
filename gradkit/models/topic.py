r"""A topic model with binary latent factors, trained by variational inference.

Generative model (Aziz 2019; Mnih and Gregor 2014). A document :math:`x = (x_1, \dots, x_n)` is
:math:`n` i.i.d. categorical draws over a vocabulary of :math:`V` words, given :math:`k` binary
latent factors:

.. math::
    z_j \sim \mathrm{Bernoulli}(\phi)\ (1 \le j \le k), \qquad
    x_i \mid z \sim \mathrm{Categorical}(g_\theta(z))\ (1 \le i \le n),

where :math:`g_\theta` is a neural network with a softmax output. Only the bag of words
:math:`c_w = \#\{i : x_i = w\}` matters: :math:`\log p_\theta(x \mid z) = \sum_w c_w \log
g_\theta(z)_w`.

Inference network (mean field): :math:`q_\lambda(z \mid x) = \prod_j \mathrm{Bernoulli}(z_j \mid
\psi_j)` with :math:`\psi = \mathrm{sigmoid}(f_\lambda(x))`. The evidence lower bound

.. math::
    \mathrm{ELBO}(x) = \mathbb{E}_{q_\lambda(z \mid x)}[\log p_\theta(x \mid z)]
        - \mathrm{KL}(q_\lambda(z \mid x) \,\|\, p(z))

has an analytic KL between factorised Bernoullis. :math:`\theta` gets the ordinary gradient of
the sampled log-likelihood; :math:`\lambda` needs a gradient estimator for a discrete
distribution, chosen with :class:`GradientEstimator`: the score function (no baseline, moving
average, learned input-dependent :math:`C(x)`, leave-one-out) through
:func:`gradkit.expectation <gradkit.autodiff.expectation>` with ``plate=True`` (one cost per
document), local expectation gradients, or the biased straight-through Gumbel estimator.
:func:`train` runs the optimisation and records ELBO curves and the variance of the inference
network's gradient. The chapter's comparison of estimators over seeds and its figures are
chapter support, in ``compendium/topic_studies.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent, Multinomial, RelaxedBernoulli, kl_divergence
from torch.func import functional_call, vjp, vmap

from gradkit import _checks
from gradkit.autodiff import expectation
from gradkit.baselines import ExponentialMovingAverage, LearnedBaseline, LeaveOneOut
from gradkit.control_variates import DeltaMethod
from gradkit.diagnostics import z_score
from gradkit.models.training import History, fit

__all__ = [
    "METHODS",
    "BernoulliTopicModel",
    "DocumentBaseline",
    "GradientEstimator",
    "encoder_gradient_variance",
    "exact_logit_gradient",
    "factor_words",
    "logit_gradients",
    "summarise_logit_gradients",
    "train",
]

#: Estimators of the inference network's gradient, as name -> (label, whether it is biased).
METHODS: dict[str, tuple[str, bool]] = {
    "none": ("score function, no baseline", False),
    "ema": ("score function + moving average", False),
    "learned": ("score function + learned C(x)", False),
    "loo": ("score function + leave-one-out", False),
    "linear_cv": ("score function + leave-one-out + linear C(z)", False),
    "local_expectation": ("local expectation", False),
    "straight_through": ("straight-through Gumbel (biased)", True),
}

MAX_ENUMERATED_FACTORS = 16


def _check_docs(docs: Tensor, vocab_size: int) -> None:
    if not isinstance(docs, Tensor) or not docs.is_floating_point():
        raise TypeError(
            "docs must be a floating tensor of word counts, shape (num_docs, vocab_size); "
            f"got {type(docs).__name__} {getattr(docs, 'dtype', '')}. Convert with docs.float()"
        )
    if docs.dim() < 1 or docs.shape[-1] != vocab_size:
        raise ValueError(
            f"docs must have shape (num_docs, {vocab_size}) (one count per vocabulary word), got "
            f"{tuple(docs.shape)}; build the model with vocab_size=docs.shape[-1]"
        )
    if bool((docs < 0).any()):
        raise ValueError("docs must hold non-negative word counts; found negative entries")


def _states(num_factors: int, like: Tensor) -> Tensor:
    """All :math:`2^k` binary vectors, shape ``(2**k, k)``, on ``like``'s device and dtype."""
    if num_factors > MAX_ENUMERATED_FACTORS:
        raise ValueError(
            f"exact enumeration over z needs 2**k states; k={num_factors} is above the limit "
            f"of {MAX_ENUMERATED_FACTORS}. Use a Monte Carlo estimate (BernoulliTopicModel.elbo) "
            "or a model with fewer factors"
        )
    codes = torch.arange(2**num_factors, device=like.device)
    bits = torch.arange(num_factors, device=like.device)
    return ((codes[:, None] >> bits) & 1).to(like.dtype)


class BernoulliTopicModel(nn.Module):
    r"""Binary latent factor topic model :math:`p_\theta(x, z)` with a mean-field inference network.

    The decoder is a neural network with a softmax output, by default with one ``tanh`` hidden
    layer of width :math:`H`,
    :math:`g_\theta(z) = \mathrm{softmax}\big(b + W \tanh(Az + a)\big)`, whose hidden bias
    :math:`a` starts at zero, so that :math:`g_\theta(0) = \mathrm{softmax}(b)`;
    ``decoder_hidden=0`` gives the linear decoder :math:`\mathrm{softmax}(b + Wz)`, in which
    factor :math:`j` adds the column :math:`W_{:,j}` to the word log-odds. The encoder
    :math:`f_\lambda` maps :math:`\log(1 + c)` through a ``tanh`` hidden layer to :math:`k`
    logits of :math:`q_\lambda(z \mid x)`.

    Args:
        vocab_size: :math:`V`.
        num_factors: :math:`k`.
        prior: :math:`\phi \in (0, 1)`, the prior probability that a factor is on.
        encoder_hidden: width of the encoder's hidden layer.
        decoder_hidden: width :math:`H` of the decoder's hidden layer (0: linear decoder).
        word_counts: optional corpus word counts, shape ``(V,)``; the decoder's output bias
            :math:`b` starts at their log frequencies, so that the model with every factor off
            is the unigram model of the corpus.

    Raises:
        ValueError: for non-positive sizes, a prior outside ``(0, 1)``, or word counts of the
            wrong shape.

    Example:
        >>> import torch
        >>> from gradkit.models.topic import BernoulliTopicModel
        >>> _ = torch.manual_seed(0)
        >>> model = BernoulliTopicModel(vocab_size=20, num_factors=3)
        >>> docs, z = model.sample(num_docs=4, doc_length=10)
        >>> docs.shape, docs.sum(-1), model.elbo(docs, num_samples=8).shape
        (torch.Size([4, 20]), tensor([10., 10., 10., 10.]), torch.Size([4]))
    """

    prior_logit: Tensor  # a buffer, registered in __init__

    def __init__(
        self,
        vocab_size: int,
        num_factors: int,
        *,
        prior: float = 0.5,
        encoder_hidden: int = 64,
        decoder_hidden: int = 64,
        word_counts: Tensor | None = None,
    ) -> None:
        super().__init__()
        for name, value in [("vocab_size", vocab_size), ("num_factors", num_factors)]:
            _checks.check_count(name, value)
        if encoder_hidden < 1 or decoder_hidden < 0:
            raise ValueError(
                f"encoder_hidden must be >= 1 and decoder_hidden >= 0, got {encoder_hidden} and "
                f"{decoder_hidden}"
            )
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior must be a probability in (0, 1), got {prior}")
        self.vocab_size = vocab_size
        self.num_factors = num_factors
        self.register_buffer("prior_logit", torch.tensor(math.log(prior / (1.0 - prior))))
        self.encoder = nn.Sequential(
            nn.Linear(vocab_size, encoder_hidden), nn.Tanh(), nn.Linear(encoder_hidden, num_factors)
        )
        output = nn.Linear(decoder_hidden or num_factors, vocab_size)
        layers: list[nn.Module] = [output]
        if decoder_hidden:
            hidden = nn.Linear(num_factors, decoder_hidden)
            nn.init.zeros_(hidden.bias)  # tanh(0) = 0: with every factor off, g(0) = softmax(b)
            layers = [hidden, nn.Tanh(), output]
        self.decoder = nn.Sequential(*layers)
        if word_counts is not None:
            if word_counts.shape != (vocab_size,):
                raise ValueError(
                    f"word_counts must have shape ({vocab_size},), got {tuple(word_counts.shape)}"
                )
            freq = (word_counts.to(output.bias) + 0.5) / (word_counts.sum() + 0.5 * vocab_size)
            with torch.no_grad():
                output.bias.copy_(freq.log())

    def logits(self, docs: Tensor) -> Tensor:
        r"""The inference network's logits :math:`f_\lambda(x)`, shape ``(*B, k)``."""
        _check_docs(docs, self.vocab_size)
        return self.encoder(docs.log1p())

    def posterior(self, docs: Tensor) -> Independent[Bernoulli]:
        r""":math:`q_\lambda(z \mid x)` as ``Independent(Bernoulli(logits), 1)``, batch ``B``."""
        return Independent(Bernoulli(logits=self.logits(docs)), 1)

    def prior(self) -> Independent[Bernoulli]:
        r"""The prior :math:`p(z) = \prod_j \mathrm{Bernoulli}(z_j \mid \phi)`, event ``(k,)``."""
        logits = self.prior_logit.expand(self.num_factors)
        return Independent(Bernoulli(logits=logits), 1)

    def log_likelihood(self, docs: Tensor, z: Tensor) -> Tensor:
        r""":math:`\log p_\theta(x \mid z) = \sum_w c_w \log g_\theta(z)_w`.

        Args:
            docs: counts, shape ``(*B, V)``.
            z: factors, shape ``(*S, *B, k)`` (any leading sample dimensions).

        Returns:
            shape ``(*S, *B)``.
        """
        log_probs = torch.log_softmax(self.decoder(z), dim=-1)
        return (docs * log_probs).sum(-1)

    def kl(self, logits: Tensor) -> Tensor:
        r"""Analytic KL between factorised Bernoullis, for inference logits ``(*B, k)``.

        :math:`\mathrm{KL}(q \,\|\, p) = \sum_j \mathrm{KL}(\mathrm{Bern}(\psi_j) \,\|\,
        \mathrm{Bern}(\phi))`; returns ``(*B,)``.
        """
        q = Independent(Bernoulli(logits=logits), 1)
        prior = Independent(Bernoulli(logits=self.prior_logit.to(logits).expand_as(logits)), 1)
        return kl_divergence(q, prior)

    @torch.no_grad()
    def elbo(self, docs: Tensor, num_samples: int = 32) -> Tensor:
        """Monte Carlo ELBO per document (``num_samples`` draws of z; analytic KL), ``(*B,)``."""
        logits = self.logits(docs)
        z = Independent(Bernoulli(logits=logits), 1).sample((num_samples,))
        return self.log_likelihood(docs, z).mean(0) - self.kl(logits)

    @torch.no_grad()
    def elbo_samples(self, docs: Tensor, num_samples: int) -> dict[str, Tensor]:
        r"""Per-sample estimates of the ELBO in its two forms, and with nothing in closed form.

        With :math:`z_s \sim q_\lambda(z \mid x)`, the three rows of sample :math:`s` are

        * ``"likelihood − KL"``: :math:`\log p_\theta(x \mid z_s) - \mathrm{KL}(q \,\|\, p)`;
        * ``"joint + entropy"``: :math:`\log p_\theta(x, z_s) + \mathbb{H}(q)`;
        * ``"joint − log q"``: :math:`\log p_\theta(x, z_s) - \log q_\lambda(z_s \mid x)`,

        the KL and the entropy in closed form. All three have the ELBO as their mean (the
        forms differ by :math:`\mathbb{E}_q[\log p(z)] + \mathbb{H}(q) + \mathrm{KL} = 0`);
        they differ in variance.

        Args:
            docs: counts ``(*B, V)``.
            num_samples: samples of z per document.

        Returns:
            dict form -> ``(num_samples, *B)``.
        """
        q = self.posterior(docs)
        z = q.sample((num_samples,))
        log_lik = self.log_likelihood(docs, z)
        log_joint = log_lik + self.prior().log_prob(z)
        return {
            "likelihood − KL": log_lik - self.kl(q.base_dist.logits),
            "joint + entropy": log_joint + q.entropy(),
            "joint − log q": log_joint - q.log_prob(z),
        }

    def expected_log_likelihood_exact(self, docs: Tensor, logits: Tensor) -> Tensor:
        r""":math:`\mathbb{E}_q[\log p_\theta(x \mid z)] = \sum_z q(z)\log p_\theta(x \mid z)` over
        all :math:`2^k` states; differentiable in ``logits`` (shape ``(*B, k)``) and
        :math:`\theta`. Returns ``(*B,)``. Raises ``ValueError`` for ``k > 16``."""
        states = _states(self.num_factors, logits)
        log_lik = docs @ torch.log_softmax(self.decoder(states), dim=-1).T  # (*B, 2**k)
        log_q = Bernoulli(logits=logits.unsqueeze(-2)).log_prob(states).sum(-1)
        return (log_q.exp() * log_lik).sum(-1)

    def exact_elbo(self, docs: Tensor) -> Tensor:
        """The ELBO per document by enumerating all :math:`2^k` states of z, shape ``(*B,)``."""
        logits = self.logits(docs)
        return self.expected_log_likelihood_exact(docs, logits) - self.kl(logits)

    def exact_log_marginal(self, docs: Tensor) -> Tensor:
        r""":math:`\log p_\theta(x) = \log \sum_z p(z) p_\theta(x \mid z)` by enumeration.

        Returns ``(*B,)``. Raises ``ValueError`` for ``k > 16``.
        """
        _check_docs(docs, self.vocab_size)
        states = _states(self.num_factors, docs)
        log_lik = docs @ torch.log_softmax(self.decoder(states), dim=-1).T
        return torch.logsumexp(log_lik + self.prior().log_prob(states), dim=-1)

    @torch.no_grad()
    def sample(self, num_docs: int, doc_length: int) -> tuple[Tensor, Tensor]:
        """Draw documents from the model: ``(counts (num_docs, V), factors (num_docs, k))``."""
        z = self.prior().sample((num_docs,))
        counts = Multinomial(doc_length, logits=self.decoder(z)).sample()
        return counts, z

    @torch.no_grad()
    def factor_effects(self) -> Tensor:
        r"""What switching on factor :math:`j` alone does to each word:
        :math:`\log g_\theta(e_j)_w - \log g_\theta(0)_w`, shape ``(k, V)``."""
        param = next(self.decoder.parameters())
        states = torch.cat([torch.zeros(1, self.num_factors), torch.eye(self.num_factors)]).to(
            param
        )
        log_probs = torch.log_softmax(self.decoder(states), dim=-1)
        return log_probs[1:] - log_probs[:1]


class DocumentBaseline(nn.Module):
    r"""An input-dependent baseline network :math:`C_\omega(x) = n(x)\,h_\omega(x)`.

    The learning signal :math:`\log p_\theta(x \mid z)` is a sum over the :math:`n(x)` tokens of a
    document, so it scales with the document's length; the network :math:`h_\omega` (one
    ``tanh`` hidden layer on :math:`\log(1 + c)`) predicts the signal *per token*, which is of
    order one; it starts at :math:`-\log V`, a uniform model's value. Use it inside
    :class:`gradkit.baselines.LearnedBaseline`.

    Example:
        >>> import torch
        >>> from gradkit.models.topic import DocumentBaseline
        >>> DocumentBaseline(vocab_size=5)(torch.ones(3, 5)).shape
        torch.Size([3])
    """

    def __init__(self, vocab_size: int, hidden: int = 32) -> None:
        super().__init__()
        hidden_layer, output = nn.Linear(vocab_size, hidden), nn.Linear(hidden, 1)
        self.net = nn.Sequential(hidden_layer, nn.Tanh(), output)
        with torch.no_grad():  # start at the per-token log-likelihood of a uniform model
            output.bias.fill_(-math.log(vocab_size))

    def forward(self, docs: Tensor) -> Tensor:
        return docs.sum(-1) * self.net(docs.log1p()).squeeze(-1)


class GradientEstimator(nn.Module):
    r"""A per-document estimate of :math:`\mathbb{E}_{q_\lambda(z \mid x)}[\log p_\theta(x \mid z)]`
    whose gradient with respect to the inference logits is the chosen estimator's.

    Methods (:data:`METHODS`):

    * ``"none"``, ``"ema"``, ``"learned"``, ``"loo"``: the score function
      :math:`(\log p_\theta(x \mid z_s) - b)\,\nabla_\lambda \log q_\lambda(z_s \mid x)`
      (Williams 1992) through :func:`gradkit.expectation <gradkit.autodiff.expectation>` with
      ``q = Independent(Bernoulli(logits), 1)`` and ``plate=True``: one learning signal per
      document, each document's logits credited with its own signal only; the baseline
      :math:`b` is zero, an exponential moving average, a learned :math:`C_\omega(x)`
      (:class:`DocumentBaseline` trained by L2 regression onto the signal, averaged over the
      document's samples; Mnih and Gregor 2014) or the mean of the other samples (Kool et al.
      2019).
    * ``"linear_cv"``: a control variate that depends on :math:`z`, which a baseline may not:
      the first-order Taylor expansion :math:`\tilde f(z) = f(\psi) + \nabla f(\psi)^\top
      (z - \psi)` of :math:`f = \log p_\theta(x \mid \cdot)` at the mean :math:`\psi`, whose
      expectation :math:`f(\psi)` is known (MuProp, Gu et al. 2016): the score function runs on
      the residual :math:`f - \tilde f` with the leave-one-out baseline, and
      :math:`\nabla_\ell \mathbb{E}_q[\tilde f] = \psi(1-\psi)\nabla f(\psi)` (with respect
      to the logits :math:`\ell`) is added
      back (:class:`gradkit.control_variates.DeltaMethod` with ``order=1`` and coefficient 1,
      MuProp's choice: a coefficient estimated from three other samples per coordinate is
      too noisy here). One extra gradient of the decoder per step.
    * ``"local_expectation"``: local expectation gradients (Titsias and Lázaro-Gredilla 2015).
      Each factor's expectation is summed out exactly given the others' sampled values,
      :math:`\partial_{\ell_j} = \psi_j(1-\psi_j)\,\mathbb{E}_{z_{-j}}[f(z_{-j}, 1) -
      f(z_{-j}, 0)]`: unbiased, :math:`k+1` decoder evaluations per sample.
    * ``"straight_through"``: straight-through Gumbel (Bengio et al. 2013; Jang et al. 2017;
      Maddison et al. 2017): a binary concrete sample :math:`y` is thresholded on the forward
      pass and the gradient of :math:`y` is used on the backward pass. **Biased**.

    :math:`\theta` always gets the ordinary gradient of :math:`\log p_\theta(x \mid z_s)`.

    Args:
        method: a key of :data:`METHODS`.
        num_samples: samples of z per document (``>= 2`` for ``"loo"`` and ``"linear_cv"``).
        vocab_size: needed by ``"learned"`` (the baseline network's input size).
        ema_decay: decay of the moving average.
        temperature: temperature of the binary concrete relaxation.

    Raises:
        ValueError: for an unknown method, ``num_samples < 2`` with ``"loo"`` or
            ``"linear_cv"``, or a missing
            ``vocab_size`` with ``"learned"``.

    Example:
        >>> import torch
        >>> from gradkit.models.topic import BernoulliTopicModel, GradientEstimator
        >>> model = BernoulliTopicModel(vocab_size=20, num_factors=3)
        >>> docs, _ = model.sample(num_docs=4, doc_length=10)
        >>> value, aux = GradientEstimator("loo", num_samples=4)(model, docs, model.logits(docs))
        >>> value.shape, float(aux)
        (torch.Size([4]), 0.0)
    """

    def __init__(
        self,
        method: str,
        num_samples: int,
        *,
        vocab_size: int | None = None,
        ema_decay: float = 0.9,
        temperature: float = 0.5,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
        _checks.check_count("num_samples", num_samples)
        if method in ("loo", "linear_cv") and num_samples < 2:
            raise ValueError(
                "the leave-one-out baseline needs num_samples >= 2 (each sample's baseline is "
                f"the mean of the others), got {num_samples}"
            )
        if method == "learned" and vocab_size is None:
            raise ValueError("method 'learned' needs vocab_size= (the baseline network's input)")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.method = method
        self.num_samples = num_samples
        self.temperature = temperature
        self.baseline: Any = {
            "ema": ExponentialMovingAverage(ema_decay),
            "loo": LeaveOneOut(),
            "linear_cv": LeaveOneOut(),
        }.get(method)
        self.control_variate = DeltaMethod(1.0, order=1) if method == "linear_cv" else None
        self.learned = (
            LearnedBaseline(DocumentBaseline(vocab_size))
            if method == "learned" and vocab_size
            else None
        )

    def forward(
        self, model: BernoulliTopicModel, docs: Tensor, logits: Tensor, *, update: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(value, auxiliary_loss)``.

        ``value`` has the shape of ``logits`` without its last dimension (``(*B,)``, or
        ``(R, *B)`` for logits replicated ``R`` times to measure variance); its expectation is
        :math:`\\mathbb{E}_q[\\log p_\\theta(x \\mid z)]`. ``auxiliary_loss`` is the learned
        baseline's regression loss (zero otherwise): add it to the loss being minimised.
        ``update=False`` leaves the moving average untouched (its current value is read with
        :meth:`~gradkit.baselines.Baseline.value`, which never changes it).
        """

        def f(z: Tensor) -> Tensor:
            return model.log_likelihood(docs, z)

        zero = logits.new_zeros(())
        if self.method == "local_expectation":
            return self._local_expectation(f, logits), zero
        if self.method == "straight_through":
            relaxed = Independent(
                RelaxedBernoulli(logits.new_tensor(self.temperature), logits=logits), 1
            )

            def f_hard(y: Tensor) -> Tensor:
                return f((y > 0.5).to(y) + y - y.detach())

            value = expectation(f_hard, relaxed, self.num_samples, estimator="pathwise", plate=True)
            return value, zero
        q = Independent(Bernoulli(logits=logits), 1)
        if self.method == "learned":
            assert self.learned is not None
            c = self.learned(docs)  # C(x), one prediction per document
            value = expectation(
                f, q, self.num_samples, estimator="score_function", plate=True, baseline=c
            )
            return value, self.learned.loss(c, value.detach())
        baseline = self.baseline
        if self.method == "ema" and not update:
            # The estimator reads the moving average and then records this call's signal, in
            # nats whatever scale the caller's loss has. To measure without recording, pass the
            # average's current value (value() never changes it) as a constant.
            baseline = self.baseline.value(logits.new_zeros(1), {})
        value = expectation(
            f,
            q,
            self.num_samples,
            estimator="score_function",
            plate=True,
            baseline=baseline,
            control_variate=self.control_variate,
        )
        return value, zero

    def _local_expectation(self, f: Any, logits: Tensor) -> Tensor:
        k = logits.shape[-1]
        with torch.no_grad():
            z = Independent(Bernoulli(logits=logits), 1).sample((self.num_samples,))
            eye = torch.eye(k, dtype=z.dtype, device=z.device).reshape(k, *([1] * (z.dim() - 1)), k)
            flipped = z + eye - 2 * z * eye  # (k, S, *B, k): factor j flipped in row j
            f_flip = f(flipped)  # (k, S, *B)
        fz = f(z)  # (S, *B), carries theta's gradient
        sign = 2 * z.movedim(-1, 0) - 1  # +1 where z_j = 1: f(z_j=1) - f(z_j=0)
        diff = (sign * (fz.detach() - f_flip)).mean(1).movedim(0, -1)  # (*B, k)
        psi = torch.sigmoid(logits.detach())
        grad = psi * (1 - psi) * diff
        return fz.mean(0) + ((logits - logits.detach()) * grad).sum(-1)


def exact_logit_gradient(model: BernoulliTopicModel, docs: Tensor) -> Tensor:
    r"""The exact :math:`\nabla_\ell \sum_b \mathbb{E}_q[\log p_\theta(x_b \mid z)]` with respect to
    the inference logits, by enumerating the :math:`2^k` states. Returns ``(*B, k)``.

    Raises ``ValueError`` for ``k > 16``.

    Example:
        >>> from gradkit.models.topic import BernoulliTopicModel, exact_logit_gradient
        >>> model = BernoulliTopicModel(vocab_size=20, num_factors=3)
        >>> docs, _ = model.sample(num_docs=4, doc_length=10)
        >>> exact_logit_gradient(model, docs).shape
        torch.Size([4, 3])
    """
    with torch.enable_grad():
        logits = model.logits(docs).detach().requires_grad_()
        value = model.expected_log_likelihood_exact(docs, logits).sum()
        return torch.autograd.grad(value, logits)[0]


def summarise_logit_gradients(estimates: Tensor, exact: Tensor) -> dict[str, float]:
    r"""How replicated gradient estimates ``(R, *shape)`` compare with the exact ``(*shape)``.

    Returns:
        ``max_bias_z``: the largest :math:`|\bar g - g| / \mathrm{se}` over coordinates (a few
        units for an unbiased estimator); ``relative_std``: the median over coordinates of
        :math:`\mathrm{sd}(\hat g) / |g|`; ``sign_agreement``: the fraction of single estimates
        whose sign matches the exact gradient's.

    Example:
        >>> import torch
        >>> from gradkit.models.topic import summarise_logit_gradients
        >>> s = summarise_logit_gradients(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0]))
        >>> s["max_bias_z"], s["relative_std"], s["sign_agreement"]
        (0.0, 0.7071067690849304, 1.0)
    """
    n = estimates.shape[0]
    if n < 2:
        raise ValueError(f"a summary needs at least 2 replicated estimates, got {n}")
    bias_z = z_score(estimates, exact).abs()
    return {
        "max_bias_z": float(bias_z.max()),
        "relative_std": float((estimates.std(0) / exact.abs()).median()),
        "sign_agreement": float((estimates.sign() == exact.sign()).to(estimates.dtype).mean()),
    }


def logit_gradients(
    model: BernoulliTopicModel, estimator: GradientEstimator, docs: Tensor, replicates: int
) -> Tensor:
    r"""``replicates`` independent estimates of :math:`\nabla_\ell \sum_b
    \mathbb{E}_q[\log p_\theta(x_b \mid z)]` with respect to the inference logits :math:`\ell`.

    One vectorised call: the logits are replicated along a new leading dimension, which the
    estimator treats as more documents. Leaves the estimator's state (moving average) as it was.

    Returns:
        shape ``(replicates, *B, k)``.

    Example:
        >>> import torch
        >>> from gradkit.models.topic import BernoulliTopicModel, GradientEstimator, logit_gradients
        >>> model = BernoulliTopicModel(vocab_size=20, num_factors=3)
        >>> docs, _ = model.sample(num_docs=4, doc_length=10)
        >>> logit_gradients(model, GradientEstimator("none", 1), docs, replicates=5).shape
        torch.Size([5, 4, 3])
    """
    logits = model.logits(docs).detach()
    leaf = logits.expand(replicates, *logits.shape).clone().requires_grad_()
    value, _ = estimator(model, docs, leaf, update=False)
    return torch.autograd.grad(value.sum(), leaf)[0]


def encoder_gradient_variance(
    model: BernoulliTopicModel, estimator: GradientEstimator, docs: Tensor, replicates: int = 16
) -> float:
    r"""Total variance :math:`\mathrm{tr}\,\mathrm{Cov}[\hat g]` of the inference network gradient.

    :math:`\hat g` estimates the gradient, with respect to every encoder parameter
    :math:`\lambda`, of the objective used in training, the batch's ELBO per token
    :math:`\sum_b \mathrm{ELBO}(x_b) / \sum_b n(x_b)` (its analytic KL part is exact and adds no
    variance). ``replicates`` independent estimates at fixed parameters are computed in one
    pass: :func:`logit_gradients`, then the encoder's vector-Jacobian product vectorised over
    replicates with ``torch.func.vmap``. (:func:`gradkit.diagnostics.gradient_variance` only
    reduces estimates it is given; this function draws them, for the encoder's weights.)

    Example:
        >>> import torch
        >>> from gradkit.models.topic import BernoulliTopicModel, GradientEstimator
        >>> from gradkit.models.topic import encoder_gradient_variance
        >>> model = BernoulliTopicModel(vocab_size=20, num_factors=3)
        >>> docs, _ = model.sample(num_docs=4, doc_length=10)
        >>> encoder_gradient_variance(model, GradientEstimator("loo", 4), docs) > 0
        True
    """
    if replicates < 2:
        raise ValueError(f"a variance needs replicates >= 2, got {replicates}")
    grads = logit_gradients(model, estimator, docs, replicates) / docs.sum()
    params = {name: p.detach() for name, p in model.encoder.named_parameters()}
    inputs = docs.log1p()
    pullback = vjp(lambda p: functional_call(model.encoder, p, (inputs,)), params)[1]
    per_param = vmap(pullback)(grads)[0]
    return float(sum(g.var(0).sum() for g in per_param.values()))


def _per_token_elbo(model: BernoulliTopicModel, docs: Tensor, num_samples: int) -> float:
    return float(model.elbo(docs, num_samples).sum() / docs.sum())


def train(
    model: BernoulliTopicModel,
    train_docs: Tensor,
    test_docs: Tensor,
    method: str,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    num_samples: int = 4,
    lr: float = 3e-3,
    eval_every: int = 50,
    eval_samples: int = 16,
    variance_docs: int = 32,
    replicates: int = 16,
    progress: bool = True,
    estimator_options: Mapping[str, Any] | None = None,
) -> History:
    r"""Maximise the ELBO with Adam (Kingma and Ba 2015), the encoder's gradient by ``method``.

    Each step draws ``batch_size`` training documents, estimates
    :math:`\mathbb{E}_q[\log p_\theta(x \mid z)]` with :class:`GradientEstimator`, subtracts the
    analytic KL and maximises the batch's ELBO per token (plus, for ``"learned"``, minimises
    the baseline's regression loss); :func:`gradkit.models.training.fit` runs the steps. At
    step 0, every ``eval_every`` steps and at the end a record holds, besides ``step``,
    ``seconds`` and ``median_step_seconds``:

    * ``train_elbo`` and ``test_elbo``: the training and held-out ELBO per token, estimated
      with ``eval_samples`` draws per document;
    * ``grad_variance``: :func:`encoder_gradient_variance` with ``replicates`` replicates on the
      first ``variance_docs`` training documents, at the parameters after ``step`` updates.

    Args:
        model: the model, trained in place.
        train_docs: counts ``(D, V)`` on the model's device.
        test_docs: held-out counts ``(D', V)``.
        method: a key of :data:`METHODS`.
        steps, batch_size, num_samples, lr: optimisation settings.
        eval_every, eval_samples, variance_docs, replicates: measurement settings.
        progress: show a ``tqdm.auto`` progress bar.
        estimator_options: extra keyword arguments of :class:`GradientEstimator`.

    Returns:
        a :class:`~gradkit.models.training.History` labelled with ``method``, the model as
        ``model``.

    Raises:
        ValueError: for non-positive counts, fewer than 2 replicates or an unknown method.

    Example:
        >>> import torch
        >>> from gradkit.models.topic import BernoulliTopicModel, train
        >>> model = BernoulliTopicModel(vocab_size=20, num_factors=3)
        >>> docs, _ = model.sample(num_docs=16, doc_length=10)
        >>> run = train(model, docs, docs, "loo", steps=4, eval_every=2, progress=False)
        >>> run.steps, run.label, run.keys[1:4]
        ([0, 2, 4], 'loo', ['train_elbo', 'test_elbo', 'grad_variance'])
    """
    for name, value in [("steps", steps), ("batch_size", batch_size)]:
        _checks.check_count(name, value)  # fit checks eval_every
    _checks.check_count("variance_docs", variance_docs)
    _check_docs(train_docs, model.vocab_size)
    _check_docs(test_docs, model.vocab_size)
    estimator = GradientEstimator(
        method, num_samples, vocab_size=model.vocab_size, **dict(estimator_options or {})
    )
    param = next(model.parameters())
    estimator.to(device=param.device, dtype=param.dtype)
    optimizer = torch.optim.Adam([*model.parameters(), *estimator.parameters()], lr=lr)
    probe = train_docs[:variance_docs]

    def step(_: int) -> None:
        index = torch.randint(len(train_docs), (batch_size,), device=train_docs.device)
        docs = train_docs[index]
        logits = model.logits(docs)
        value, aux = estimator(model, docs, logits)
        loss = -(value - model.kl(logits)).sum() / docs.sum() + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def evaluate(_: int) -> dict[str, float]:
        return {
            "train_elbo": _per_token_elbo(model, train_docs, eval_samples),
            "test_elbo": _per_token_elbo(model, test_docs, eval_samples),
            "grad_variance": encoder_gradient_variance(model, estimator, probe, replicates),
        }

    return fit(
        step,
        evaluate,
        steps=steps,
        eval_every=eval_every,
        device=param.device,
        label=method,
        model=model,
        show="test_elbo",
        progress=progress,
    )


def factor_words(
    model: BernoulliTopicModel, vocabulary: Sequence[str], top: int = 8
) -> list[list[str]]:
    """The ``top`` words whose probability factor ``j`` raises most, for each factor.

    Example:
        >>> from gradkit.models.topic import BernoulliTopicModel, factor_words
        >>> len(factor_words(BernoulliTopicModel(5, 2), list("abcde"), top=3)[1])
        3
    """
    if len(vocabulary) != model.vocab_size:
        raise ValueError(
            f"vocabulary has {len(vocabulary)} words but the model has "
            f"vocab_size={model.vocab_size}; pass the vocabulary the documents were counted over"
        )
    index = model.factor_effects().topk(top, dim=-1).indices.tolist()
    return [[vocabulary[i] for i in row] for row in index]
