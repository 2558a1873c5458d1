r"""The models' one training loop, and the one record format every run returns.

Every model in ``gradkit.models`` trains through :func:`fit`: it takes one optimisation
step at a time, times each step (waiting for the device on CUDA, so that a step's time is its
work and not its launch), and at step 0, every ``eval_every`` steps and after the last step
asks the model for its measurements. What comes back is a :class:`History`: a sequence of
records, one dict of floats per measurement, each with the same keys:

* ``step``: optimisation steps taken (0 is before training);
* the model's measurements (an ELBO, an accuracy, a gradient variance, ...);
* ``seconds``: wall time spent in optimisation steps so far, measurements excluded;
* ``median_step_seconds``: the median time of the steps since the previous record (NaN at
  step 0). Unlike a total, a median is not moved by a burst of load from other processes on a
  shared machine, so it is the per-step cost to quote.

The model's own ``train`` function builds the step and the measurement and calls :func:`fit`;
a user's model can do the same.

Example:
    >>> import torch
    >>> from gradkit.models.training import fit
    >>> w = torch.zeros((), requires_grad=True)
    >>> opt = torch.optim.SGD([w], lr=0.1)
    >>> def step(i):
    ...     opt.zero_grad()
    ...     ((w - 1) ** 2).backward()
    ...     opt.step()
    >>> history = fit(step, lambda i: {"w": w.item()}, steps=20, eval_every=10, progress=False)
    >>> history.steps, [round(v, 3) for v in history.column("w")]
    ([0, 10, 20], [0.0, 0.893, 0.988])
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch

from gradkit import _checks

__all__ = ["RESERVED", "History", "fit"]

#: The keys :func:`fit` writes itself; a model's measurements may not use them.
RESERVED = ("step", "seconds", "median_step_seconds")


@dataclass
class History(Sequence[dict[str, float]]):
    """The records of one training run (see the module's docstring for their keys).

    A sequence of dicts: ``history[-1]["test_elbo"]`` is the last measurement,
    ``pandas.DataFrame(history.records)`` a table, :meth:`column` one measurement over the run.

    Attributes:
        records: one dict of floats per measurement, in order, all with the same keys.
        step_seconds: wall time of every optimisation step, in order.
        label: what was trained (the progress bar's label).
        model: the trained model, where the training function made it.
    """

    records: list[dict[str, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    label: str = ""
    model: Any = None

    @overload
    def __getitem__(self, index: int) -> dict[str, float]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, float]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, float] | list[dict[str, float]]:
        if isinstance(index, str):
            raise TypeError(
                f"a History is indexed by record number; for the measurement {index!r} over the "
                f"run use history.column({index!r})"
            )
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, float]]:
        return iter(self.records)

    @property
    def keys(self) -> list[str]:
        """The records' keys, in order (empty before the first record)."""
        return list(self.records[0]) if self.records else []

    def column(self, key: str) -> list[float]:
        """One measurement over the run, one value per record.

        Raises:
            KeyError: for a key the records do not have (the message lists those they have).

        Example:
            >>> History([{"step": 0, "elbo": -3.0}, {"step": 5, "elbo": -2.0}]).column("elbo")
            [-3.0, -2.0]
        """
        if self.records and key not in self.records[0]:
            raise KeyError(f"the records have no {key!r}; they have {self.keys}")
        return [record[key] for record in self.records]

    @property
    def steps(self) -> list[int]:
        """The steps at which the records were taken."""
        return [int(record["step"]) for record in self.records]

    @property
    def median_step_seconds(self) -> float:
        """The median wall time of all the run's steps (NaN without steps)."""
        return statistics.median(self.step_seconds) if self.step_seconds else math.nan


def _number(value: object) -> float:
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # a count (an epoch, a number of evaluations) stays a whole number
    return float(value)  # type: ignore[arg-type]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: time the work, not its launch
        torch.cuda.synchronize(device)


def fit(
    step: Callable[[int], object],
    evaluate: Callable[[int], Mapping[str, float]],
    *,
    steps: int,
    eval_every: int,
    device: torch.device | str | None = None,
    label: str = "",
    model: Any = None,
    show: str | None = None,
    progress: bool = True,
) -> History:
    r"""Run ``step(i)`` for ``i = 1, ..., steps`` and record ``evaluate(i)`` along the way.

    ``evaluate`` is called at step 0, every ``eval_every`` steps and after the last step; its
    dict of measurements (floats, 0-dim tensors stored as floats, ints kept as ints) becomes a
    record, with the keys in :data:`RESERVED` added. Measurements are not timed; ``step``'s
    return value is ignored. A ``tqdm.auto`` progress bar counts the steps, with the latest
    value of ``show``.

    Args:
        step: takes optimisation step number ``i`` (from 1).
        evaluate: measures the model after ``i`` steps; the same keys every time.
        steps: number of steps (0: only the record at step 0).
        eval_every: steps between records.
        device: the device the steps run on (on CUDA each step is synchronised before its time
            is read); default the CPU.
        label: the run's name, shown on the progress bar and kept in the history.
        model: kept in the history as ``history.model``.
        show: a measurement to show on the progress bar.
        progress: show the progress bar.

    Returns:
        a :class:`History`.

    Raises:
        ValueError: for a negative or non-int ``steps``, a non-positive ``eval_every``, or
            measurements that use a reserved key, change their keys between records, or lack
            ``show``.
    """
    from tqdm.auto import tqdm

    _checks.check_count("steps", steps, minimum=0)
    _checks.check_count("eval_every", eval_every)
    device = torch.device("cpu" if device is None else device)
    history = History(label=label, model=model)
    seconds, since = 0.0, 0

    def record(i: int) -> None:
        measured = dict(evaluate(i))
        clash = [key for key in RESERVED if key in measured]
        if clash:
            raise ValueError(
                f"the measurements use the reserved key(s) {clash}; fit writes {list(RESERVED)} "
                "itself, so rename the measurement"
            )
        if history.records and list(measured) != history.keys[1:-2]:
            raise ValueError(
                f"the measurements at step {i} have the keys {list(measured)}, those before had "
                f"{history.keys[1:-2]}; evaluate must return the same keys, in the same order, "
                "every time"
            )
        if show is not None and show not in measured:
            raise ValueError(f"show={show!r} is not a measurement; choose one of {list(measured)}")
        recent = history.step_seconds[len(history.step_seconds) - since :] if since else []
        history.records.append(
            {
                "step": i,
                **{key: _number(value) for key, value in measured.items()},
                "seconds": seconds,
                "median_step_seconds": statistics.median(recent) if recent else math.nan,
            }
        )

    record(0)
    bar = tqdm(total=steps, desc=label or None, disable=not progress, mininterval=2.0, leave=False)
    try:
        for i in range(1, steps + 1):
            _synchronize(device)
            started = time.perf_counter()
            step(i)
            _synchronize(device)
            history.step_seconds.append(time.perf_counter() - started)
            seconds += history.step_seconds[-1]
            since += 1
            bar.update()
            if i % eval_every == 0 or i == steps:
                record(i)
                since = 0
                if show is not None:
                    bar.set_postfix({show: f"{history.records[-1][show]:.4g}"})
    finally:  # a step or a measurement that raises leaves no bar behind
        bar.close()
    return history
