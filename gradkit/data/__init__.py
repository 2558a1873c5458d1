"""Data sets that ship inside installed packages: nothing is downloaded at run time."""
