"""Triton kernels and their launchers, installed as ``spinenet_fast.kernels``.

Kernels here know nothing of autograd or dispatch: ``spinenet_fast.ops`` wraps them.
"""
