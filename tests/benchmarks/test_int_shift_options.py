"""benchmarks/int_shift_options.py: the integer FFN micro-tile candidates are all bit-identical and each is timed."""
import pytest

from conftest import load_benchmark

pytest.importorskip("tvm")


def test_every_ffn_tile_candidate_matches_the_default_and_is_timed():
    from kernels.int_shift import FFN_BLOCKS, FFN_TILE, vnni_available

    if not vnni_available():
        pytest.skip("the integer FFN kernel needs AVX-512 VNNI")
    bench = load_benchmark("int_shift_options")
    record = bench.ffn_tile_options(tokens=44, repeats=1, rounds=2)  # 44: a partial last 8-token tile
    default = f"{FFN_TILE}x{FFN_BLOCKS[0]}x{FFN_BLOCKS[1]}"
    for mode in ("per_token", "per_tensor"):
        rows = record["modes"][mode]["rows"]
        assert default in rows and len(rows) == len(bench.FFN_TILE_CANDIDATES)
        assert record["modes"][mode]["fastest"] in rows
        assert all(len(row["rounds_ms"]) == 2 and row["ms"] > 0 for row in rows.values())
