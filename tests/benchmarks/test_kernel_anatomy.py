"""benchmarks/kernel_anatomy.py: instruction classes, the code census of a compiled kernel, and the kernel cases."""
import shutil

import pytest

from conftest import load_benchmark

pytest.importorskip("tvm")


def test_instructions_are_classified_by_what_they_compute():
    bench = load_benchmark("kernel_anatomy")
    assert bench._classify("vpdpbusd") == "int8_dot" and bench._classify("vpdpwssd") == "int8_dot"
    assert bench._classify("vfmadd231ps") == "fp32_fma" and bench._classify("vfnmadd213ps") == "fp32_fma"
    assert bench._classify("vmulps") == "fp32_mul"
    assert bench._classify("vpermps") == "vector_other" and bench._classify("kmovw") == "vector_other"
    assert bench._classify("add") == "scalar_control" and bench._classify("jne") == "scalar_control"


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) needed")
def test_the_code_census_finds_the_integer_ffn_loops(tmp_path):
    from kernels.int_shift import vnni_available

    if not vnni_available():
        pytest.skip("the integer kernels need AVX-512 VNNI")
    bench = load_benchmark("kernel_anatomy")
    cases = bench.kernel_cases()
    assert set(cases) == {"view_attention", "int_view_attention", "int_view_sublayer", "ffn_sublayer",
                          "int_ffn_sublayer", "ray_attention_hashed", "int_ray_attention",
                          "int_view_sublayer[per_tensor]", "int_ffn_sublayer[per_tensor]",
                          "int_ray_attention[per_tensor]"}
    mix = bench.instruction_mix(cases["int_ffn_sublayer"][1], tmp_path, "int_ffn_sublayer")
    assert mix["function"] != "__tvm_ffi_main"  # the loops, not the entry point's argument checks
    # the FFN's fc1 (32 -> 128) and fc2 (128 -> 32) on 8-token tiles: their vpdpbusd are in the code
    assert mix["by_class"]["int8_dot"] >= 64
    assert sum(mix["by_class"].values()) == mix["instructions"]
    assert sum(mix["fraction"].values()) == pytest.approx(1.0)
    # one small call of a kernel case runs on TVM and returns the right shape
    run = cases["int_ray_attention"][0](48)
    assert run().shape == (2, 24, 32)


def test_the_view_sublayer_profile_times_every_part(monkeypatch):
    """Time per part of the integer view sublayer: every part of PARTS gets a time (full minus the kernel without
    it), from rounds of the full kernel and each ablated one."""
    from kernels.int_shift import vnni_available
    from kernels.int_view_attention import PARTS

    if not vnni_available():
        pytest.skip("the integer kernels need AVX-512 VNNI")
    bench = load_benchmark("kernel_anatomy")
    monkeypatch.setattr(bench, "CHUNK_TOKENS", 256)
    profile = bench.view_sublayer_parts(1)
    assert set(profile["part_ms"]) == set(PARTS)
    assert set(profile["ms"]) == {"full"} | {f"without_{part}" for part in PARTS}
    rounds = profile["rounds_ms"]
    assert all(len(times) == bench.PART_ROUNDS and min(times) > 0 for times in rounds.values())
    differences = sorted(f - w for f, w in zip(rounds["full"], rounds["without_keys_values"]))
    assert profile["part_ms"]["keys_values"] == pytest.approx(differences[len(differences) // 2])
