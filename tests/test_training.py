"""The models' one training loop and its record format (gradkit/models/training.py)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from gradkit.models.training import RESERVED, History, fit


def quadratic():
    """A one-weight problem minimised by SGD: ``w`` after ``i`` steps is ``1 - 0.8**i``."""
    w = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)

    def step(_):
        opt.zero_grad()
        ((w - 1) ** 2).backward()
        opt.step()

    return w, step


def test_records_at_zero_every_eval_every_and_at_the_end():
    w, step = quadratic()
    calls = []

    def evaluate(i):
        calls.append(i)
        return {"w": w.detach().clone(), "count": i}  # a 0-dim tensor and an int

    history = fit(step, evaluate, steps=7, eval_every=3, label="sgd", model="m", progress=False)
    assert calls == history.steps == [0, 3, 6, 7]
    assert history.keys == ["step", "w", "count", *RESERVED[1:]]
    for record in history:
        assert record["w"] == pytest.approx(1 - 0.8 ** record["step"])
        assert isinstance(record["w"], float) and isinstance(record["count"], int)
    assert history.label == "sgd" and history.model == "m" and len(history) == 4


def test_times_are_the_steps_times_and_exclude_the_measurements():
    w, step = quadratic()
    history = fit(step, lambda i: {"w": float(w.detach())}, steps=10, eval_every=4, progress=False)
    times = history.step_seconds
    assert len(times) == 10 and min(times) > 0
    assert [r["seconds"] for r in history] == pytest.approx(
        [0.0, sum(times[:4]), sum(times[:8]), sum(times)]
    )
    assert math.isnan(history[0]["median_step_seconds"])
    medians = [statistics.median(times[a:b]) for a, b in [(0, 4), (4, 8), (8, 10)]]
    assert [r["median_step_seconds"] for r in history[1:]] == medians
    assert history.median_step_seconds == statistics.median(times)


def test_no_steps_gives_the_initial_record_only():
    history = fit(lambda i: None, lambda i: {"loss": 2.0}, steps=0, eval_every=5, progress=False)
    assert history.steps == [0] and history.step_seconds == []
    assert math.isnan(history.median_step_seconds)


def test_history_access():
    history = History([{"step": 0, "elbo": -3.0}, {"step": 5, "elbo": -2.0}], label="run")
    assert history.column("elbo") == [-3.0, -2.0] and history[-1]["elbo"] == -2.0
    assert history[:1] == [{"step": 0, "elbo": -3.0}]
    with pytest.raises(KeyError, match=r"no 'test_elbo'; they have \['step', 'elbo'\]"):
        history.column("test_elbo")
    with pytest.raises(TypeError, match=r"use history.column\('elbo'\)"):
        history["elbo"]
    assert History().keys == [] and History().column("anything") == []


def test_bad_arguments_and_measurements():
    def nothing(i):
        return None

    with pytest.raises(ValueError, match="steps must be an int of at least 0"):
        fit(nothing, lambda i: {}, steps=-1, eval_every=1)
    with pytest.raises(ValueError, match="eval_every must be a positive int"):
        fit(nothing, lambda i: {}, steps=2, eval_every=0)
    with pytest.raises(ValueError, match=r"reserved key\(s\) \['seconds'\]"):
        fit(nothing, lambda i: {"seconds": 1.0}, steps=1, eval_every=1, progress=False)
    with pytest.raises(ValueError, match=r"at step 2 have the keys \['b'\], those before had"):
        fit(nothing, lambda i: {"a" if i < 2 else "b": 0.0}, steps=3, eval_every=1, progress=False)
    with pytest.raises(
        ValueError, match=r"show='elbo' is not a measurement; choose one of \['a'\]"
    ):
        fit(nothing, lambda i: {"a": 0.0}, steps=1, eval_every=1, show="elbo", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_are_timed_to_their_end():
    x = torch.randn(2048, 2048, device="cuda")
    history = fit(lambda i: x @ x, lambda i: {}, steps=3, eval_every=3, device="cuda")
    assert len(history.step_seconds) == 3 and min(history.step_seconds) > 0
