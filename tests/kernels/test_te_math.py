"""kernels/te_math.py: the TVMScript exp the softmax kernels share."""
import math

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from kernels.build import cpu_target  # noqa: E402
from kernels.te_math import script_exp  # noqa: E402

_N = 4096


def _bits_exp(T, x, lanes: int):
    """The exp before vscalefps: 2^n from the exponent bits, 0 below -87.3 (the oracle the new form must equal)."""
    f = lambda value: T.Broadcast(T.float32(value), lanes)  # noqa: E731
    clamped = T.max(x, f(-87.3))
    n = T.floor(clamped * f(1.4426950408889634) + f(0.5))
    r = clamped - n * f(0.693359375) + n * f(2.12194440e-4)
    poly = f(1.0 / 5040.0)
    for order in range(6, -1, -1):
        poly = poly * r + f(1.0 / math.factorial(order))
    scale = T.reinterpret(f"float32x{lanes}", T.shift_left(T.Cast(f"int32x{lanes}", n) + T.Broadcast(T.int32(127), lanes),
                                                           T.Broadcast(T.int32(23), lanes)))
    return T.Select(x < f(-87.3), f(0.0), poly * scale)


def _run(exp, lanes: int, x: torch.Tensor) -> torch.Tensor:
    from tvm.script import tirx as T

    @T.prim_func
    def main(src: T.Buffer((_N,), "float32"), dst: T.Buffer((_N,), "float32")):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        for i in T.serial(_N // lanes):
            dst[T.Ramp(i * lanes, 1, lanes)] = exp(T, src[T.Ramp(i * lanes, 1, lanes)], lanes)

    kernel = tvm.compile(tvm.IRModule({"main": main}), target=tvm.target.Target(cpu_target()))
    out = tvm.runtime.tensor(np.zeros(_N, np.float32))
    kernel(tvm.runtime.tensor(x.numpy()), out)
    return torch.from_numpy(out.numpy())


@pytest.mark.skipif("avx512f" not in open("/proc/cpuinfo").read(), reason="AVX-512 CPU needed")
@pytest.mark.parametrize("lanes", [16, 8])
def test_scalef_exp_equals_the_exponent_bits_form_and_is_accurate(lanes):
    """vscalefps gives bit for bit the old 2^n p wherever that was normal (x >= -87.3); below, a subnormal or 0
    instead of 0 (under 1.3e-38); within 2 ulp of exp everywhere that matters; finite for any x <= 0 (masked
    logits are finfo.min)."""
    torch.manual_seed(0)
    special = torch.tensor([0.0, -1e-30, -87.3, -87.29, -87.31, -103.9, -104.0, -104.1, -1e30, -3.4e38])
    x = torch.cat([special, -torch.rand(3000) * 30, -torch.rand(_N - 3000 - special.numel()) * 200]).float()
    new, old = _run(script_exp, lanes, x), _run(_bits_exp, lanes, x)
    normal = x >= -87.3
    assert torch.equal(new[normal], old[normal])
    assert torch.isfinite(new).all() and (new[~normal] >= 0).all() and new[~normal].max() < 1.3e-38
    inside = x > -80
    assert ((new[inside] - torch.exp(x[inside])).abs() / torch.exp(x[inside])).max() < 2.4e-7
