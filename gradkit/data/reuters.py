r"""The 395-document Reuters bag-of-words corpus that the ``lda`` package ships.

The ``lda`` package (Riddell et al.) installs its test corpus next to its code:
``lda/tests/reuters.ldac`` (one document per line in the LDA-C format
``N id:count id:count ...``), ``reuters.tokens`` (the vocabulary, one word per line) and
``reuters.titles``. :func:`load_reuters` reads them from the *installed* package through
:mod:`importlib.resources`; nothing is copied into this repository and nothing is downloaded.

A document is a count vector :math:`c \in \mathbb{N}^V` over the vocabulary: the bag of words of
the sequence :math:`x = (x_1, \dots, x_n)` with :math:`c_w = \#\{i : x_i = w\}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import Tensor

__all__ = ["Corpus", "load_reuters", "parse_ldac"]


@dataclass(frozen=True)
class Corpus:
    """A bag-of-words corpus split into training and held-out documents.

    Attributes:
        train: counts of the training documents, shape ``(num_train, V)``.
        test: counts of the held-out documents, shape ``(num_test, V)``.
        vocabulary: the ``V`` words, in column order.
        train_titles: one title per training document.
        test_titles: one title per held-out document.
    """

    train: Tensor
    test: Tensor
    vocabulary: list[str]
    train_titles: list[str]
    test_titles: list[str]

    @property
    def vocab_size(self) -> int:
        """The number of words ``V``."""
        return len(self.vocabulary)


def parse_ldac(text: str, vocab_size: int) -> np.ndarray:
    """Parse LDA-C text (``N id:count id:count ...`` per line) into a dense count matrix.

    Args:
        text: the file's contents, one document per line.
        vocab_size: the number of columns ``V``; every word id must be below it.

    Returns:
        an ``int64`` array of shape ``(num_docs, V)``.

    Raises:
        ValueError: if a line's declared number of distinct words disagrees with its entries,
            or a word id is outside ``[0, V)``.

    Example:
        >>> parse_ldac("2 0:3 2:1\\n1 1:2\\n", vocab_size=3).tolist()
        [[3, 0, 1], [0, 2, 0]]
    """
    lines = [line.split() for line in text.splitlines() if line.strip()]
    counts = np.zeros((len(lines), vocab_size), dtype=np.int64)
    for row, fields in enumerate(lines):
        pairs = np.array([field.split(":") for field in fields[1:]], dtype=np.int64)
        pairs = pairs.reshape(-1, 2)
        if int(fields[0]) != len(pairs):
            raise ValueError(
                f"LDA-C line {row + 1} declares {fields[0]} distinct words but lists "
                f"{len(pairs)}; the file is corrupt, reinstall the package that ships it"
            )
        if len(pairs) and (pairs[:, 0].min() < 0 or pairs[:, 0].max() >= vocab_size):
            raise ValueError(
                f"LDA-C line {row + 1} has a word id outside [0, {vocab_size}); the vocabulary "
                "file does not match the counts file"
            )
        counts[row, pairs[:, 0]] = pairs[:, 1]
    return counts


def _read(name: str) -> str:
    try:
        return (resources.files("lda") / "tests" / name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the Reuters corpus ships inside the 'lda' package, which is not installed; "
            "install it with `pip install lda` (or `pip install gradkit[data]`)"
        ) from None
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the installed 'lda' package has no tests/{name}; reinstall it from a wheel that "
            "includes its test data (`pip install --force-reinstall lda`)"
        ) from None


def load_reuters(
    *,
    vocab_size: int | None = 2000,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Corpus:
    r"""The Reuters corpus from the installed ``lda`` package, with a held-out split.

    Keeps the ``vocab_size`` most frequent words (ties broken by word id; all 4,258 words with
    ``None``) and drops documents left empty. The split is a random permutation of the
    documents drawn from a generator seeded with ``seed``: ``round(test_fraction * D)``
    documents are held out.

    Args:
        vocab_size: how many of the most frequent words to keep, or ``None`` for all.
        test_fraction: the held-out fraction, in ``(0, 1)``.
        seed: the seed of the split.
        dtype: floating dtype of the count tensors.
        device: where the count tensors live.

    Returns:
        a :class:`Corpus`; with the defaults, 316 training and 79 held-out documents over
        2,000 words.

    Raises:
        ModuleNotFoundError: if the ``lda`` package is not installed.
        ValueError: for ``vocab_size < 1`` or ``test_fraction`` outside ``(0, 1)``.

    Example:
        >>> corpus = load_reuters(vocab_size=500)
        >>> corpus.train.shape, corpus.test.shape, corpus.vocabulary[:3]
        (torch.Size([316, 500]), torch.Size([79, 500]), ['church', 'pope', 'years'])
    """
    if vocab_size is not None and (isinstance(vocab_size, bool) or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must be in (0, 1), got {test_fraction}; e.g. 0.2 holds out a fifth"
        )
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype such as torch.float32, got {dtype}")
    words = _read("reuters.tokens").split()
    titles = [line.strip() for line in _read("reuters.titles").splitlines() if line.strip()]
    counts = parse_ldac(_read("reuters.ldac"), len(words))
    if vocab_size is not None and vocab_size < len(words):
        totals = counts.sum(0)
        keep = np.sort(np.argsort(-totals, kind="stable")[:vocab_size])
        counts = counts[:, keep]
        words = [words[i] for i in keep]
    nonempty = counts.sum(1) > 0
    counts = counts[nonempty]
    titles = [title for title, ok in zip(titles, nonempty, strict=True) if ok]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(counts), generator=generator).numpy()
    num_test = max(1, round(test_fraction * len(counts)))
    test_idx, train_idx = order[:num_test], order[num_test:]
    data = torch.as_tensor(counts, dtype=dtype, device=device)
    return Corpus(
        train=data[torch.as_tensor(train_idx, device=data.device)],
        test=data[torch.as_tensor(test_idx, device=data.device)],
        vocabulary=words,
        train_titles=[titles[i] for i in train_idx],
        test_titles=[titles[i] for i in test_idx],
    )
