"""Fused Triton kernels, importable only as ``energy_attn.kernels``.

Importing this package never imports Triton; the kernel modules do, lazily, when a Triton
backend is first requested.
"""
