r"""gradkit's discrete-latent estimators against Storchastic's, on the REBAR/RELAX toy problem.

The toy problem of Tucker et al. (2017) and Grathwohl et al. (2018): one bit
:math:`b \sim \mathrm{Bern}(\theta)` and the cost :math:`(b - t)^2`. Its expectation is
:math:`\theta (1 - t)^2 + (1 - \theta)\, t^2`, so the gradient **with respect to the
probability** :math:`\theta` (the ``probs`` parameter of ``torch.distributions.Bernoulli``,
which every row here differentiates) is

.. math:: \frac{\partial}{\partial\theta}\,\mathbb{E}[(b - t)^2] = (1 - t)^2 - t^2 = 1 - 2t,

whatever :math:`\theta` is. At :math:`t = 0.45` it is 0.1; at :math:`t = 0.499` and
:math:`0.501` it is :math:`\pm 0.002`, a signal that is tiny next to the cost itself, which is
what makes the problem hard for a noisy estimator (and its sign a test of bias). The bit is
drawn at :math:`\theta =` :data:`THETA` = 0.3, away from the symmetric point
:math:`\theta = 0.5`, where a sign error in a term odd in the logit would cancel.

Two measurements, both with gradkit in this process and Storchastic (van Krieken et al. 2021)
in a ``spawn`` worker of its own (:class:`benchmarks.peers.PeerWorker`; importing Storchastic
patches torch for the whole process):

* :func:`toy_rows` — ``copies`` (2,000) independent estimates of ``samples`` (4) samples each,
  computed in one batched call (``copies`` independent Bernoullis, ``plate=True`` in gradkit,
  ``storch.denote_independent`` in Storchastic); for each (t, library, estimator): mean,
  standard error, z-score against :math:`1 - 2t`, variance of one estimate, time per estimate,
  verdict. A library that raises gives a row whose ``note`` holds the error.
* :func:`toy_per_call` — time per call: one estimate per call (``calls`` calls in a row, as a
  training loop makes them; gradkit through ``gk.expectation(...).backward()``, the like of
  Storchastic's ``storch.backward()``, and through its per-sample interface), and one batched
  call of ``batch`` (1,000) independent Bernoullis; gradkit's time, Storchastic's time and the
  ratio. The target is gradkit at least 10x faster per call; the ratio is reported, met or not.

The estimators are data (:data:`PAIRS`): each pairs a gradkit name in ``gk.ESTIMATORS`` with
Storchastic's method, either of which may be missing. A gradkit name that is not (yet)
registered gives a row that says so; its Storchastic counterpart still runs. gradkit's
estimators for categorical variables only (``unordered_set``, ``indecater``) get the bit as
``Categorical(probs=[1 - theta, theta])``, the gradient with respect to ``theta`` being the
difference of the two ``probs`` components.

``PYTHONPATH=. python -m benchmarks.bench_discrete --out DIR [--quick] [--no-peers]`` writes
``discrete_toy`` and ``discrete_per_call`` (CSV, PNG, JSON) to ``DIR``.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Bernoulli, Categorical, Distribution

import gradkit as gk
from benchmarks import peers as peer_lib
from benchmarks.common import RESULTS, main_for, summarise, verdict, write_results

__all__ = [
    "PAIRS",
    "PER_CALL_COLUMNS",
    "THETA",
    "TOY_COLUMNS",
    "T_VALUES",
    "Pair",
    "exact_gradient",
    "plot_per_call",
    "plot_toy",
    "run",
    "storch_worker",
    "toy_cost",
    "toy_per_call",
    "toy_rows",
]

# The cost's centre t (Tucker et al. 2017 use 0.45; 0.499 and 0.501 make the signal tiny).
T_VALUES = (0.45, 0.499, 0.501)
# The Bernoulli's probability at which the gradient is estimated.
THETA = 0.3
PEER = "storchastic"


@dataclass(frozen=True)
class Pair:
    r"""One estimator in both libraries.

    Attributes:
        estimator: the row's label, gradkit's name for the estimator.
        gradkit: the name in ``gk.ESTIMATORS``, or ``None`` for a Storchastic-only row.
        storchastic: Storchastic's method as a call, ``{n}`` standing for its sample count
            (a key of :data:`STORCH_METHODS`), or ``None`` where it has no counterpart.
        draws: how ``samples`` becomes each library's count: ``"samples"`` (the same number),
            ``"pairs"`` (antithetic pairs: gradkit counts ``2 * samples`` draws, Storchastic
            ``samples`` pairs), ``"set"`` (2 draws without replacement: both outcomes of the
            bit) or ``"exact"`` (enumeration; the count is ignored).
        baseline: ``"leave_one_out"`` for gradkit's ``gk.baselines.LeaveOneOut``.
        biased: biased by design (a relaxation or straight-through), in both libraries.
        categorical: gradkit gets the bit as ``Categorical(probs=[1 - theta, theta])`` (for an
            estimator defined for categorical variables only); the gradient with respect to
            :math:`\theta` is then the ``probs`` gradient contracted with
            :math:`\partial p / \partial \theta = (-1, 1)`.
        note: what the row's reader should know.
    """

    estimator: str
    gradkit: str | None
    storchastic: str | None
    draws: str = "samples"
    baseline: str | None = None
    biased: bool = False
    categorical: bool = False
    note: str = ""

    def counts(self, samples: int) -> tuple[int, int]:
        """``(gradkit's num_samples, Storchastic's n)`` for ``samples`` samples per estimate.

        Example:
            >>> Pair("arm", "arm", "ARM", draws="pairs").counts(4)
            (8, 4)
        """
        if self.draws == "pairs":
            return 2 * samples, samples
        if self.draws == "set":
            return 2, 2
        if self.draws == "exact":
            return 1, 1
        return samples, samples


_WOR = (
    "Storchastic's importance-weighted score function without replacement (Kool et al. 2020), "
    "compared with gradkit's unordered_set; k = 2 draws both outcomes, so it should be exact"
)
# The estimators compared, gradkit's name first; Storchastic's as the call made (n: its count).
PAIRS: tuple[Pair, ...] = (
    Pair("score_function", "score_function", "ScoreFunction('z', n_samples={n})"),
    Pair(
        "score_function+leave_one_out",
        "score_function",
        "ScoreFunction('z', n_samples={n}, baseline_factory='batch_average')",
        baseline="leave_one_out",
        note="Storchastic's batch_average is the leave-one-out baseline",
    ),
    Pair(
        "arm",
        "arm",
        "ARM('z', n_samples={n})",
        draws="pairs",
        note="samples = antithetic pairs (two cost evaluations each)",
    ),
    Pair(
        "disarm",
        "disarm",
        "DisARM('z', n_samples={n})",
        draws="pairs",
        note="samples = antithetic pairs; Storchastic's DisARM samples bool tensors, so the cost "
        "casts them to float (subtracting t from them raises a RuntimeError)",
    ),
    Pair(
        "rebar", "rebar", "REBAR('z', n_samples={n})", note="control-variate parameters untrained"
    ),
    Pair(
        "relax",
        "relax",
        "RELAX('z', n_samples={n}, in_dim=1)",
        note="control-variate parameters untrained (Storchastic's network seeded)",
    ),
    Pair(
        "unordered_set",
        "unordered_set",
        "UnorderedSetEstimator('z', k={n})",
        draws="set",
        categorical=True,
        note="k = 2 without replacement: both outcomes, so the estimate is exact; gradkit's "
        "estimator is for categorical variables, so it gets the bit as a Categorical over "
        "{0, 1}",
    ),
    Pair("unordered_set", None, "ScoreFunctionWOR('z', k={n})", draws="set", note=_WOR),
    Pair(
        "unordered_set",
        None,
        "ScoreFunctionWOR('z', k={n}, biased=False)",
        draws="set",
        note=_WOR + " (its unbiased variant)",
    ),
    Pair(
        "rao_blackwell",
        "rao_blackwell",
        "RaoBlackwellSF('z', n_samples={n})",
        draws="set",
        note="Storchastic sums over 2 categories: both outcomes, exact",
    ),
    Pair(
        "indecater",
        "indecater",
        None,
        categorical=True,
        note="sums both outcomes of the one variable, so it is exact; Storchastic has no "
        "IndeCateR estimator",
    ),
    Pair("enumerate", "enumerate", "Expect('z')", draws="exact", note="exact: zero variance"),
    Pair(
        "straight_through",
        "straight_through",
        None,
        biased=True,
        note="Storchastic has no plain straight-through estimator",
    ),
    Pair(
        "straight_through_gumbel",
        "straight_through_gumbel",
        "GumbelSoftmax('z', n_samples={n}, straight_through=True)",
        biased=True,
        note="temperature 1",
    ),
    Pair(
        "gumbel_softmax",
        "gumbel_softmax",
        "GumbelSoftmax('z', n_samples={n})",
        biased=True,
        note="temperature 1; the cost is evaluated at the relaxed sample",
    ),
    Pair(
        "gumbel_rao",
        "gumbel_rao",
        None,
        biased=True,
        note="Storchastic has no Gumbel-Rao estimator",
    ),
)
TOY_COLUMNS = [
    "t",
    "theta",
    "library",
    "estimator",
    "method",
    "estimates",
    "samples",
    "mean",
    "exact",
    "std_error",
    "z",
    "variance",
    "variance_vs_gradkit",
    "ms_per_estimate",
    "verdict",
    "note",
]
PER_CALL_COLUMNS = [
    "estimator",
    "mode",
    "estimates_per_call",
    "samples",
    "gradkit_ms",
    "gradkit_per_sample_ms",
    "storchastic_ms",
    "storchastic_vs_gradkit",
    "target_10x_met",
    "gradkit_method",
    "storchastic_method",
    "note",
]


def exact_gradient(t: float) -> float:
    r""":math:`\partial_\theta \mathbb{E}_{b \sim \mathrm{Bern}(\theta)}[(b - t)^2] = 1 - 2t`.

    Example:
        >>> round(exact_gradient(0.45), 12), exact_gradient(0.5), round(exact_gradient(0.501), 12)
        (0.1, 0.0, -0.002)
    """
    return 1.0 - 2.0 * t


def toy_cost(t: float) -> Callable[[Tensor], Tensor]:
    """The cost :math:`(b - t)^2`, one value per sample; a bool sample is cast to float first.

    Example:
        >>> toy_cost(0.45)(torch.tensor([0.0, 1.0]))
        tensor([0.2025, 0.3025])
    """

    def cost(b: Tensor) -> Tensor:
        if b.dtype == torch.bool:  # Storchastic's DisARM samples bools
            b = b.float()
        return (b - t) ** 2

    return cost


def _message(err: BaseException) -> str:
    """``"Type: first non-empty line of the message"``, at most 200 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__)[:200]


def _gradkit_method(pair: Pair, n: int, *, plate: bool) -> str:
    baseline = ", baseline=gk.baselines.LeaveOneOut()" if pair.baseline else ""
    dist = "Categorical(probs=[1 - θ, θ])" if pair.categorical else "Bernoulli(probs=θ)"
    return f"gk.ESTIMATORS[{pair.gradkit!r}](f, {dist}, {n}{baseline}, plate={plate})"


def _gradkit_dist(pair: Pair, theta: Tensor) -> Distribution:
    """The bit with probability ``theta``: a Bernoulli, or a Categorical over {0, 1}."""
    if pair.categorical:
        return Categorical(probs=torch.stack([1.0 - theta, theta], -1))
    return Bernoulli(probs=theta)


def _gradkit_theta(pair: Pair, grads: dict[str, Tensor]) -> Tensor:
    """The rows' gradient with respect to ``theta`` (``probs``, contracted for a Categorical)."""
    rows = grads["probs"]
    return rows[..., 1] - rows[..., 0] if pair.categorical else rows


def _gradkit_missing(pair: Pair) -> str | None:
    if pair.gradkit is None or pair.gradkit in gk.ESTIMATORS:
        return None
    return f"{pair.gradkit!r} is not in gk.ESTIMATORS (not in this version of gradkit)"


def _gradkit_options(pair: Pair) -> dict[str, Any]:
    return {"baseline": gk.baselines.LeaveOneOut()} if pair.baseline == "leave_one_out" else {}


# ---------------------------------------------------------------------------------------------
# Storchastic, in its worker process


def _storch_method(call: str, n: int) -> Any:
    """Storchastic's method for ``call`` (a key of :data:`STORCH_METHODS`) with count ``n``."""
    import storch

    m = storch.method
    makers: dict[str, Callable[[], Any]] = {
        "ScoreFunction('z', n_samples={n})": lambda: m.ScoreFunction("z", n_samples=n),
        "ScoreFunction('z', n_samples={n}, baseline_factory='batch_average')": lambda: (
            m.ScoreFunction("z", n_samples=n, baseline_factory="batch_average")
        ),
        "ARM('z', n_samples={n})": lambda: m.ARM("z", n_samples=n),
        "DisARM('z', n_samples={n})": lambda: m.DisARM("z", n_samples=n),
        "REBAR('z', n_samples={n})": lambda: m.REBAR("z", n_samples=n),
        "RELAX('z', n_samples={n}, in_dim=1)": lambda: m.RELAX("z", n_samples=n, in_dim=1),
        "UnorderedSetEstimator('z', k={n})": lambda: m.UnorderedSetEstimator("z", k=n),
        "ScoreFunctionWOR('z', k={n})": lambda: m.ScoreFunctionWOR("z", k=n),
        "ScoreFunctionWOR('z', k={n}, biased=False)": lambda: m.ScoreFunctionWOR(
            "z", k=n, biased=False
        ),
        "RaoBlackwellSF('z', n_samples={n})": lambda: m.RaoBlackwellSF("z", n_samples=n),
        "Expect('z')": lambda: m.Expect("z"),
        "GumbelSoftmax('z', n_samples={n}, straight_through=True)": lambda: m.GumbelSoftmax(
            "z", n_samples=n, straight_through=True
        ),
        "GumbelSoftmax('z', n_samples={n})": lambda: m.GumbelSoftmax("z", n_samples=n),
    }
    if call not in makers:
        raise NotImplementedError(f"no Storchastic method {call!r} here; known: {sorted(makers)}")
    return makers[call]()


# The Storchastic calls this benchmark knows how to make.
STORCH_METHODS = tuple(p.storchastic for p in PAIRS if p.storchastic)


def storch_job(
    call: str, n: int, t: float, theta: float, mode: str, count: int, repeats: int, seed: int
) -> dict[str, Any]:
    """Storchastic's estimates of the toy gradient; meant to run in a Storchastic worker.

    Args:
        call: a key of :data:`STORCH_METHODS`.
        n: Storchastic's sample count.
        t, theta: the cost's centre and the Bernoulli's probability.
        mode: ``"batched"`` (one call with ``count`` independent copies, marked independent
            with ``storch.denote_independent``; median of ``repeats`` timed calls after a
            warm-up) or ``"per_call"`` (``count`` calls of one estimate each; the fastest of
            ``repeats`` timed loops after 3 warm-up calls).
        count: the number of independent estimates.
        repeats: timed repeats.
        seed: the torch seed, set before the method is built (RELAX's network is random).

    Returns:
        ``{"estimates": (count,) tensor, "seconds": s, "error": None}`` (``seconds`` for one
        batched call, or for the whole per-call loop), or ``{"estimates": None, "seconds": nan,
        "error": "Type: message"}`` when Storchastic raises.
    """
    import storch

    torch.manual_seed(seed)
    cost = toy_cost(t)

    def one(copies: int | None, method: Any) -> Tensor:
        if copies:
            leaf = torch.full((copies, 1), theta, requires_grad=True)
            probs: Any = storch.denote_independent(leaf, 0, "copies")
        else:
            leaf = torch.full((1,), theta, requires_grad=True)
            probs = leaf
        z = method(Bernoulli(probs=probs))
        storch.add_cost(cost(z), "cost")
        storch.backward()
        if leaf.grad is None:
            raise RuntimeError("storch.backward() left no gradient on the Bernoulli's probs")
        # Storchastic averages the cost over the plate of copies: scale back to one per copy
        return leaf.grad.detach().reshape(-1) * (copies or 1)

    try:
        method = _storch_method(call, n)
        if mode == "batched":
            one(count, method)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                estimates = one(count, method)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
        else:
            for _ in range(3):
                one(None, method)
            seconds = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                rows = [one(None, method) for _ in range(count)]
                seconds = min(seconds, time.perf_counter() - start)
            estimates = torch.cat(rows)
    except Exception as err:  # a library's failure is a result to report
        with contextlib.suppress(Exception):
            storch.reset()
        return {"estimates": None, "seconds": math.nan, "error": _message(err)}
    return {"estimates": estimates.clone(), "seconds": seconds, "error": None}


@contextlib.contextmanager
def storch_worker(
    peers: Sequence[str] | None = None, worker: Any = None
) -> Iterator[tuple[Any, str | None]]:
    """``(worker, reason)``: a Storchastic worker to use, or ``None`` and why there is none.

    ``worker``, when given, is used as it is (anything with ``call(fn, *args)``); otherwise a
    :class:`~benchmarks.peers.PeerWorker` is started for the block when ``peers`` (``None``:
    every installed peer) asks for Storchastic and it is installed.

    Example:
        >>> with storch_worker(peers=()) as (worker, reason):
        ...     worker, reason
        (None, 'Storchastic was not asked for')
    """
    if worker is not None:
        yield worker, None
        return
    if peers is not None and PEER not in peers:
        yield None, "Storchastic was not asked for"
        return
    reason = peer_lib.missing(PEER)
    if reason:
        yield None, reason
        return
    with peer_lib.PeerWorker(PEER) as started:
        yield started, None


def _call(worker: Any, *args: Any) -> dict[str, Any]:
    """:func:`storch_job` in ``worker``; a worker that fails is reported like the library."""
    try:
        return worker.call(storch_job, *args)
    except Exception as err:
        return {"estimates": None, "seconds": math.nan, "error": _message(err)}


# ---------------------------------------------------------------------------------------------
# The toy rows


def _stats_row(
    base: dict[str, Any], estimates: Tensor | None, exact: float, error: str | None, biased: bool
) -> dict[str, Any]:
    nan = math.nan
    if estimates is None or error:
        return {
            **base,
            "mean": nan,
            "exact": exact,
            "std_error": nan,
            "z": nan,
            "variance": nan,
            "ms_per_estimate": nan,
            "verdict": f"fails: {error}" if error else "not available",
        }
    stats = summarise(estimates, torch.tensor(exact))
    n = estimates.shape[0]
    z = math.copysign(stats["max_abs_z"], stats["mean"] - exact)
    said = verdict(stats["max_abs_z"], mean=stats["mean"], exact=exact)
    if biased and said.startswith("WRONG MEAN"):
        said = "biased by design" + said.removeprefix("WRONG MEAN")
    return {
        **base,
        "mean": stats["mean"],
        "exact": exact,
        "std_error": math.sqrt(stats["variance"] / n),
        "z": z,
        "variance": stats["variance"],
        "verdict": said,
    }


def _gradkit_toy(pair: Pair, n: int, t: float, theta: float, copies: int, seed: int):
    """gradkit's ``copies`` estimates in one batched call, and its time (after a warm-up)."""
    fn = gk.ESTIMATORS[pair.gradkit]
    cost = toy_cost(t)

    def call() -> Tensor:
        dist = _gradkit_dist(pair, torch.full((copies,), theta))
        rows = _gradkit_theta(pair, fn(cost, dist, n, plate=True, **_gradkit_options(pair)))
        return rows.mean(0).detach()

    try:
        torch.manual_seed(seed)
        call()
        torch.manual_seed(seed)
        start = time.perf_counter()
        estimates = call()
        return estimates, time.perf_counter() - start, None
    except Exception as err:  # a failing gradkit estimator is a row too (and a bug to fix)
        return None, math.nan, _message(err)


def toy_rows(
    ts: Sequence[float] = T_VALUES,
    *,
    theta: float = THETA,
    copies: int = 2000,
    samples: int = 4,
    estimators: Sequence[Pair] = PAIRS,
    peers: Sequence[str] | None = None,
    worker: Any = None,
    seed: int = 0,
) -> Any:
    r"""One row per (t, library, estimator, method): mean, z-score, variance, time per estimate.

    Every row is ``copies`` independent estimates of :math:`\partial_\theta \mathbb{E}[(b-t)^2]`
    (``probs``; exact: :func:`exact_gradient`), each of ``samples`` samples (see
    :meth:`Pair.counts`), drawn in one batched call: gradkit with ``plate=True`` over
    ``copies`` independent Bernoullis, Storchastic with the copies marked independent.

    Args:
        ts: the cost's centres.
        theta: the Bernoulli's probability.
        copies: independent estimates per row (>= 2).
        samples: samples per estimate (>= 2, for leave-one-out).
        estimators: the pairs to run (:data:`PAIRS`).
        peers: ``None`` (Storchastic if installed), or the peers to run (``()``: none).
        worker: a started Storchastic worker to use (see :func:`storch_worker`).
        seed: torch seed for every row.

    Returns:
        a DataFrame with :data:`TOY_COLUMNS`; ``table.attrs["skipped"]`` says why Storchastic
        did not run, when it did not.

    Raises:
        ValueError: for ``copies < 2`` or ``samples < 2``.

    Example:
        >>> t = toy_rows([0.45], copies=50, estimators=PAIRS[:2], peers=())
        >>> t[["library", "estimator", "verdict"]].values.tolist()
        [['gradkit', 'score_function', 'ok'], ['gradkit', 'score_function+leave_one_out', 'ok']]
        >>> t.attrs["skipped"]
        {'storchastic': 'Storchastic was not asked for'}
    """
    import pandas as pd

    if copies < 2 or samples < 2:
        raise ValueError(
            f"need copies >= 2 (to measure a variance) and samples >= 2 (leave-one-out), "
            f"got copies={copies}, samples={samples}"
        )
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with storch_worker(peers, worker) as (storch, reason):
        if reason:
            skipped[PEER] = reason
        for t in ts:
            exact = exact_gradient(t)
            for pair in estimators:
                gk_n, st_n = pair.counts(samples)
                common = {"t": t, "theta": theta, "estimator": pair.estimator, "estimates": copies}
                if pair.gradkit is not None:
                    missing = _gradkit_missing(pair)
                    base = {
                        **common,
                        "library": "gradkit",
                        "method": _gradkit_method(pair, gk_n, plate=True),
                        "samples": gk_n,
                        "note": missing or pair.note,
                    }
                    if missing:
                        rows.append(_stats_row(base, None, exact, None, pair.biased))
                    else:
                        est, seconds, error = _gradkit_toy(pair, gk_n, t, theta, copies, seed)
                        row = _stats_row(base, est, exact, error, pair.biased)
                        rows.append({**row, "ms_per_estimate": 1e3 * seconds / copies})
                if pair.storchastic is not None and storch is not None:
                    call = pair.storchastic
                    result = _call(storch, call, st_n, t, theta, "batched", copies, 1, seed)
                    base = {
                        **common,
                        "library": PEER,
                        "method": "storch.method." + call.format(n=st_n),
                        "samples": st_n,
                        "note": result["error"] or pair.note,
                    }
                    row = _stats_row(base, result["estimates"], exact, result["error"], pair.biased)
                    rows.append({**row, "ms_per_estimate": 1e3 * result["seconds"] / copies})
    table = pd.DataFrame(rows)
    table = _variance_ratios(table).reindex(columns=TOY_COLUMNS)
    table.attrs["skipped"] = skipped
    return table


def _variance_ratios(table: Any) -> Any:
    """Each row's variance over gradkit's for the same t and estimator."""
    if table.empty:
        return table.assign(variance_vs_gradkit=[])
    ours = table[table.library == "gradkit"].set_index(["t", "estimator"]).variance
    ratios = []
    for row in table.itertuples():
        mine = ours.get((row.t, row.estimator), math.nan)
        ok = math.isfinite(mine) and mine > 0 and math.isfinite(row.variance)
        ratios.append(row.variance / mine if ok else math.nan)
    return table.assign(variance_vs_gradkit=ratios)


# ---------------------------------------------------------------------------------------------
# Time per call


def _gradkit_timers(pair: Pair, n: int, t: float, theta: float, batch: int):
    """``{mode: (expectation + backward, per-sample interface)}`` step functions."""
    fn = gk.ESTIMATORS[pair.gradkit]
    cost = toy_cost(t)
    options = _gradkit_options(pair)
    single = torch.tensor(theta, requires_grad=True)
    batched = torch.full((batch,), theta, requires_grad=True)

    def expectation(leaf: Tensor, plate: bool) -> Callable[[], None]:
        def step() -> None:
            leaf.grad = None
            value = gk.expectation(
                cost, _gradkit_dist(pair, leaf), n, estimator=pair.gradkit, plate=plate, **options
            )
            value.sum().backward()

        return step

    def rows(values: Tensor, plate: bool) -> Callable[[], None]:
        def step() -> None:
            _gradkit_theta(pair, fn(cost, _gradkit_dist(pair, values), n, plate=plate, **options))

        return step

    return {
        "per_call": (expectation(single, False), rows(single.detach(), False)),
        "batched": (expectation(batched, True), rows(batched.detach(), True)),
    }


def _time_loop(step: Callable[[], None], calls: int, repeats: int) -> float:
    """Seconds per call: the fastest of ``repeats`` loops of ``calls`` calls, after a warm-up."""
    for _ in range(3):
        step()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        best = min(best, time.perf_counter() - start)
    return best / calls


def _time_median(step: Callable[[], None], repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def toy_per_call(
    *,
    t: float = 0.45,
    theta: float = THETA,
    calls: int = 1000,
    batch: int = 1000,
    samples: int = 4,
    repeats: int = 3,
    estimators: Sequence[Pair] = PAIRS,
    peers: Sequence[str] | None = None,
    worker: Any = None,
    seed: int = 0,
) -> Any:
    """Milliseconds per call of gradkit and Storchastic, one estimate per call and batched.

    Per call: ``calls`` calls in a row of one estimate each (the fastest of ``repeats`` loops,
    after a warm-up). Batched: one call with ``batch`` independent Bernoullis (the median of
    ``repeats``). gradkit is timed through ``gk.expectation(...)`` and ``backward()``
    (``gradkit_ms``: Storchastic, too, differentiates a surrogate with autograd) and through
    its per-sample interface (``gradkit_per_sample_ms``); ``storchastic_vs_gradkit`` is
    Storchastic's time over ``gradkit_ms``, and ``target_10x_met`` whether it is at least 10.
    Storchastic-only pairs (``gradkit=None``) are left out.

    Example:
        >>> t = toy_per_call(calls=3, batch=10, repeats=1, estimators=PAIRS[:1], peers=())
        >>> t[["estimator", "mode"]].values.tolist()
        [['score_function', 'per_call'], ['score_function', 'batched']]
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    counts = {"per_call": calls, "batched": batch}
    with storch_worker(peers, worker) as (storch, reason):
        if reason:
            skipped[PEER] = reason
        for pair in estimators:
            if pair.gradkit is None:
                continue
            gk_n, st_n = pair.counts(samples)
            missing = _gradkit_missing(pair)
            timers: dict[str, Any] = {}
            error = missing
            if not missing:
                try:
                    timers = _gradkit_timers(pair, gk_n, t, theta, batch)
                except Exception as err:
                    error = _message(err)
            for mode in ("per_call", "batched"):
                note = [pair.note] if pair.note else []
                ours, rows_ms = math.nan, math.nan
                if mode in timers:
                    torch.manual_seed(seed)
                    try:
                        expectation, per_sample = timers[mode]
                        if mode == "per_call":
                            ours = 1e3 * _time_loop(expectation, calls, repeats)
                            rows_ms = 1e3 * _time_loop(per_sample, calls, repeats)
                        else:
                            ours = 1e3 * _time_median(expectation, repeats)
                            rows_ms = 1e3 * _time_median(per_sample, repeats)
                    except Exception as err:
                        note.append(f"gradkit fails: {_message(err)}")
                elif error:
                    note.append(f"gradkit: {error}")
                theirs, storch_method = math.nan, ""
                if pair.storchastic is not None and storch is not None:
                    storch_method = "storch.method." + pair.storchastic.format(n=st_n)
                    result = _call(
                        storch, pair.storchastic, st_n, t, theta, mode, counts[mode], repeats, seed
                    )
                    if result["error"]:
                        note.append(f"Storchastic fails: {result['error']}")
                    else:
                        per = counts[mode] if mode == "per_call" else 1
                        theirs = 1e3 * result["seconds"] / per
                ratio = theirs / ours if math.isfinite(ours) and math.isfinite(theirs) else math.nan
                rows.append(
                    {
                        "estimator": pair.estimator,
                        "mode": mode,
                        "estimates_per_call": 1 if mode == "per_call" else batch,
                        "samples": gk_n,
                        "gradkit_ms": ours,
                        "gradkit_per_sample_ms": rows_ms,
                        "storchastic_ms": theirs,
                        "storchastic_vs_gradkit": ratio,
                        "target_10x_met": bool(ratio >= 10) if math.isfinite(ratio) else None,
                        "gradkit_method": _gradkit_method(pair, gk_n, plate=mode == "batched")
                        if pair.gradkit
                        else "",
                        "storchastic_method": storch_method,
                        "note": "; ".join(note),
                    }
                )
    table = pd.DataFrame(rows, columns=PER_CALL_COLUMNS)
    table.attrs["skipped"] = skipped
    return table


# ---------------------------------------------------------------------------------------------
# Figures and the command line

_COLOURS = {"gradkit": "tab:blue", PEER: "tab:green"}


def _label(row: Any) -> str:
    """A figure's label for a row: the estimator, and gradkit or Storchastic's method."""
    if row.library == "gradkit":
        return f"{row.estimator} · gradkit"
    method = str(row.method).removeprefix("storch.method.").replace("'z', ", "")
    return f"{row.estimator} · {method.replace('n_samples=', 'n=')}"


def plot_toy(table: Any) -> Any:
    """For each t: every row's mean with two standard errors, against the exact gradient.

    Wrong means are red crosses, means biased by design grey; failures are left out.

    Example:
        >>> fig = plot_toy(toy_rows([0.45], copies=20, estimators=PAIRS[:2], peers=()))
        >>> len(fig.axes)
        1
    """
    import matplotlib.pyplot as plt

    done = table[table["mean"].notna()]
    ts = sorted(done.t.unique()) or [math.nan]
    labels = list(dict.fromkeys(_label(r) for r in done.itertuples()))
    height = max(2.5, 0.28 * len(labels) + 1.2)
    fig, axes = plt.subplots(1, len(ts), figsize=(4.2 * len(ts) + 1.5, height), sharey=True)
    axes = [axes] if len(ts) == 1 else list(axes)
    y_of = {label: i for i, label in enumerate(labels)}
    for ax, t in zip(axes, ts, strict=True):
        part = done[done.t == t]
        for row in part.itertuples():
            y = y_of[_label(row)]
            if row.verdict == "ok":
                colour, marker = _COLOURS.get(row.library, "black"), "o"
            elif str(row.verdict).startswith("biased by design"):
                colour, marker = "grey", "s"
            else:
                colour, marker = "red", "x"
            ax.errorbar(
                row.mean, y, xerr=2 * row.std_error, fmt=marker, color=colour, ms=5, capsize=2
            )
        if math.isfinite(t):
            ax.axvline(exact_gradient(t), color="black", lw=0.8, ls="--")
            ax.set_title(f"t = {t}: exact 1 - 2t = {exact_gradient(t):.3g}", fontsize=9)
        ax.set_xlabel("mean estimate ± 2 s.e.")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(
        "REBAR toy: b ~ Bern(θ), cost (b - t)², gradient w.r.t. θ "
        "(blue gradkit, green Storchastic, red wrong, grey biased by design)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_per_call(table: Any) -> Any:
    """Milliseconds per call of each library, one estimate per call and batched, log axes;
    each Storchastic bar is labelled with its time over gradkit's.

    Example:
        >>> fig = plot_per_call(toy_per_call(calls=2, batch=4, repeats=1,
        ...                                  estimators=PAIRS[:1], peers=()))
        >>> len(fig.axes)
        2
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import LogLocator, NullFormatter

    names = list(dict.fromkeys(table.estimator)) or [""]
    height = max(2.5, 0.32 * len(names) + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    y = np.arange(len(names))
    for ax, mode in zip(axes, ("per_call", "batched"), strict=True):
        part = table[table["mode"] == mode].set_index("estimator").reindex(names)
        for offset, column, label in (
            (-0.2, "gradkit_ms", "gradkit (gk.expectation + backward)"),
            (0.2, "storchastic_ms", "Storchastic (storch.backward)"),
        ):
            values = part[column].to_numpy(float) if len(part) else np.full(len(names), np.nan)
            done = np.isfinite(values)
            colour = _COLOURS["gradkit" if column == "gradkit_ms" else PEER]
            ax.barh(y[done] + offset, values[done], 0.4, color=colour, label=label)
            if column == "storchastic_ms" and len(part):
                ratios = part["storchastic_vs_gradkit"].to_numpy(float)
                for i in np.flatnonzero(done & np.isfinite(ratios)):
                    ax.annotate(
                        f"{ratios[i]:.1f}x",
                        (values[i], y[i] + offset),
                        xytext=(3, 0),
                        textcoords="offset points",
                        va="center",
                        fontsize=7,
                    )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(numticks=12))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.15)
        size = "one estimate per call" if mode == "per_call" else "one call, batched"
        ax.set_xlabel(f"ms per call ({size}), log scale")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


QUICK = {
    "toy": {"ts": T_VALUES, "copies": 20, "samples": 4},
    "per_call": {"calls": 5, "batch": 20, "repeats": 1, "samples": 4},
}
FULL = {
    "toy": {"ts": T_VALUES, "copies": 2000, "samples": 4},
    "per_call": {"calls": 1000, "batch": 1000, "repeats": 3, "samples": 4},
}


def run(out: Path = RESULTS, *, quick: bool = False, peers: Sequence[str] | None = None) -> None:
    """Run both measurements; write ``discrete_toy`` and ``discrete_per_call`` under ``out``."""
    import matplotlib.pyplot as plt

    sizes = QUICK if quick else FULL
    with storch_worker(peers) as (worker, reason):
        skipped = {PEER: reason} if reason else {}
        toy = toy_rows(**sizes["toy"], peers=peers, worker=worker)
        per_call = toy_per_call(**sizes["per_call"], peers=peers, worker=worker)
    for what, why in skipped.items():
        print(f"[bench_discrete] skipped {what}: {why}", flush=True)
    meta = {"quick": quick, "theta": THETA, "parameter": "probs", "skipped": skipped}
    fig = plot_toy(toy)
    write_results(Path(out), "discrete_toy", toy, fig=fig, meta={**meta, "sizes": sizes["toy"]})
    plt.close(fig)
    fig = plot_per_call(per_call)
    write_results(
        Path(out),
        "discrete_per_call",
        per_call,
        fig=fig,
        meta={**meta, "t": 0.45, "sizes": sizes["per_call"]},
    )
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main_for(run, __doc__.splitlines()[0]))
