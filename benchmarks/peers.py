"""The same gradient estimators in Pyro and Storchastic, each peer in a process of its own.

Importing Storchastic patches torch for the whole process (``torch.is_tensor``,
``Tensor.to``, distribution argument validation switched off), so every peer runs in a fresh
``spawn`` subprocess (:class:`PeerWorker`) with as many torch threads as the benchmark itself;
gradkit's timings and the test session never see those patches. Both libraries estimate the
problems of :mod:`benchmarks.problems` at the same sizes as gradkit.

How each peer is asked for :math:`\\nabla_\\theta \\mathbb{E}_{p(z;\\theta)}[f(z)]`:

* **Pyro** (Bingham et al. 2019): ``TraceGraph_ELBO(num_particles=S, vectorize_particles=True)``
  with a guide that samples ``z`` from :math:`p(z;\\theta)` inside a ``pyro.plate`` of
  independent copies, and a model that scores the same ``z`` under the same distribution and
  adds ``pyro.factor("cost", -f(z))``. Then the ELBO is :math:`-\\mathbb{E}[f]`. For a
  score-function site the model's distribution uses *detached* parameters, so that the model's
  log-density adds no pathwise term; for a reparameterised site it shares them, so that
  :math:`\\log p - \\log q` is identically zero in :math:`\\theta`. Baselines: Pyro's decaying
  average (``use_decaying_avg_baseline``); it has no leave-one-out baseline.
* **Storchastic** (van Krieken et al. 2021): ``storch.method.ScoreFunction`` (plain,
  ``"moving_average"``, ``"batch_average"`` = leave-one-out) and ``Reparameterization``, with the
  copies marked independent by ``storch.denote_independent``; Storchastic averages over that
  plate, so its gradient is multiplied back by the number of copies. Its other discrete
  estimators (REBAR, RELAX, ARM, DisARM, unordered/without-replacement score function,
  Rao-Blackwellised score function, straight-through Gumbel-softmax) are run on the one-Bernoulli
  problem to check their means.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from torch import Tensor

from benchmarks import problems
from benchmarks.common import installed

__all__ = ["DECAY", "ESTIMATORS", "PEERS", "PeerWorker", "estimate", "measure", "missing"]

# module to import, distribution to pip install
PEERS = {"pyro": ("pyro", "pyro-ppl"), "storchastic": ("storch", "storchastic")}
# The decay of every moving-average baseline (gradkit, Pyro and Storchastic alike).
DECAY = 0.9
# Estimators each peer offers under gradkit's names; the Storchastic-only ones come last.
STORCH_EXTRAS = (
    "REBAR",
    "RELAX",
    "ARM",
    "DisARM",
    "ScoreFunctionWOR",
    "RaoBlackwellSF",
    "GumbelSoftmax-ST",
)
ESTIMATORS = {
    "pyro": ("score_function", "score_function+moving_average", "pathwise"),
    "storchastic": (
        "score_function",
        "score_function+moving_average",
        "score_function+leave_one_out",
        "pathwise",
        *STORCH_EXTRAS,
    ),
}


def missing(peer: str) -> str | None:
    """Why ``peer`` cannot run here (not installed, unknown), or ``None`` if it can.

    Example:
        >>> missing("no-such-peer")
        "unknown peer 'no-such-peer'; known: ['pyro', 'storchastic']"
    """
    if peer not in PEERS:
        return f"unknown peer {peer!r}; known: {sorted(PEERS)}"
    module, dist = PEERS[peer]
    if not installed(module):
        return (
            f"{dist} is not installed (pip install {dist}, or `make bench`, which installs "
            "gradkit's [peers] extra)"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Pyro


def _pyro_runner(problem: problems.Problem, estimator: str, copies: int, samples: int):
    import pyro
    import pyro.distributions as pdist
    from pyro.infer import TraceGraph_ELBO

    if estimator not in ESTIMATORS["pyro"]:
        raise NotImplementedError(f"Pyro's TraceGraph_ELBO offers no {estimator} estimator")
    reparam = estimator == "pathwise"
    if reparam and problem.name != "gaussian":
        raise NotImplementedError("Bernoulli latents have no reparameterisation")
    infer = {}
    if estimator.endswith("moving_average"):
        infer = {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": DECAY}}

    def law(params: dict[str, Tensor], detach: bool):
        p = {k: v.detach() if detach else v for k, v in params.items()}
        if problem.name == "gaussian":
            d = pdist.Normal(p["loc"], p["scale"])
            return d if reparam else d.has_rsample_(False)
        d = pdist.Bernoulli(logits=p["logits"])
        return d.to_event(1) if problem.name == "factorised" else d

    def plate():  # the copies are a plate; one estimate per call needs none
        return pyro.plate("copies", copies, dim=-1) if copies else contextlib.nullcontext()

    def model(params: dict[str, Tensor]) -> None:
        with plate():
            z = pyro.sample("z", law(params, detach=not reparam))
            pyro.factor("cost", -problem.cost(z))

    def guide(params: dict[str, Tensor]) -> None:
        with plate():
            pyro.sample("z", law(params, detach=False), infer=infer)

    pyro.clear_param_store()
    elbo = TraceGraph_ELBO(num_particles=samples, vectorize_particles=True, max_plate_nesting=1)

    def run() -> dict[str, Tensor]:
        params = {k: v.requires_grad_() for k, v in problem.parameters(copies).items()}
        elbo.loss_and_grads(model, guide, params)
        return {k: v.grad for k, v in params.items()}

    return run, pyro.clear_param_store


# ---------------------------------------------------------------------------------------------
# Storchastic


def _storch_method(estimator: str, samples: int):
    import storch

    method = storch.method
    makers: dict[str, Callable[[], Any]] = {
        "score_function": lambda: method.ScoreFunction("z", n_samples=samples),
        "score_function+moving_average": lambda: method.ScoreFunction(
            "z", n_samples=samples, baseline_factory="moving_average", exponential_decay=DECAY
        ),
        "score_function+leave_one_out": lambda: method.ScoreFunction(
            "z", n_samples=samples, baseline_factory="batch_average"
        ),
        "pathwise": lambda: method.Reparameterization("z", n_samples=samples),
        "REBAR": lambda: method.REBAR("z", n_samples=samples),
        "RELAX": lambda: method.RELAX("z", n_samples=samples, in_dim=1),
        "ARM": lambda: method.ARM("z", n_samples=samples),
        "DisARM": lambda: method.DisARM("z", n_samples=samples),
        # a Bernoulli has 2 outcomes: sampling both without replacement enumerates it
        "ScoreFunctionWOR": lambda: method.ScoreFunctionWOR("z", k=2),
        "RaoBlackwellSF": lambda: method.RaoBlackwellSF("z", n_samples=2),
        "GumbelSoftmax-ST": lambda: method.GumbelSoftmax(
            "z", n_samples=samples, straight_through=True
        ),
    }
    if estimator not in makers:
        raise NotImplementedError(f"Storchastic has no {estimator} estimator here")
    return makers[estimator]()


def _storch_runner(problem: problems.Problem, estimator: str, copies: int, samples: int):
    import storch

    if estimator == "pathwise" and problem.name != "gaussian":
        raise NotImplementedError("Bernoulli latents have no reparameterisation")
    extra = estimator in STORCH_EXTRAS
    if extra and problem.name != "bernoulli":
        raise NotImplementedError(f"{estimator} is only run on the one-Bernoulli problem")
    method = _storch_method(estimator, samples)

    def run() -> dict[str, Tensor]:
        params = problem.parameters(copies)
        if extra:  # these estimators need an event dimension on the parameter
            params = {k: v.unsqueeze(-1) for k, v in params.items()}
        leaves = {k: v.requires_grad_() for k, v in params.items()}
        inputs: dict[str, Any] = leaves
        if copies:
            inputs = {k: storch.denote_independent(v, 0, "copies") for k, v in leaves.items()}
        z = method(problem.distribution(inputs))
        storch.add_cost(problem.cost(z), "cost")
        storch.backward()
        # Storchastic averages over the plate of copies: scale back to one estimate per copy.
        scale = copies or 1
        shape = (copies,) if copies else ()
        return {
            k: v.grad.reshape((*shape, *problem.values[k].shape)) * scale for k, v in leaves.items()
        }

    return run, lambda: None


# ---------------------------------------------------------------------------------------------
# One measurement, in the worker


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    # the peers' own warnings (e.g. Storchastic's backward(create_graph=True)) are not ours
    warnings.simplefilter("ignore")


def measure(
    make: Callable[..., tuple[Callable[[], dict[str, Tensor]], Callable[[], Any]]],
    problem: problems.Problem,
    estimator: str,
    mode: str,
    copies: int,
    samples: int,
    repeats: int,
) -> dict[str, Any]:
    """Time ``copies`` estimates from the runner that ``make`` builds (see :func:`estimate`).

    ``make(problem, estimator, copies_or_None, samples)`` returns ``(run, reset)``: ``run()``
    gives one gradient estimate per copy (or one estimate, without a plate, for ``None``),
    ``reset()`` forgets state such as a moving average. A library that raises is reported
    (``"error"``), not propagated.

    Raises:
        ValueError: for a mode other than ``"batched"`` and ``"per_call"``.

    Example:
        >>> import torch
        >>> def make(problem, estimator, copies, samples):  # a constant "estimator"
        ...     shape = (copies,) if copies else ()
        ...     return (lambda: {"loc": torch.ones(shape)}), (lambda: None)
        >>> r = measure(make, problems.get("gaussian"), "demo", "per_call", 4, 10, 1)
        >>> r["estimates"]["loc"].shape, r["error"]
        (torch.Size([4]), None)
    """
    if mode not in ("batched", "per_call"):
        raise ValueError(f"mode must be 'batched' or 'per_call', got {mode!r}")
    try:
        if mode == "batched":
            run, reset = make(problem, estimator, copies, samples)
            run()
            times = []
            for _ in range(repeats):
                reset()
                start = time.perf_counter()
                grads = run()
                times.append(time.perf_counter() - start)
            seconds = sorted(times)[len(times) // 2]
        else:
            warm, reset = make(problem, estimator, None, samples)
            for _ in range(3):
                warm()
            reset()
            run, _ = make(problem, estimator, None, samples)  # fresh moving-average state
            start = time.perf_counter()
            rows = [run() for _ in range(copies)]
            seconds = time.perf_counter() - start
            grads = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    except Exception as err:  # a library's failure is a result to report, not a crash
        message = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        return {"estimates": {}, "seconds": float("nan"), "error": message}
    estimates = {k: v.detach().clone() for k, v in grads.items()}
    return {"estimates": estimates, "seconds": seconds, "error": None}


def estimate(
    peer: str,
    problem: str,
    estimator: str,
    mode: str,
    copies: int,
    samples: int,
    *,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """``copies`` independent estimates from ``peer``, each from ``samples`` samples, timed.

    Args:
        peer: ``"pyro"`` or ``"storchastic"``.
        problem: a name in :data:`benchmarks.problems.PROBLEMS`.
        estimator: one of :data:`ESTIMATORS` ``[peer]``.
        mode: ``"batched"`` (one call with a plate of ``copies`` independent parameter
            copies, timed as the median of ``repeats`` calls after a warm-up) or ``"per_call"``
            (``copies`` calls without a plate, the whole loop timed once after a warm-up).
        copies: number of independent estimates.
        samples: samples per estimate.
        repeats: timed repeats of a batched call.
        seed: torch seed.

    Returns:
        ``{"estimates": {name: (copies, *param.shape)}, "seconds": time for all copies,
        "error": None}``, or ``{"estimates": {}, "seconds": nan, "error": "Type: message"}``
        when the peer raises.

    Raises:
        ValueError: for an unknown peer or mode.

    Example:
        >>> estimate("no-such-peer", "gaussian", "pathwise", "batched", 10, 10)
        Traceback (most recent call last):
        ...
        ValueError: unknown peer 'no-such-peer'; known: ['pyro', 'storchastic']
    """
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; known: {sorted(PEERS)}")
    torch.manual_seed(seed)
    make = _pyro_runner if peer == "pyro" else _storch_runner
    return measure(make, problems.get(problem), estimator, mode, copies, samples, repeats)


class PeerWorker:
    """A fresh ``spawn`` process for one peer, with the parent's torch thread count.

    Use as a context manager; :meth:`estimate` has the signature of :func:`estimate` without
    ``peer``.

    Raises:
        RuntimeError: when the peer is not installed (the message says how to install it).

    Example:
        >>> PeerWorker("no-such-peer")
        Traceback (most recent call last):
        ...
        RuntimeError: unknown peer 'no-such-peer'; known: ['pyro', 'storchastic']
    """

    def __init__(self, peer: str) -> None:
        reason = missing(peer)
        if reason:
            raise RuntimeError(reason)
        self.peer = peer
        self.pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(torch.get_num_threads(),),
        )

    def estimate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run :func:`estimate` for this peer in the worker process."""
        return self.pool.submit(estimate, self.peer, *args, **kwargs).result()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the worker process (``fn`` must be importable by name,
        a module-level function, for the ``spawn`` worker to unpickle it)."""
        return self.pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Stop the worker process."""
        self.pool.shutdown(wait=True)

    def __enter__(self) -> PeerWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
