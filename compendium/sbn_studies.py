r"""The discrete-latent chapter's study of :mod:`gradkit.models.sbn`: estimators in training.

Chapter support, beside the book's machinery (not in the installed library): train one fresh
sigmoid-belief-network VAE per variant and estimator (:func:`compare_estimators`), alike
otherwise. It uses only gradkit's public API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import gradkit as gk
from gradkit.models.sbn import SBNVAE, VARIANTS, train_sbn
from gradkit.registry import Estimator

__all__ = ["TRAINABLE", "compare_estimators"]


#: The estimators with learnable parts, each built afresh for every run of compare_estimators.
TRAINABLE: dict[str, Callable[[], Estimator]] = {
    "rebar": lambda: gk.discrete.REBAR(),
    "relax": lambda: gk.discrete.RELAX(),
}


def compare_estimators(
    train: Tensor,
    *,
    estimators: Sequence[str] = ("score_function", "disarm", "rebar", "relax"),
    variants: Sequence[str] = VARIANTS,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    **train_options: Any,
) -> list[dict[str, Any]]:
    r"""Train one fresh model per variant and estimator with ``train_sbn``, alike otherwise.

    Every run starts from the same initialisation for its variant (drawn from ``seed``
    without touching the global random stream) and uses the same batches and binarisation;
    an estimator with learnable parts (:data:`TRAINABLE`: REBAR, RELAX) gets an instance of its
    own, trained with its model. ``options`` gives an estimator its own options (e.g.
    ``{"relax": {"leave_one_out": True}}``); ``train_options`` go to every run
    (``heldout=``, ``steps=``, ``evaluations=``, ...).

    Returns:
        ``train_sbn``'s records of every run, in order, each with ``variant`` and
        ``estimator`` added (a list of dicts: ``pandas.DataFrame(records)`` is a table).

    Raises:
        ValueError: for an unknown variant, or what ``train_sbn`` refuses.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    options = options or {}
    records: list[dict[str, Any]] = []
    for number, variant in enumerate(variants):
        for name in estimators:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + number)
                model = SBNVAE(x_dim=train.shape[-1], variant=variant)
                est = TRAINABLE[name]() if name in TRAINABLE else name  # a surrogate's init too
            model = model.to(device=train.device, dtype=train.dtype)
            runs = train_sbn(
                model, train, estimator=est, seed=seed, **options.get(name, {}), **train_options
            )
            records += [{"variant": variant, "estimator": name, **r} for r in runs]
    return records
