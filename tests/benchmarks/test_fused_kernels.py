"""benchmarks/fused_kernels.py: every fused kernel checked against its reference, timed, and put against the peak."""
import json

import pytest

from conftest import load_benchmark

pytest.importorskip("tvm")


def test_every_kernel_row_is_checked_timed_and_put_against_its_peak(tmp_path):
    bench = load_benchmark("fused_kernels")
    out = tmp_path / "fused.json"
    assert bench.main(["--config", "configs/fern_blend.yaml", "--out", str(out), "--repeats", "1", "--rounds", "2",
                       "--peak-size", "256", "render.chunk_rays=8", "data.num_source_views=3"]) == 0
    record = json.loads(out.read_text())
    names = [r["kernel"] for r in record["rows"]]
    from kernels.int_shift import vnni_available

    head = ["blend_head", "blend_head[integer]"] if vnni_available() else ["blend_head"]  # m's head where VNNI is
    assert names[:6 + len(head)] == ["ray_attention[dense]", "ray_attention[hashed]", "view_blend", *head,
                                     "view_attention", "view_attention_sublayer", "ffn_sublayer[dense]"]

    # n's integer position fusion, then the last ones on fern's real data (l's integer front end), where the CPU has
    # VNNI
    assert names[names.index("position_fusion"):] == ["position_fusion"] + (
        ["position_fusion[integer]"] if vnni_available() else []) + ["source_views", "source_front_end",
                                                                      "source_front_end[folded]"] + (
        ["source_front_end[integer]"] if vnni_available() else [])

    integer = ["int_ffn", "int_ffn_sublayer", "int_view_attention", "int_view_sublayer", "int_ray_attention"]
    integer += [f"{name}[per_tensor]" for name in integer[1:]]  # k's kernels: calibrated per-tensor scales
    assert all((name in names) == vnni_available() for name in integer)  # the integer rows need AVX-512 VNNI
    for row in record["rows"]:
        assert row["kernel_ms"] > 0 and row["macs"] > 0
        assert row["peak_fraction"] == pytest.approx(row["kernel_gmac_per_s"] / row["peak_gmac_per_s"])
        assert len(row["rounds_kernel_ms"]) == 2 and min(row["rounds_kernel_ms"]) <= row["kernel_ms"]
    assert "openmp" in record and record["peaks"]["fp32"]["gmac_per_s"] > 0
    if vnni_available():  # int8 layers and fp32 code projections: between the two peaks
        ray = next(row for row in record["rows"] if row["kernel"] == "int_ray_attention")
        assert ray["arithmetic"] == "int8+fp32" and set(ray["macs_by_arithmetic"]) == {"int8", "fp32"}
        peaks = record["peaks"]
        assert peaks["fp32"]["gmac_per_s"] < ray["peak_gmac_per_s"] < peaks["int8"]["gmac_per_s"]
        fusion = next(row for row in record["rows"] if row["kernel"] == "position_fusion[integer]")
        assert set(fusion["macs_by_arithmetic"]) == {"int8", "fp32"} and fusion["macs_by_arithmetic"]["fp32"] > 0
        integer_head = next(row for row in record["rows"] if row["kernel"] == "blend_head[integer]")
        assert integer_head["arithmetic"] == "int8+fp32" and set(integer_head["macs_by_arithmetic"]) == {"int8", "fp32"}
