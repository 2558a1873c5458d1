r"""The reparameterisation chapter's reading of :func:`gradkit.reparam.relaxation_study`.

Chapter support, beside the book's machinery (not in the installed library): from the study's
rows for several costs and temperatures :math:`\tau`, :func:`temperature_claims` computes the
numbers the chapter's discussion quotes (how the Gumbel-softmax bias and variance move with
:math:`\tau`, and how straight-through compares), each defined so that it can be checked in the
table. It uses only pandas and numpy on the study's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["coldest_run", "rise_when_colder", "temperature_claims"]


def coldest_run(mask: Sequence[bool] | np.ndarray, taus: Sequence[float] | np.ndarray) -> float:
    """The highest temperature up to which ``mask`` holds at every colder one (NaN if none).

    ``taus`` ascend; ``mask[i]`` is the claim at ``taus[i]``.

    Example:
        >>> coldest_run([True, True, False, True], [0.1, 0.2, 0.5, 1.0])
        0.2
        >>> coldest_run([False, True], [0.1, 0.2])
        nan
    """
    mask = np.asarray(mask, dtype=bool)
    count = len(mask) if mask.all() else int(np.argmin(mask))
    return float(taus[count - 1]) if count else float("nan")


def rise_when_colder(
    bias: Sequence[float] | np.ndarray,
    standard_error: Sequence[float] | np.ndarray,
    taus: Sequence[float] | np.ndarray,
) -> tuple[float, float, float]:
    """The most significant rise of the bias from one temperature to a colder one.

    Over all pairs of a colder :math:`\\tau_c` and a hotter :math:`\\tau_h`, the largest
    :math:`z = (b_c - b_h)/\\sqrt{s_c^2 + s_h^2}`; returns ``(z, tau_c, tau_h)``. A bias that
    only falls as :math:`\\tau` falls gives a negative ``z``.

    Raises:
        ValueError: for fewer than two temperatures or arrays of different lengths.

    Example:
        >>> z, cold, hot = rise_when_colder([0.1, 0.5, 0.3], [0.1, 0.1, 0.1], [0.1, 0.2, 0.5])
        >>> round(z, 2), cold, hot
        (1.41, 0.2, 0.5)
    """
    b, s = np.asarray(bias, dtype=float), np.asarray(standard_error, dtype=float)
    t = np.asarray(taus, dtype=float)
    if not len(b) == len(s) == len(t) or len(t) < 2:
        raise ValueError(
            f"need two or more temperatures and as many biases and standard errors; got "
            f"{len(b)} biases, {len(s)} standard errors, {len(t)} temperatures"
        )
    z = (b[:, None] - b[None, :]) / np.hypot(s[:, None], s[None, :])
    z = np.where(np.tri(len(b), k=-1, dtype=bool).T, z, -np.inf)  # row colder than column
    cold, hot = np.unravel_index(np.argmax(z), z.shape)
    return float(z[cold, hot]), float(t[cold]), float(t[hot])


def temperature_claims(
    relax: Any, *, cold_end: float = 0.3, band: tuple[float, float] = (0.1, 1.0)
) -> Any:
    r"""The numbers behind the chapter's claims, one column per cost.

    Args:
        relax: a ``pandas.DataFrame`` of :func:`gradkit.reparam.relaxation_study` rows with a
            ``cost`` column and ``bias / ‖exact‖`` (the bias over the exact gradient's norm):
            for each cost, the ``"Gumbel-softmax"`` and ``"straight-through"`` rows at the
            same ascending temperatures and one ``"score function"`` row (temperature NaN).
        cold_end: the fit of the variance's slope uses the temperatures up to this one.
        band: the temperatures where straight-through's extra bias is counted.

    Returns:
        a ``pandas.DataFrame`` with a column per cost and the rows: the hottest bias over the
        exact norm; the score function's variance over the hottest Gumbel-softmax variance;
        the highest temperature up to which the bias is below two standard errors (NaN if it
        is not at the coldest); the slope of log variance against log τ up to ``cold_end``;
        the highest temperature up to which Gumbel-softmax's variance exceeds the score
        function's (NaN if none); the largest rise of the bias as τ falls, in standard errors,
        and between which temperatures; the number of temperatures where straight-through's
        variance is the larger; the number in ``band`` where its bias exceeds Gumbel-softmax's
        by more than two standard errors; the largest relative difference of the variances.

    Raises:
        ValueError: for a cost without both relaxed estimators at the same temperatures and
            one score-function row.

    Example:
        >>> import pandas as pd
        >>> rows = [{"cost": "c", "estimator": e, "temperature": t, "bias": b,
        ...          "standard_error": 0.01, "variance": v, "bias / ‖exact‖": b}
        ...         for e in ("Gumbel-softmax", "straight-through")
        ...         for t, b, v in [(0.1, 0.01, 9.0), (0.3, 0.2, 3.0), (1.0, 0.5, 1.0)]]
        >>> rows.append({"cost": "c", "estimator": "score function", "temperature": float("nan"),
        ...              "bias": 0.0, "standard_error": 0.01, "variance": 5.0,
        ...              "bias / ‖exact‖": 0.0})
        >>> claims = temperature_claims(pd.DataFrame(rows))["c"]
        >>> float(claims["bias < 2 s.e. for all τ up to"]), float(claims["variance slope, τ ≤ 0.3"])
        (0.1, -1.0...)
    """
    import pandas as pd

    claims = {}
    for cost, rows in relax.groupby("cost", sort=False):
        by = {est: part.set_index("temperature") for est, part in rows.groupby("estimator")}
        soft, hard = by.get("Gumbel-softmax"), by.get("straight-through")
        score = by.get("score function")
        if soft is None or hard is None or score is None or len(score) != 1:
            raise ValueError(
                f"cost {cost!r} needs Gumbel-softmax and straight-through rows and one score "
                "function row, as gradkit.reparam.relaxation_study returns them"
            )
        taus = soft.index.to_numpy(dtype=float)
        if not np.array_equal(taus, hard.index.to_numpy(dtype=float)):
            raise ValueError(f"cost {cost!r}: the two relaxed estimators' temperatures differ")
        sf_var = float(score["variance"].iloc[0])
        low = taus <= cold_end
        mid = (taus >= band[0]) & (taus <= band[1])
        gap = (hard["bias"] - soft["bias"]).to_numpy()
        gap_se = np.hypot(hard["standard_error"], soft["standard_error"]).to_numpy()
        z_rise, tau_cold, tau_hot = rise_when_colder(soft["bias"], soft["standard_error"], taus)
        variance = soft["variance"].to_numpy()
        claims[cost] = {
            "hot bias / ‖exact‖": float(soft["bias / ‖exact‖"].iloc[-1]),
            "Var(SF) / Var(GS), hottest": sf_var / float(variance[-1]),
            "bias < 2 s.e. for all τ up to": coldest_run(
                (soft["bias"] < 2 * soft["standard_error"]).to_numpy(), taus
            ),
            f"variance slope, τ ≤ {cold_end:g}": float(
                np.polyfit(np.log(taus[low]), np.log(variance[low]), 1)[0]
            ),
            "Var(GS) > Var(SF) for all τ up to": coldest_run(variance > sf_var, taus),
            "largest bias rise when colder (s.e.)": z_rise,
            "… from τ": tau_hot,
            "… to τ": tau_cold,
            "τ where Var(ST) > Var(GS)": int((hard["variance"] > soft["variance"]).sum()),
            f"τ in [{band[0]:g}, {band[1]:g}] where ST bias > GS + 2 s.e.": int(
                (gap[mid] > 2 * gap_se[mid]).sum()
            ),
            "max |Var(ST) / Var(GS) − 1|": float(
                (hard["variance"] / soft["variance"] - 1).abs().max()
            ),
        }
    return pd.DataFrame(claims)
