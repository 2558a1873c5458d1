"""The compendium's machinery: chapter context, figure provenance, execution and book build.

Not part of the gradkit library (``pip install gradkit`` ships the library alone); it lives
beside ``benchmarks/`` in the source checkout, whose ``_toc.yml`` and chapters it reads.
"""
