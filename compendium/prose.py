"""Phrases the chapters build from measured numbers, so that a sentence stays true for any run.

A chapter's text quotes its numbers through glue; where the words themselves depend on the
numbers ("above" or "below", "all four" or "two of the four", "cheaper" or "dearer"), the
chapter calls one of these instead of composing the phrase in a cell. Each is tested on every
branch (tests/test_prose.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = [
    "count",
    "device",
    "factor",
    "gap",
    "ordinal",
    "p_value",
    "plural",
    "side",
    "span",
    "tally",
    "up_to",
    "where",
]

_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_ORDINALS = ["", "second ", "third ", "fourth ", "fifth ", "sixth ", "seventh ", "eighth "]


def count(n: int) -> str:
    """``n`` in words up to ten, in digits above (the house style of the chapters).

    Example:
        >>> count(4), count(12)
        ('four', '12')
    """
    return _WORDS[n] if 0 <= n < len(_WORDS) else f"{n:,}"


def device(where: object, name: str | None = None) -> str:
    """What a run ran on, for a sentence: the GPU with its name, or the CPU and why.

    The reason given for the CPU is the chapters' (``compendium.book.pick_device`` takes the
    GPU whenever PyTorch sees one); a run that chose the CPU on purpose should say so itself.

    Example:
        >>> device("cuda:0", "NVIDIA H200"), device("cpu")
        ('the GPU NVIDIA H200 (cuda:0)', 'the CPU (torch.cuda.is_available() returned False)')
    """
    if str(where).startswith("cuda"):
        return f"the GPU {name} ({where})" if name else f"the GPU {where}"
    return "the CPU (torch.cuda.is_available() returned False)"


def plural(n: int, word: str, words: str | None = None) -> str:
    """``"1 epoch"``, ``"4 epochs"``: the count and the noun that agrees with it.

    Example:
        >>> plural(1, "epoch"), plural(10, "epoch"), plural(2, "child", "children")
        ('1 epoch', '10 epochs', '2 children')
    """
    return f"{n:,} {word if n == 1 else words or word + 's'}"


def ordinal(rank: int) -> str:
    """The word before a superlative: ``""`` for rank 1 (*the* fastest), ``"second "``, ...

    Example:
        >>> f"the {ordinal(1)}fastest", f"the {ordinal(3)}fastest", f"the {ordinal(11)}best"
        ('the fastest', 'the third fastest', 'the 11th best')
    """
    if rank < 1:
        raise ValueError(f"a rank starts at 1, got {rank}")
    if rank <= len(_ORDINALS):
        return _ORDINALS[rank - 1]
    suffix = "th" if 10 <= rank % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(rank % 10, "th")
    return f"{rank}{suffix} "


def side(value: float, reference: float, *, above: str = "above", below: str = "below") -> str:
    """``above`` where ``value`` exceeds ``reference``, else ``below`` (equal counts as below).

    Example:
        >>> side(-90.0, -95.0), side(0.1, 0.2, above="more", below="less")
        ('above', 'less')
    """
    return above if value > reference else below


def gap(
    value: float,
    reference: float,
    *,
    unit: str,
    digits: int = 1,
    above: str = "above",
    below: str = "below",
    level: str = "level with",
) -> str:
    """How far ``value`` lies from ``reference``, and on which side: ``"3.1 nats below"``.

    A difference that rounds to zero at ``digits`` decimals is ``level``.

    Example:
        >>> gap(-97.2, -94.1, unit="nats"), gap(2.04, 2.0, unit="nats"), gap(5, 3, unit="s")
        ('3.1 nats below', 'level with', '2.0 s above')
    """
    difference = value - reference
    if round(abs(difference), digits) == 0:
        return level
    return f"{abs(difference):.{digits}f} {unit} {side(value, reference, above=above, below=below)}"


def span(low: float, high: float, spec: str = ".3g") -> str:
    """``"low to high"`` in the format ``spec``, or the one value where both print alike.

    Example:
        >>> span(0.912, 0.947, ".1%"), span(0.9471, 0.9474, ".1%")
        ('91.2% to 94.7%', '94.7%')
    """
    a, b = format(low, spec), format(high, spec)
    return a if a == b else f"{a} to {b}"


def factor(
    ratio: float,
    *,
    than: str,
    more: str = "dearer",
    less: str = "cheaper",
    same: str = "as cheap",
    digits: int = 1,
) -> str:
    """A ratio of costs against ``than``: ``"3.2 times dearer than X"``, ``"2.0 times cheaper
    than X"`` (for a ratio of 0.5), or ``"as cheap as X"`` where both round to 1.

    Raises:
        ValueError: for a ratio that is not positive and finite.

    Example:
        >>> factor(3.24, than="SF"), factor(0.5, than="SF"), factor(1.01, than="SF")
        ('3.2 times dearer than SF', '2.0 times cheaper than SF', 'as cheap as SF')
    """
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"a ratio must be positive and finite, got {ratio}")
    if round(ratio, digits) == 1 and round(1 / ratio, digits) == 1:
        return f"{same} as {than}"
    if ratio > 1:
        return f"{ratio:.{digits}f} times {more} than {than}"
    return f"{1 / ratio:.{digits}f} times {less} than {than}"


def p_value(p: float) -> str:
    """A p-value in scientific notation, or what an underflow to 0 means.

    Example:
        >>> p_value(3.17e-5), p_value(0.0)
        ('3.2e-05', '0 in double precision (below 1e-308)')
    """
    return f"{p:.1e}" if p > 0 else "0 in double precision (below 1e-308)"


def tally(k: int, n: int, noun: str) -> str:
    """How many of ``n`` things: ``"all four comparisons"``, ``"none of the four ..."``, ...

    ``noun`` is used as given (plural for ``n`` above 1, singular for ``n`` of 1).

    Raises:
        ValueError: unless ``0 <= k <= n`` and ``n >= 1``.

    Example:
        >>> tally(4, 4, "comparisons"), tally(0, 4, "comparisons"), tally(2, 4, "comparisons")
        ('all four comparisons', 'none of the four comparisons', 'two of the four comparisons')
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"a tally needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if n == 1:
        return f"the one {noun}" if k == 1 else f"not the one {noun}"
    if n == 2 and k != 1:
        return f"both {noun}" if k == 2 else f"neither of the two {noun}"
    if k == n:
        return f"all {count(n)} {noun}"
    if k == 0:
        return f"none of the {count(n)} {noun}"
    return f"{count(k)} of the {count(n)} {noun}"


def up_to(value: float, found: str, missing: str) -> str:
    """``found`` with a threshold filled in, or ``missing`` where there is none (NaN).

    Example:
        >>> up_to(0.25, "holds up to {:.2f}", "never holds"), up_to(float("nan"), "{}", "never")
        ('holds up to 0.25', 'never')
    """
    return found.format(value) if math.isfinite(value) else missing


def where(flags: Mapping[object, bool], *, yes: str, no: str, name: str, than: str = "") -> str:
    """Where a comparison goes each way, over the values of ``name``.

    Example:
        >>> where({1: True, 10: True}, yes="cheaper", no="dearer", name="d", than="the rest")
        'cheaper than the rest at every d run here (1, 10)'
        >>> where({1: True, 10: False, 20: False}, yes="cheaper", no="dearer", name="d")
        'cheaper at d = 1 and dearer at d = 10, 20'

    Raises:
        ValueError: for no values.
    """
    if not flags:
        raise ValueError(f"no values of {name} to compare at")
    wins = ", ".join(str(key) for key, flag in flags.items() if flag)
    losses = ", ".join(str(key) for key, flag in flags.items() if not flag)
    rival = f" than {than}" if than else ""
    if not losses:
        return f"{yes}{rival} at every {name} run here ({wins})"
    if not wins:
        return f"{no}{rival} at every {name} run here ({losses})"
    return f"{yes}{rival} at {name} = {wins} and {no} at {name} = {losses}"
