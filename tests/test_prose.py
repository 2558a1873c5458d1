"""The phrases the chapters build from numbers (compendium/prose.py), on every branch."""

from __future__ import annotations

import pytest

from compendium import prose


def test_counts_plurals_and_ordinals():
    assert [prose.count(n) for n in (0, 3, 10, 11, 1234)] == ["zero", "three", "ten", "11", "1,234"]
    assert prose.plural(0, "run") == "0 runs" and prose.plural(1, "run") == "1 run"
    assert prose.plural(3, "child", "children") == "3 children"
    assert [prose.ordinal(r) for r in (1, 2, 8)] == ["", "second ", "eighth "]
    assert [prose.ordinal(r) for r in (9, 11, 12, 13, 21, 22, 23, 101, 111)] == [
        "9th ", "11th ", "12th ", "13th ", "21st ", "22nd ", "23rd ", "101st ", "111th ",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="a rank starts at 1, got 0"):
        prose.ordinal(0)


def test_sides_and_gaps():
    assert prose.side(2.0, 1.0) == "above" and prose.side(1.0, 2.0) == "below"
    assert prose.side(1.0, 1.0) == "below"
    assert prose.gap(-100.0, -96.86, unit="nats") == "3.1 nats below"
    assert prose.gap(-96.86, -100.0, unit="nats") == "3.1 nats above"
    assert prose.gap(1.0004, 1.0, unit="nats", digits=3) == "level with"
    assert prose.gap(1.002, 1.0, unit="nats", digits=3) == "0.002 nats above"
    assert prose.gap(1.0, 2.0, unit="s", below="short of") == "1.0 s short of"


def test_spans_and_p_values():
    assert prose.span(0.5, 0.75, ".0%") == "50% to 75%"
    assert prose.span(0.9471, 0.9474, ".1%") == "94.7%"
    assert prose.span(1.0, 2.0, ".1f") == "1.0 to 2.0"
    assert prose.p_value(0.0123) == "1.2e-02"
    assert prose.p_value(0.0).startswith("0 in double precision")


def test_factors():
    assert prose.factor(3.24, than="X") == "3.2 times dearer than X"
    assert prose.factor(0.25, than="X") == "4.0 times cheaper than X"
    assert prose.factor(0.99, than="X") == "as cheap as X"
    assert (
        prose.factor(2.0, than="X", more="slower", less="faster", same="as fast")
        == "2.0 times slower than X"
    )
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive and finite"):
            prose.factor(bad, than="X")


def test_tallies():
    assert prose.tally(4, 4, "runs") == "all four runs"
    assert prose.tally(0, 4, "runs") == "none of the four runs"
    assert prose.tally(1, 4, "runs") == "one of the four runs"
    assert prose.tally(12, 20, "runs") == "12 of the 20 runs"
    assert (
        prose.tally(1, 1, "run") == "the one run" and prose.tally(0, 1, "run") == "not the one run"
    )
    assert prose.tally(2, 2, "runs") == "both runs"
    assert prose.tally(1, 2, "runs") == "one of the two runs"
    assert prose.tally(0, 2, "runs") == "neither of the two runs"
    for k, n in [(5, 4), (-1, 4), (0, 0)]:
        with pytest.raises(ValueError, match="0 <= k <= n and n >= 1"):
            prose.tally(k, n, "runs")


def test_where():
    both = {1: True, 10: False, 20: True}
    assert (
        prose.where(both, yes="cheaper", no="dearer", name="d", than="X")
        == "cheaper than X at d = 1, 20 and dearer at d = 10"
    )
    assert (
        prose.where({1: False}, yes="cheaper", no="dearer", name="d", than="X")
        == "dearer than X at every d run here (1)"
    )
    assert prose.where({1: True}, yes="ok", no="bad", name="n") == "ok at every n run here (1)"
    with pytest.raises(ValueError, match="no values of d"):
        prose.where({}, yes="a", no="b", name="d")


def test_devices():
    assert prose.device("cuda:1", "NVIDIA H200") == "the GPU NVIDIA H200 (cuda:1)"
    assert prose.device("cuda") == "the GPU cuda"
    assert prose.device("cpu").startswith("the CPU (torch.cuda.is_available()")
