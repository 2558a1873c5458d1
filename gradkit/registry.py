r"""The estimator registry: every estimator, built in or yours, behind one interface.

An estimator of :math:`\nabla_\theta \mathbb{E}_{p(x;\theta)}[f(x)]` is registered under a name
with :func:`register_estimator`, in the style of :func:`torch.distributions.kl.register_kl`:

.. code-block:: python

    @gk.register_estimator("my_reinforce", families=(Bernoulli,))
    def my_reinforce(problem, *, scale=1.0):
        weights = problem.broadcast(scale * problem.signal)  # f at the forward samples
        return problem.per_sample_gradients(lambda d: weights * d.log_prob(problem.x))

after which ``gk.ESTIMATORS["my_reinforce"](f, dist, n)`` returns per-sample estimates and
``gk.expectation(f, dist, n, estimator="my_reinforce", scale=2.0)`` trains with it. The
estimator receives a :class:`Problem`: the forward pass's samples and values, the cost (in
:func:`~gradkit.autodiff.expectation`'s backward pass already contracted with the upstream
gradient), whether the caller declared a plate, and the call's random stream. It returns one row per
sample (or per group of samples that only make sense together) for each parameter; the mean
over rows is the estimate.

**Independence is declared, never guessed.** With ``plate=False`` (the default) every output
element of ``f`` may depend on every sample coordinate, and the *learning signal* is ``f``
summed over its outputs, one value per sample: unbiased for any ``f``. With ``plate=True`` the
caller declares that ``f`` returns ``(S, *batch_shape)`` and that output element ``b`` depends
only on ``x[:, b]``; the signal keeps one value per batch element and each parameter element
is credited with its own element's cost only (lower variance; fewer evaluations for the
measure-valued estimator).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.distributions import Distribution

from gradkit import _checks
from gradkit._engine import Resolved, Stream, closed_form_scores, gradients, log_prob, resolve

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "PlateHint",
    "Problem",
    "get_estimator",
    "register_estimator",
]

CostFn = Callable[[Tensor], Tensor]
COMMON_OPTIONS = ("control_variate", "plate", "generator")


class PlateHint(UserWarning):
    """Issued once per process when a cost looks like a plate that was not declared.

    Silence it with ``warnings.filterwarnings("ignore", category=gk.PlateHint)``.
    """


_hinted: set[str] = set()


def _shape(lead: str, shape: tuple[int, ...]) -> str:
    return "(" + ", ".join([lead, *map(str, shape)]) + ("," if not shape else "") + ")"


def _hint_plate(name: str, batch: tuple[int, ...]) -> None:
    if name in _hinted:
        return
    _hinted.add(name)
    warnings.warn(
        f"f returned one value per batch element, shape {_shape('S', batch)}, "
        f"and the {name} estimator treats them as coupled (plate=False, always unbiased). If "
        "output element b depends only on x[:, b] (one cost per data point), pass plate=True "
        "for lower variance" + (" and fewer evaluations" if name == "measure_valued" else ""),
        PlateHint,
        stacklevel=_user_stacklevel(),
    )


def _user_stacklevel() -> int:
    """The stack level of the first frame outside gradkit (where the user called it)."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("gradkit"):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


class Problem:
    r"""What an estimator receives: one call's distribution, cost, samples and randomness.

    Attributes:
        resolved: the distribution, read once (:class:`gradkit._engine.Resolved`).
        dist: the distribution.
        names: the parameters to estimate (all of them for the per-sample interface; those that
            require grad in :func:`~gradkit.autodiff.expectation`).
        num_samples: ``S``.
        plate: whether the caller declared the batch dimensions a plate.
        stream: the call's random numbers (:class:`gradkit._engine.Stream`).
        prepared: what the estimator's ``prepare`` step returned in the forward pass.
    """

    def __init__(
        self,
        f: CostFn,
        resolved: Resolved,
        num_samples: int,
        *,
        plate: bool,
        stream: Stream,
        names: Sequence[str],
        estimator: Estimator,
    ) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable (samples -> values), got {type(f).__name__}")
        if not isinstance(plate, bool):
            raise TypeError(
                f"plate must be True or False, got {plate!r}; plate=True declares that output "
                "element b of f depends only on x[:, b]"
            )
        self.f = f
        self.resolved = resolved
        self.dist = resolved.dist
        self.num_samples = num_samples
        self.plate = plate
        self.stream = stream
        self.names = list(names)
        self.estimator = estimator
        self.prepared: Any = None
        self.options: dict[str, Any] = {}
        self.weights: Tensor | None = None  # the upstream gradient in expectation's backward
        self._signal_fn: Callable[[Tensor, int], Tensor] | None = None
        self._x: Tensor | None = None
        self._fx: Tensor | None = None
        self.output_shape: tuple[int, ...] | None = None
        self._cache: dict[str, Any] = {}  # what depends on the signal (reset per copy)
        self._memo: dict[str, Any] = {}  # what depends on the call only (shared by copies)

    # -- the forward pass ---------------------------------------------------------------------

    @property
    def params(self) -> dict[str, Tensor]:
        """The parameters to estimate (the distribution's own tensors)."""
        return {n: self.resolved.params[n] for n in self.names}

    @property
    def has_forward(self) -> bool:
        return self._x is not None

    @property
    def x(self) -> Tensor:
        """The forward samples ``(S, *batch, *event)`` (drawn on first use, detached)."""
        if self._x is None:
            x = self.estimator.sample(self).detach()
            self.set_forward(x, self.evaluate(x).detach())
        assert self._x is not None
        return self._x

    @property
    def fx(self) -> Tensor:
        """``f`` at the forward samples, ``(S, *T)``, detached."""
        self.x  # noqa: B018 (draws the samples on first use)
        assert self._fx is not None
        return self._fx

    def set_forward(self, x: Tensor, fx: Tensor) -> None:
        self._x, self._fx = x, fx
        self._cache = {}

    def evaluate(self, x: Tensor, lead: int = 1) -> Tensor:
        """``f(x)`` with its checks; the first call fixes (and checks) the output shape ``T``."""
        shape = tuple(x.shape[:lead])
        fx = _checks.evaluate(self.f, x, shape)
        tail = tuple(fx.shape[lead:])
        if self.output_shape is None:
            self._check_output(tail)
            self.output_shape = tail
        elif tail != self.output_shape:
            raise ValueError(
                f"f returned values of shape {tail} per sample for samples of shape "
                f"{tuple(x.shape)}, but {self.output_shape} for the forward samples; f must "
                "broadcast over leading sample dimensions (index x[..., i], not x[:, i])"
            )
        return fx

    def _check_output(self, tail: tuple[int, ...]) -> None:
        batch = tuple(self.resolved.batch_shape)
        if self.plate and tail != batch:
            raise ValueError(
                f"plate=True declares one cost per batch element, so f must return shape "
                f"(num_samples, *batch_shape) = {_shape('S', batch)}, but it "
                f"returned {_shape('S', tail)}. Return one value per "
                "batch element, or pass plate=False (every output may depend on every "
                "coordinate)"
            )
        if not self.plate and batch and tail == batch and self.estimator.benefits_from_plate:
            _hint_plate(self.estimator.name, batch)

    # -- the learning signal ------------------------------------------------------------------

    @property
    def plate_shape(self) -> tuple[int, ...]:
        """``batch_shape`` under a declared plate, else ``()``."""
        return tuple(self.resolved.batch_shape) if self.plate else ()

    def contract(self, values: Tensor, lead: int = 1) -> Tensor:
        """Values ``(*lead, *T)`` -> the signal ``(*lead, *plate_shape)`` (weighted, summed)."""
        if self.weights is not None:
            values = values * self.weights
        if self.plate or values.dim() == lead:  # one value per sample already
            return values
        return values.reshape(*values.shape[:lead], -1).sum(-1)

    def cost(self, x: Tensor, lead: int = 1) -> Tensor:
        """The learning signal of ``f`` at ``x`` (leading dims ``lead``), without gradients."""
        with torch.no_grad():
            if self._signal_fn is not None:
                return self._signal_fn(x, lead)
            return self.contract(self.evaluate(x, lead), lead)

    def signal_with_grad(self, x: Tensor) -> Tensor:
        """The learning signal at ``x`` ``(S, ...)``, differentiable (for pathwise estimators)."""
        if self._signal_fn is not None:
            return self._signal_fn(x, 1)
        return self.contract(self.evaluate(x, 1), 1)

    @property
    def signal(self) -> Tensor:
        """The learning signal at the forward samples, ``(S, *plate_shape)``."""
        if "signal" not in self._cache:
            if self._signal_fn is not None:
                self._cache["signal"] = self._signal_fn(self.x, 1).detach()
            else:
                self._cache["signal"] = self.contract(self.fx, 1)
        return self._cache["signal"]

    @property
    def forward_signal(self) -> Tensor:
        """The signal in the units of ``f`` (never weighted by an upstream gradient)."""
        if self._signal_fn is not None or self.weights is None:
            return self.signal
        fx = self.fx
        return fx if self.plate else fx.reshape(fx.shape[0], -1).sum(-1)

    def to_signal_units(self, value: Tensor, name: str | None = None) -> Tensor:
        """A per-sample quantity in the units of ``f`` (a baseline) -> the signal's units.

        In :func:`~gradkit.autodiff.expectation`'s backward pass the signal is ``f`` contracted with
        the upstream gradient ``g``: a baseline computed in the forward pass is weighted by ``g``
        per plate element, or by the mean of ``g`` for a coupled cost (any fixed weighting
        keeps the estimate unbiased). ``name`` aligns a per-parameter value ``(S, *param)``.
        """
        if self.weights is None or self._signal_fn is not None:
            return value
        if not self.plate:
            return value * self.weights.mean()
        weights = self.weights
        if name is not None:
            extra = self.resolved.params[name].dim() - weights.dim()
            weights = weights.reshape(*weights.shape, *([1] * extra))
        return value * weights

    def broadcast(self, signal: Tensor, name: str | None = None) -> Tensor:
        """Reshape a signal ``(R, *plate_shape)`` to broadcast against ``log_prob`` or a parameter.

        Without ``name``: against ``dist.log_prob(x)``, shape ``(R, *batch_shape)``. With a
        parameter name: against per-sample estimates ``(R, *param.shape)``.
        """
        if name is None:
            extra = len(self.resolved.batch_shape) - (signal.dim() - 1)
        else:
            extra = self.resolved.params[name].dim() - (signal.dim() - 1)
        if extra <= 0:
            return signal
        return signal.reshape(*signal.shape, *([1] * extra))

    # -- the engine ---------------------------------------------------------------------------

    def per_sample_gradients(
        self,
        fn: Callable[[Distribution], Tensor],
        rows: int | None = None,
        *,
        create_graph: bool = False,
    ) -> dict[str, Tensor]:
        """Per-sample gradients of ``fn(rebuilt)`` (see :func:`gradkit._engine.gradients`)."""
        count = self.num_samples if rows is None else rows
        return gradients(self.resolved, fn, self.names, count, create_graph=create_graph)

    def summed_gradients(self, fn: Callable[[Distribution], Tensor]) -> dict[str, Tensor]:
        """The gradient of ``fn(rebuilt).sum()`` at the parameters themselves (no copies)."""
        return gradients(self.resolved, fn, self.names, None)

    def scores(self, x: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample scores :math:`\\nabla_\\theta \\log p(x_s;\\theta)`, ``(S, *param)``."""
        x = self.x if x is None else x
        closed = closed_form_scores(self.resolved, x, self.names)
        if closed is not None:
            return closed
        return gradients(self.resolved, lambda d: log_prob(d, x), self.names, x.shape[0])

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per call, shared by the problem's weighted and control copies."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def randomness(self) -> Any:
        """Context for the estimator's own random draws (replayed for a control variate)."""
        return self.stream.phase("estimator")

    def forward_randomness(self) -> Any:
        """Context in which the forward samples are drawn (a pathwise estimator redraws them)."""
        return self.stream.phase("forward")

    # -- variants -----------------------------------------------------------------------------

    def _copy(self) -> Problem:
        new = object.__new__(Problem)
        new.__dict__.update(self.__dict__)
        new._cache = {}
        return new

    def weighted(self, weights: Tensor) -> Problem:
        """The same problem for the cost contracted with an upstream gradient ``weights``."""
        new = self._copy()
        new.weights = weights.detach()
        return new

    @property
    def replaces_signal(self) -> bool:
        """True for a copy that carries another signal, as :meth:`with_signal` makes."""
        return self._signal_fn is not None

    def with_signal(self, fn: Callable[[Tensor, int], Tensor]) -> Problem:
        """The same samples and randomness with another signal (a control variate's)."""
        new = self._copy()
        new._signal_fn = fn
        return new


def _keyword_options(fn: Callable[..., Any]) -> tuple[str, ...]:
    parameters = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)


class Estimator:
    r"""A gradient estimator behind the registry.

    Subclass it (or register a plain function, which becomes :meth:`estimate`) and set:

    Attributes:
        name: the registered name.
        families: the base distribution types it supports (``None``: any it accepts); the
            conformance tests read this.
        biased: ``True`` for estimators that are biased by design (relaxations,
            straight-through).
        reparameterised: the forward samples carry the gradient (pathwise estimators);
            :func:`~gradkit.autodiff.expectation` then lets autograd differentiate through them.
        benefits_from_plate: a declared plate lowers the variance or the cost (used for the
            one-time :class:`PlateHint`).
        min_samples: the fewest samples a call needs.

    Calling an instance is the per-sample interface:
    ``est(f, dist, num_samples, *, control_variate=None, plate=False, generator=None,
    **options) -> dict[str, Tensor]``.
    """

    name: str = ""
    families: tuple[type, ...] | None = None
    #: what to use instead, in the refusal of a distribution outside ``families``
    instead: str = (
        "choose another estimator from gk.ESTIMATORS (score_function works for any "
        "distribution with a differentiable log_prob)"
    )
    biased: bool = False
    reparameterised: bool = False
    benefits_from_plate: bool = True
    min_samples: int = 1

    # -- to override --------------------------------------------------------------------------

    def check(self, problem: Problem, **options: Any) -> None:
        """Refuse what the estimator cannot do (default: a family outside ``families``)."""
        if self.families is None:
            return
        base = problem.resolved.base
        if not isinstance(base, self.families):
            names = ", ".join(t.__name__ for t in self.families)
            raise ValueError(
                f"the {self.name} estimator supports {names}, got {type(base).__name__}; "
                f"{self.instead}"
            )

    def sample(self, problem: Problem) -> Tensor:
        """The forward samples, drawn in the forward phase of the call's stream."""
        with problem.forward_randomness():
            return problem.dist.sample((problem.num_samples,))

    def path(self, dist: Distribution, sample_shape: tuple[int, ...]) -> Tensor:
        """Reparameterised samples (for ``reparameterised`` estimators)."""
        raise NotImplementedError(f"the {self.name} estimator has no reparameterised path")

    def forward_path(self, problem: Problem, **options: Any) -> Tensor:
        """The forward samples of a ``reparameterised`` estimator, carrying the gradient."""
        with problem.forward_randomness():
            return self.path(problem.dist, (problem.num_samples,), **options)

    def prepare(self, problem: Problem, **options: Any) -> Any:
        """Work of the forward pass that must see the forward samples first (baselines)."""
        return None

    def estimate(self, problem: Problem, **options: Any) -> dict[str, Tensor]:
        """Per-row estimates, ``{name: (R, *param.shape)}`` for every name in problem.names."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement estimate(problem, **options) (or register a "
            "function with @gk.register_estimator)"
        )

    def mean_gradient(self, problem: Problem, **options: Any) -> dict[str, Tensor]:
        """The estimate itself (mean over rows); override when it is cheaper than the rows."""
        return {n: v.mean(0) for n, v in self.estimate(problem, **options).items()}

    def value(self, problem: Problem, fx: Tensor) -> Tensor:
        """The Monte Carlo estimate of :math:`\\mathbb{E}[f]` (``fx`` carries f's graph)."""
        return fx.mean(0)

    def finish(self, problem: Problem, **options: Any) -> None:
        """State updates after the call has used its state (a moving-average baseline)."""

    def targets(self, resolved: Resolved, requested: Sequence[str], **options: Any) -> list[str]:
        """Which parameters this estimator differentiates among ``requested``."""
        return list(requested)

    # -- the interface ------------------------------------------------------------------------

    @property
    def options(self) -> tuple[str, ...]:
        """The estimator's own keyword options, read from :meth:`estimate`'s signature."""
        cached: tuple[str, ...] | None = self.__dict__.get("_options")
        if cached is None:
            cached = _keyword_options(self.estimate)
            self.__dict__["_options"] = cached
        return cached

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = [*self.options, *COMMON_OPTIONS]
            raise TypeError(
                f"the {self.name} estimator got unexpected option(s) {unknown}; it takes {takes}"
            )
        return dict(options)

    def problem(
        self,
        f: CostFn,
        dist: Distribution,
        num_samples: int,
        *,
        plate: bool,
        generator: torch.Generator | None,
        trainable_only: bool = False,
        options: Mapping[str, Any],
    ) -> Problem:
        resolved = resolve(dist)
        why = f"the {self.name} estimator needs them" if self.min_samples > 1 else ""
        _checks.check_num_samples(num_samples, self.min_samples, why)
        stream = Stream(generator, resolved.device)
        requested = [n for n, p in resolved.params.items() if p.requires_grad or not trainable_only]
        problem = Problem(
            f,
            resolved,
            num_samples,
            plate=plate,
            stream=stream,
            names=self.targets(resolved, requested, **options),
            estimator=self,
        )
        problem.options = dict(options)
        self.check(problem, **options)
        return problem

    def __call__(
        self,
        f: CostFn,
        dist: Distribution,
        num_samples: int,
        *,
        control_variate: Any = None,
        plate: bool = False,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> dict[str, Tensor]:
        if torch.is_inference_mode_enabled():
            # the per-sample gradients need autograd, and tensors made in inference mode (the
            # samples, the signal) cannot be saved for backward: run the call outside it
            with torch.inference_mode(False), torch.no_grad():
                return self(
                    f,
                    dist,
                    num_samples,
                    control_variate=control_variate,
                    plate=plate,
                    generator=generator,
                    **options,
                )
        options = self.validate(options)
        problem = self.problem(
            f, dist, num_samples, plate=plate, generator=generator, options=options
        )
        if not self.reparameterised:
            problem.x  # noqa: B018 (the forward samples and values)
        problem.prepared = self.prepare(problem, **options)
        rows = self.estimate(problem, **options)
        if control_variate is not None:
            rows = apply_control_variate(control_variate, self, problem, rows, options)
        self.finish(problem, **options)
        params = problem.resolved.params
        return {
            n: v.to(params[n].dtype) if n in params and v.dtype != params[n].dtype else v
            for n, v in rows.items()
        }

    def __repr__(self) -> str:
        kind = "biased" if self.biased else "unbiased"
        families = "any" if self.families is None else [t.__name__ for t in self.families]
        return f"<estimator {self.name!r} ({kind}; families {families}; options {self.options})>"


class _FunctionEstimator(Estimator):
    """An estimator registered as a plain function ``fn(problem, **options) -> rows``."""

    def __init__(self, fn: Callable[..., dict[str, Tensor]]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__
        self._fn_options = _keyword_options(fn)

    @property
    def options(self) -> tuple[str, ...]:
        return self._fn_options

    def estimate(self, problem: Problem, **options: Any) -> dict[str, Tensor]:
        return self.fn(problem, **options)


def apply_control_variate(
    control_variate: Any,
    estimator: Estimator,
    problem: Problem,
    rows: dict[str, Tensor],
    options: Mapping[str, Any],
) -> dict[str, Tensor]:
    r"""Rows corrected by a control variate: :math:`\hat g - \beta\,(\hat h - \nabla_\theta
    \mathbb{E}[\tilde f])`.

    :math:`\hat h` is the same estimator applied to the control variate's function
    :math:`\tilde f` with the same samples and the same random numbers (so it is strongly
    correlated with :math:`\hat g`), and :math:`\nabla_\theta\mathbb{E}[\tilde f]` is known in
    closed form; :math:`\beta` comes from the control variate (estimated per parameter element
    from the other rows, or fixed).
    """
    from gradkit.control_variates import ControlVariate

    if not isinstance(control_variate, ControlVariate):
        raise TypeError(
            f"control_variate must be a gradkit.control_variates.ControlVariate (e.g. "
            f"DeltaMethod()), got {type(control_variate).__name__}; a number or a "
            "gradkit.baselines.Baseline is a baseline= of the score function"
        )
    control = control_variate.control(problem)
    surrogate = problem.with_signal(control.signal)
    surrogate.prepared = estimator.prepare(surrogate, **options)
    h_rows = estimator.estimate(surrogate, **options)
    expected = problem.summed_gradients(control.expectation)
    out = {}
    for name, g in rows.items():
        h = h_rows[name] - expected[name]
        # An element whose control rows equal their expectation up to rounding (a linear
        # expansion's measure-valued difference is constant) carries no control: zero it, or an
        # estimated coefficient would regress g on the rounding noise and turn it into a bias.
        # The cut is 100 eps of the control's size (about 1e-5 in float32): a control that
        # varies less than that is dropped, which stays unbiased.
        scale = torch.maximum(h_rows[name].abs().amax(0), expected[name].abs())
        noise = 100 * torch.finfo(h.dtype).eps * scale
        h = torch.where((h.abs() <= noise).all(0), torch.zeros_like(h), h)
        out[name] = g - control_variate.coefficient_for(g, h) * h
    return out


ESTIMATORS: dict[str, Estimator] = {}
_E = TypeVar("_E")


def register_estimator(
    name: str,
    *,
    families: Sequence[type] | None = None,
    biased: bool | None = None,
    replace: bool = False,
) -> Callable[[_E], _E]:
    r"""Register an estimator under ``name`` for :func:`~gradkit.autodiff.expectation` and
    ``gk.ESTIMATORS``.

    Decorates a plain function ``fn(problem, *, **options) -> {name: rows}`` (its keyword-only
    arguments are the estimator's options), an :class:`Estimator` subclass (instantiated with
    no arguments) or an :class:`Estimator` instance. The function or :meth:`Estimator.estimate`
    receives a :class:`Problem` and returns, for every name in ``problem.names``, rows of shape
    ``(R, *param.shape)`` whose mean over dim 0 estimates the gradient.

    Args:
        name: the estimator's name; a name already taken is refused unless ``replace=True``.
        families: the base distribution types the estimator supports (``None``: any); a
            distribution outside them is refused with an error that lists them.
        biased: whether the estimator is biased by design (default: the class's own
            ``Estimator.biased``, ``False`` for a function).
        replace: replace an estimator registered under ``name``.

    Returns:
        the decorator; it returns what it decorates unchanged.

    Raises:
        ValueError: for a name already taken (without ``replace=True``) or not an identifier.
        TypeError: for something that is neither a function nor an :class:`Estimator`.

    Example:
        >>> import torch, gradkit as gk
        >>> @gk.register_estimator("doc_reinforce", families=(torch.distributions.Bernoulli,))
        ... def doc_reinforce(problem):
        ...     weights = problem.broadcast(problem.signal)  # f(x_s), one per sample
        ...     return problem.per_sample_gradients(
        ...         lambda d: weights * d.log_prob(problem.x))
        >>> d = torch.distributions.Bernoulli(torch.tensor(0.3))
        >>> g = gk.ESTIMATORS["doc_reinforce"](lambda z: 2 * z, d, 20_000)
        >>> round(g["probs"].mean().item(), 1)  # d/dp E[2z] = 2
        2.0
        >>> gk.ESTIMATORS["doc_reinforce"].biased
        False
        >>> del gk.ESTIMATORS["doc_reinforce"]
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"an estimator's name must be a Python identifier string, got {name!r}; e.g. "
            "'my_reinforce'"
        )
    chosen: tuple[type, ...] | None = None if families is None else tuple(families)
    if chosen is not None:
        bad = [t for t in chosen if not (isinstance(t, type) and issubclass(t, Distribution))]
        if bad:
            raise TypeError(
                f"families must be torch.distributions.Distribution subclasses, got {bad!r}"
            )

    def decorator(obj: _E) -> _E:
        if name in ESTIMATORS and not replace:
            raise ValueError(
                f"an estimator named {name!r} is registered already "
                f"({ESTIMATORS[name]!r}); choose another name, or pass replace=True to "
                "replace it"
            )
        est: Estimator
        if isinstance(obj, Estimator):
            est = obj
        elif isinstance(obj, type) and issubclass(obj, Estimator):
            est = obj()
        elif callable(obj):
            est = _FunctionEstimator(obj)
        else:
            raise TypeError(
                f"register_estimator decorates a function fn(problem, **options) or a "
                f"gradkit.registry.Estimator, got {type(obj).__name__}"
            )
        est.name = name
        if chosen is not None:
            est.families = chosen
        if biased is not None:
            est.biased = biased
        ESTIMATORS[name] = est
        return obj

    return decorator


def get_estimator(name: object) -> Estimator:
    """The estimator registered under ``name`` (an :class:`Estimator` is returned as it is)."""
    if isinstance(name, Estimator):
        return name
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {name!r}; registered: {sorted(ESTIMATORS)}. Register your "
            "own with @gk.register_estimator('name')"
        )
    return ESTIMATORS[name]


def loo_coefficient(g: Tensor, h: Tensor) -> Tensor:
    """Per-row, per-element ``Cov(g, h) / Var(h)`` over the *other* rows (dim 0)."""
    n = g.shape[0] - 1
    g = g - g.mean(0)  # covariances are shift-invariant; centring avoids cancellation
    h = h - h.mean(0)
    sum_g = g.sum(0) - g
    sum_h = h.sum(0) - h
    cov = (g * h).sum(0) - g * h - sum_g * sum_h / n
    var = (h * h).sum(0) - h * h - sum_h * sum_h / n
    return torch.where(var > 0, cov / var.clamp_min(torch.finfo(var.dtype).tiny), 0.0)
