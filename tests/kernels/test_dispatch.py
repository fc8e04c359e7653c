"""The kernel facade (kernels/dispatch.py): loaders before builds, the one tail rule, the record of what ran."""
import pytest
import torch
from torch import nn

from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec, decode_shift_codes
from kernels import dispatch
from kernels.mat_shift import TILE, mat_shift, reference_mat_shift


def _prebuilt_mat_shift(packed, calls):
    """A stand-in for a prebuilt (e.g. AOT) library: same arguments as the compiled kernel, computed in torch."""
    def kernel(x_tiles, codes, channel_exponent, bias, out_tiles):
        calls.append(tuple(x_tiles.shape))
        assert torch.equal(codes, packed["codes"])
        out_tiles.copy_(x_tiles @ decode_shift_codes(packed).t() + bias)
    return kernel


def test_a_registered_loader_is_asked_before_building_and_the_tail_follows_the_rule():
    torch.manual_seed(0)
    packed = ShiftLinear.from_linear(nn.Linear(12, 20), ShiftSpec()).export_codes()
    calls, asked = [], []

    def loader(name, key, device):
        asked.append((name, key["in"], key["out"], device.type))
        return _prebuilt_mat_shift(packed, calls) if name == "mat_shift" else None

    dispatch.register_kernel_loader(loader)
    try:
        x = torch.randn(2 * TILE + 3, 12)  # two whole tiles and a tail of 3 tokens
        record = {}
        with dispatch.recording(record):
            out = mat_shift(x, packed)
    finally:
        dispatch.unregister_kernel_loader(loader)
    torch.testing.assert_close(out, reference_mat_shift(x, packed), rtol=1e-5, atol=1e-5)
    assert asked == [("mat_shift", 12, 20, "cpu")]
    assert calls == [(2, TILE, 12), (1, TILE, 12)]  # the prefix in place, then one zero-padded tile
    assert record == {"mat_shift": "tvm"}
    assert loader not in dispatch._LOADERS and not dispatch._MEMO  # unregistering forgets what it gave


def test_run_tiled_writes_only_real_tokens_and_passes_longer_inputs_whole():
    tokens, tile = 10, 4
    x = torch.arange(tokens, dtype=torch.float32)[:, None]
    out = torch.full((tokens, 1), -1.0)
    seen = []

    def launch(inputs, outputs):
        seen.append((inputs[0].shape[0], outputs[0].shape[0]))
        outputs[0].copy_(inputs[0][:outputs[0].shape[0]] * 2)

    dispatch.run_tiled(launch, tile, tokens, [x], [out])
    assert seen == [(8, 8), (4, 4)] and torch.equal(out, 2 * x)
    seen.clear()
    dispatch.run_tiled(launch, tile, tokens, [x], [out], inputs_longer_ok=True)
    assert seen == [(10, 8), (4, 4)] and torch.equal(out, 2 * x)


def test_linear_weight_refuses_fixed_point_inputs_and_other_layers():
    layer = ShiftLinear.from_linear(nn.Linear(4, 3), ShiftSpec(fixed_point_bits=16))
    with pytest.raises(ValueError, match="fixed point"):
        dispatch.linear_weight(layer)
    with pytest.raises(TypeError, match="nn.Linear or ShiftLinear"):
        dispatch.linear_weight(nn.Conv1d(4, 3, 1))
    dense = nn.Linear(4, 3)
    assert torch.equal(dispatch.linear_weight(dense), dense.weight.detach())


def test_a_reference_run_is_never_hidden_by_a_later_kernel_run():
    record = {}
    with dispatch.recording(record):
        dispatch.note_kernel("ffn_sublayer", "reference")
        dispatch.note_kernel("ffn_sublayer", "tvm")
        dispatch.note_kernel("mat_shift", "blas")
    dispatch.note_kernel("view_attention", "tvm")  # outside any recording: not kept
    assert record == {"ffn_sublayer": "reference", "mat_shift": "blas"}


@pytest.mark.parametrize("preset,expected", [(None, 2), ("1", 1)])
def test_tvm_thread_pool_gets_torchs_thread_count_unless_the_user_set_one(preset, expected):
    """TVM sizes its CPU pool once, from half the hardware threads unless told: on a 2-vCPU machine the kernels
    ran on 1 thread beside 2-thread PyTorch peers. The first kernel lookup now sets it to torch's count."""
    import os
    import subprocess
    import sys

    pytest.importorskip("tvm")
    script = ("import torch; torch.set_num_threads(2)\n"
              "from torch import nn\n"
              "from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec\n"
              "from kernels.mat_shift import mat_shift\n"
              "mat_shift(torch.randn(64, 16), ShiftLinear.from_linear(nn.Linear(16, 16), ShiftSpec()).export_codes())\n"
              "import tvm_ffi; print(tvm_ffi.get_global_func('runtime.NumThreads')())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    if preset is not None:
        env["TVM_NUM_THREADS"] = preset
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) == expected
