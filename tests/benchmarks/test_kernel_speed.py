"""benchmarks/kernel_speed.py: --quick needs no checkpoint (random-initialised model, variants converted from it),
times every row, gives each row its speed-up against the fastest dense peer and against dense eager, names the
headline pair and the machine's peaks; bad arguments stop with one message. A smoke run on a tiny frame: it
checks what the benchmark records, never how fast anything is."""
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, load_benchmark, tiny_overrides

pytest.importorskip("tvm")

SCRIPT = REPO_ROOT / "benchmarks" / "kernel_speed.py"


def _load_benchmark():
    return load_benchmark("kernel_speed")


def test_quick_mode_records_every_row_against_the_dense_peers(tiny_scene, tmp_path):
    out = tmp_path / "speed.json"
    overrides = tiny_overrides(tiny_scene, tmp_path / "runs", "speed")
    command = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--variants", "c_hash_shift_linears",
               "--peers", "eager", "int8", "tvm", "--peak-size", "64", "--breakdown", *overrides]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    record = json.loads(out.read_text())
    assert record["quick"] and "random-initialised" in record["model_source"]
    assert record["environment"]["threads"] >= 1 and "allocator" in record["environment"]
    assert record["environment"]["tvm_threads"] == record["environment"]["threads"]
    assert record["peaks"]["fp32"]["gmac_per_s"] > 0
    rows = {row["label"]: row for row in record["end_to_end"]}
    eager, int8, dense_tvm = (rows["dense GNT, PyTorch eager fp32"], rows["dense GNT, torch.ao dynamic int8 Linear layers"],
                              rows["dense GNT, TVM kernels fp32"])
    shiftadd = rows["ShiftAdd c_hash_shift_linears, TVM kernels"]
    assert len(rows) == 4  # quick: no reference rows for the variants
    dense = [eager, int8, dense_tvm]
    fastest = min(r["ms_per_frame"] for r in dense)
    for row in rows.values():
        assert row["ms_per_frame"] > 0 and row["repeats"] == 1 and row["rounds_ms"] == [row["ms_per_frame"]]
        assert row["speedup_vs_fastest_dense"] == pytest.approx(fastest / row["ms_per_frame"])
        assert row["speedup_vs_dense_eager"] == pytest.approx(eager["ms_per_frame"] / row["ms_per_frame"])
        assert row["macs_per_frame"] > 0 and row["peak_fraction"]["fp32"] > 0
    assert max(r["speedup_vs_fastest_dense"] for r in dense) == pytest.approx(1.0)
    assert eager["speedup_vs_dense_eager"] == pytest.approx(1.0)
    # the kernels render the reference's picture; the int8 peer really ran quantized Linear layers
    assert dense_tvm["frame_psnr"] == pytest.approx(eager["frame_psnr"], abs=1e-3)
    assert "dynamic int8" in int8["ran"] and int8["arithmetic"] == "int8"
    # a "tvm" row records what ran where, and nothing in it fell back to the reference
    assert shiftadd["kernels_ran"] and all(how != "reference" for kernels in shiftadd["kernels_ran"].values()
                                           for how in kernels.values())
    assert shiftadd["ops"]["shifts_per_ray"] > 0 and eager["ops"]["shifts_per_ray"] == 0
    assert 0 < shiftadd["ops"]["energy_mj_full_frame"] < eager["ops"]["energy_mj_full_frame"]
    # --breakdown: self time per part adds up to the hooked render; every row but torch.compile has one
    for row in rows.values():
        parts = row["breakdown_ms"]
        assert {"cnn", "view_attention", "ray_attention", "ffn", "head", "rest"} <= parts.keys()
        # the front end: its own part on PyTorch, one fused part (gathers + per-view MLP) on the kernels
        assert "view_embedding" in parts if row["backend"] == "torch" else "front_end" in parts
        summed = sum(v for k, v in parts.items() if k not in ("total_with_hooks", "blocks_bound"))
        assert summed == pytest.approx(parts["total_with_hooks"])
        assert all(parts[k] > 0 for k in ("cnn", "view_attention", "ray_attention", "ffn"))
        blocks = parts["view_attention"] + parts["ray_attention"] + parts["ffn"]
        assert parts["blocks_bound"] == pytest.approx(parts["total_with_hooks"] / (parts["total_with_hooks"] - blocks))
    assert "Where the time goes" in out.with_suffix(".md").read_text()
    head = record["headline"]
    assert head["best_shiftadd"] == shiftadd["label"]
    assert head["speedup_vs_fastest_dense"] == pytest.approx(shiftadd["speedup_vs_fastest_dense"])
    assert head["frame_psnr"] == pytest.approx(shiftadd["frame_psnr"])
    assert head["speedup_vs_fastest_dense_if_blocks_were_free"] == pytest.approx(
        shiftadd["breakdown_ms"]["blocks_bound"] * shiftadd["speedup_vs_fastest_dense"])
    assert "Headline:" in out.with_suffix(".md").read_text()
    # the frame's trivial baseline: the nearest training photo on the same view
    assert record["nearest_photo"]["view"] == record["view"] and record["nearest_photo"]["psnr"] > 0
    assert "Showing the nearest training photo instead" in out.with_suffix(".md").read_text()


def test_bad_arguments_stop_with_one_message(tiny_scene, tmp_path, capsys):
    benchmark = _load_benchmark()
    overrides = tiny_overrides(tiny_scene, tmp_path / "runs", "speed")
    out = str(tmp_path / "x.json")
    with pytest.raises(SystemExit):
        benchmark.main([*overrides, "--quick", "--out", out, "--peers", "int8"])
    assert "--peers must include eager" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--quick", "--out", out, "--view", "1", *overrides])  # a training view
    assert "not a held-out view" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no dense checkpoint"):
        benchmark.main(["--out", out, *overrides])
    with pytest.raises(Exception, match="unknown ShiftAdd variant"):
        benchmark.main([*overrides, "--quick", "--out", out, "--variants", "no_such_variant"])


def test_rows_are_timed_round_by_round_and_a_tvm_row_must_run_its_kernels():
    """time_rows renders every row once per round, in turn (a drift in the machine's speed reaches all rows alike);
    a row timed as "tvm" whose model ran no kernel fails."""
    import types

    import torch

    from kernels.dispatch import KernelFallbackError

    benchmark = _load_benchmark()
    order = []
    device = types.SimpleNamespace(device=torch.device("cpu"))

    def row(name, backend="torch"):
        spec = benchmark.RowSpec(name, "dense", "dense", "ckpt", backend)
        return benchmark.LiveRow(spec, None, torch.nn.Identity(), device, "PyTorch", lambda: order.append(name), [])

    rows = [row("a"), row("b")]
    ran = benchmark.time_rows(rows, repeats=3)
    assert order == ["a", "b"] * 3 and ran == [{}, {}]
    assert all(len(r.seconds) == 3 and min(r.seconds) >= 0 for r in rows)
    with pytest.raises(KernelFallbackError, match="no kernel-backed module ran"):
        benchmark.time_rows([row("c", backend="tvm")], repeats=1)
