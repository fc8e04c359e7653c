"""The CUDA kernels against their references on a GPU (skipped where there is none: CI builds them only).

The kernels come from TVM's compiler or, on a machine with only the TVM runtime, from the ahead-of-time folder
named by $SHIFTADD_GNT_AOT_KERNELS (kernels/aot.py; benchmarks/gpu_check.sh sets it). Every case must run on the
kernels: a fallback to the reference fails the test. The cases live in kernels/selfcheck.py (the AOT export
compiles exactly the kernels they call).
"""
import os

import pytest
import torch

from kernels.aot import AOT_ENV
from kernels.build import tvm_available
from kernels.selfcheck import FFN_KINDS, RAYS, TOKENS, ffn_checks, hashed_checks, mat_shift_checks, view_checks

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not tvm_available() and not os.environ.get(AOT_ENV),
                                 reason=f"needs TVM's compiler or AOT kernels (${AOT_ENV})")]

CUDA = torch.device("cuda")


def _assert_all(checks) -> None:
    for check in checks:
        assert set(check.ran.values()) == {"tvm"}, f"{check.label} did not run on the CUDA kernel: {check.ran}"
        assert check.error() is None, f"{check.label}: {check.error()}"


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mat_shift(tokens, dtype):
    _assert_all(mat_shift_checks(CUDA, tokens, dtype))


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("kind", FFN_KINDS)
def test_ffn(tokens, kind):
    _assert_all(ffn_checks(CUDA, tokens, kind))


@pytest.mark.parametrize("tokens", TOKENS)
def test_view_attention_and_front_end(tokens):
    _assert_all(view_checks(CUDA, tokens))


@pytest.mark.parametrize("rays", RAYS)
def test_hashed_attention(rays):
    _assert_all(hashed_checks(CUDA, rays))
