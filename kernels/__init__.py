"""Triton kernels, installed as ``deepatlas_fast.kernels``.

The ``triton`` backend is not part of this build yet: :mod:`deepatlas_fast.ops.registry` lists the
backends a build provides, and a request for a missing one falls back to the reference with a
warning.
"""
