"""Compiled Apache TVM kernels for ShiftAdd-GNT inference, each with its PyTorch reference.

build.py        compile once, cache on disk, load (targets, cache keys)
backend.py      the torch|tvm switch and the one-warning fallback to the reference
mat_shift.py    MatShift: y = act(x W^T + b) with W given by packed sign/exponent shift codes
"""
