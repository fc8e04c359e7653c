"""Which integer arithmetic runs a shift layer fastest on this CPU: measured at the model's shapes, written as JSON.

  python benchmarks/int_shift_options.py --out results/int_shift_options_cpu.json [--tokens 49152] [--repeats 7]
      [--sections layers ffn ffn_tiles view_attention]

Every option computes the same layer (8-bit activations with one calibrated per-tensor scale, exact power-of-two
integer weights, int32 accumulation, fp32 rescale + bias, fused in one kernel unless said otherwise):
  vnni_u8s8_TxB    kernels/int_shift.py: AVX-512 VNNI vpdpbusd, T tokens x B blocks of 16 outputs in registers
  vnni_s16s16      the same kernel with 16-bit activations on vpdpwssd (per-tensor scale)
  llvm_int_mul     TVM TE int32 multiply-accumulate of the rounded activations by the integer weights, LLVM-vectorized
  llvm_var_shift   TVM TE shift form: acc += +-(q << e) (variable shifts, vpsllvd), LLVM-vectorized
and the whole FFN half-block (record["ffn"]): the fused integer FFN kernel vs the two integer layers as separate
kernels vs dense fp32 on MKL; (record["ffn_tiles"]) the fused FFN sublayer's micro-tile, per token and per
tensor, in paired rounds; and (record["view_attention"]) how much of the fused fp32 view-attention kernel its
k|v product is, against that product as an integer layer. For scale, the fp32 paths the model has today (same shapes): mat_shift_fp32 (the fp32 MatShift kernel) and
blas_fp32 (torch F.linear on the decoded weights, MKL), plus torch_int_mm (torch._int_mm int8 GEMM with the
quantization and rescale as separate torch ops, i.e. unfused). Each row is checked against the integer reference
(bit for bit for the integer options) before it is timed. Timings are medians of `--repeats` calls after one warm-up, as wall time and as this process's CPU time (all
threads); with --loaded-machine the fastest option is picked by CPU time.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import statistics
import time

import torch
import torch.nn.functional as F

from gnt_shiftadd.evaluation.evaluate import write_record
from gnt_shiftadd.runtime import allocator_state, tune_cpu_allocator
from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear, export_int_shift, int_shift_reference
from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec
from kernels.build import cpu_target, kernel_ready, match_tvm_threads_to_torch, tvm_thread_count
from kernels.int_shift import FFN_BLOCKS, FFN_TILE, int_ffn, int_shift, prepare_int_shift, reference_int_ffn, \
    vnni_available
from kernels.mat_shift import mat_shift

SHAPES = [(32, 128), (128, 32), (32, 32)]  # (in, out): FFN fc1, FFN fc2, attention linears
TILE = 8


def _time(fn, repeats: int) -> tuple[float, float]:
    """(median wall ms, median CPU ms of this process over all its threads). On shared cores the CPU time is
    the steadier figure for ranking (it does not count time other jobs held the cores)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def _te_option(in_features: int, out_features: int, form: str):
    """TE kernel: x fp32 [tiles, TILE, in], weights int32 [in, out] (form "mul") or sign/shift int32 [in, out]
    ("shift"), scalars inv/scale fp32 [1], out_scale/bias fp32 [out] -> y fp32 [tiles, TILE, out]."""
    import tvm
    from tvm import s_tir, te, tirx

    tiles = te.var("tiles")
    x = te.placeholder((tiles, TILE, in_features), "float32", name="x")
    inv = te.placeholder((1,), "float32", name="inv")
    scale = te.placeholder((1,), "float32", name="scale")
    out_scale = te.placeholder((out_features,), "float32", name="out_scale")
    bias = te.placeholder((out_features,), "float32", name="bias")
    weight = te.placeholder((in_features, out_features), "int32", name="weight")
    sign = te.placeholder((in_features, out_features), "int32", name="sign")
    level = tirx.const(127.0, "float32")
    xq = te.compute((tiles, TILE, in_features), lambda t, i, k: tirx.nearbyint(
        te.min(te.max(x[t, i, k] * inv[0], -level), level)).astype("int32"), name="xq")
    k = te.reduce_axis((0, in_features), "k")
    if form == "mul":
        acc = te.compute((tiles, TILE, out_features), lambda t, i, o: te.sum(xq[t, i, k] * weight[k, o], axis=k),
                         name="acc")
        inputs = [x, inv, scale, out_scale, bias, weight]
    else:
        def shifted(t, i, o):
            value = tirx.shift_left(xq[t, i, k], weight[k, o])
            return tirx.Select(sign[k, o] > 0, value, tirx.Select(sign[k, o] < 0, -value, tirx.const(0, "int32")))

        acc = te.compute((tiles, TILE, out_features), lambda t, i, o: te.sum(shifted(t, i, o), axis=k), name="acc")
        inputs = [x, inv, scale, out_scale, bias, weight, sign]
    y = te.compute((tiles, TILE, out_features),
                   lambda t, i, o: acc[t, i, o].astype("float32") * scale[0] * out_scale[o] + bias[o], name="y")
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func(inputs + [y])}))
    y_block, acc_block, q_block = sch.get_sblock("y"), sch.get_sblock("acc"), sch.get_sblock("xq")
    tile, _, out = sch.get_loops(y_block)
    sch.parallel(tile)
    sch.compute_at(acc_block, tile)
    sch.compute_at(q_block, tile)
    a_token, a_out, a_k = sch.get_loops(acc_block)[1:]
    out_outer, out_inner = sch.split(a_out, [None, 16])
    sch.reorder(out_outer, a_k, a_token, out_inner)
    sch.vectorize(out_inner)
    sch.unroll(a_token)
    sch.decompose_reduction(acc_block, a_k)
    _, q_k = sch.get_loops(q_block)[-2:]
    sch.vectorize(sch.split(q_k, [None, 16])[1])
    _, y_out = sch.get_loops(y_block)[-2:]
    sch.vectorize(sch.split(y_out, [None, 16])[1])
    return sch.mod


def _build(mod):
    import tvm

    return tvm.compile(mod, target=tvm.target.Target(cpu_target()))["main"]


def ffn_options(tokens: int, repeats: int) -> dict:
    """The model's whole FFN half-block after its LayerNorm, x + fc2(relu(fc1(h))) at 32 -> 128 -> 32 with 8-bit
    per-token activations: the fused integer kernel (int_ffn) against the two integer layers as separate kernels
    plus a torch residual add, and against the dense fp32 FFN on MKL. The LayerNorm (same for all) is left out."""
    torch.manual_seed(0)
    dense1, dense2 = torch.nn.Linear(32, 128), torch.nn.Linear(128, 32)
    fc1 = IntShiftLinear.from_linear(dense1, ShiftSpec(exponent_min=-6), 8, "per_token").eval()
    fc2 = IntShiftLinear.from_linear(dense2, ShiftSpec(exponent_min=-6), 8, "per_token").eval()
    w1, w2 = prepare_int_shift(export_int_shift(fc1)), prepare_int_shift(export_int_shift(fc2))
    x = torch.randn(tokens, 32)
    h = F.layer_norm(x, (32,))
    expected = reference_int_ffn(h, x, w1, w2)
    macs = tokens * 2 * 32 * 128
    options = {"int_ffn_fused": lambda: int_ffn(h, x, w1, w2),
               "int_shift_x2_plus_add": lambda: x + int_shift(int_shift(h, w1, "relu"), w2),
               "blas_fp32": lambda: x + dense2(torch.relu(dense1(h)))}
    rows = {}
    with torch.no_grad():
        for name, fn in options.items():
            exact = name != "blas_fp32"
            if exact and not torch.equal(fn(), expected):
                raise AssertionError(f"{name} does not match the integer FFN reference")
            ms, cpu_ms = _time(fn, repeats)
            rows[name] = {"ms": ms, "cpu_ms": cpu_ms, "gmac_per_s": macs / ms / 1e6, "bit_exact": exact or None}
            print(f"  ffn 32->128->32 {name:<22} {ms:8.2f} ms wall {cpu_ms:8.2f} ms CPU {macs / ms / 1e6:7.1f} GMAC/s",
                  flush=True)
    return {"tokens": tokens, "macs": macs, "tile": FFN_TILE, "blocks": list(FFN_BLOCKS), "rows": rows}


FFN_TILE_CANDIDATES = ((8, (2, 2)), (8, (2, 1)), (8, (1, 1)), (4, (2, 2)), (4, (2, 1)), (4, (4, 1)))


def ffn_tile_options(tokens: int, repeats: int, rounds: int = 9) -> dict:
    """The fused integer FFN sublayer (LN in the kernel, x + fc2(relu(fc1(LN(x)))) at 32 -> 128 -> 32) at each
    micro-tile (tokens per tile, fc1 and fc2 output blocks of 16 per pass), per token and per tensor (calibrated),
    every candidate bit-identical to the default and timed in paired rounds (the candidates alternate within each
    round; the medians over rounds of each round's median), so a slow stretch of the shared machine hits them all."""
    from gnt_shiftadd.models.transformers import FeedForward
    from gnt_shiftadd.shiftadd.int_shift import integer_linears_
    from gnt_shiftadd.shiftadd.reparameterize import calibrate_int_shift_linears
    from kernels.int_shift import int_ffn_sublayer

    record = {"tokens": tokens, "rounds": rounds, "modes": {}}
    for act_scale in ("per_token", "per_tensor"):
        torch.manual_seed(0)
        norm = torch.nn.LayerNorm(32, eps=1e-6).eval()
        ff = integer_linears_(FeedForward(32, 128).eval(), act_scale=act_scale)
        if act_scale == "per_tensor":
            calibrate_int_shift_linears(ff, lambda: ff(norm(torch.randn(256, 32))))
        fc1, fc2 = (prepare_int_shift(export_int_shift(layer)) for layer in (ff.fc1, ff.fc2))
        ln_w, ln_b = norm.weight.detach(), norm.bias.detach()
        x = torch.randn(tokens, 32)
        default = int_ffn_sublayer(x, ln_w, ln_b, 1e-6, fc1, fc2)
        calls = {}
        for tile, blocks in FFN_TILE_CANDIDATES:
            def call(tile=tile, blocks=blocks):
                return int_ffn_sublayer(x, ln_w, ln_b, 1e-6, fc1, fc2, tile=tile, blocks=blocks)
            if not torch.equal(call(), default):
                raise AssertionError(f"int_ffn_sublayer {tile} x {blocks} differs from the default tile")
            calls[f"{tile}x{blocks[0]}x{blocks[1]}"] = call
        per_round = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                per_round[name].append(_time(call, repeats)[0])
        rows = {name: {"ms": statistics.median(times), "rounds_ms": times} for name, times in per_round.items()}
        fastest = min(rows, key=lambda name: rows[name]["ms"])
        for name, row in rows.items():
            print(f"  ffn sublayer {act_scale:<10} tile x fc1 x fc2 blocks {name:<8} {row['ms']:7.3f} ms"
                  f"{'  (fastest)' if name == fastest else ''}", flush=True)
        record["modes"][act_scale] = {"rows": rows, "fastest": fastest}
    return record


def view_attention_options(points: int, repeats: int, views: int = 6, channels: int = 32, hidden: int = 4) -> dict:
    """What integer k|v could buy in GNT's view attention: the fused fp32 kernel (kernels/view_attention.py), the
    same kernel built to read k|v from memory instead of computing it (so: the cost of everything else: pos MLP,
    attention MLP, masked softmax over the views, weighted sum), and the k|v product alone as one integer shift
    layer (C -> 2C, 8-bit per-token activations, power-of-two int8 weights) on the VNNI kernel."""
    from kernels.view_attention import PreparedViewWeights, make_view_attention, reference_view_attention, TILE as VA_TILE, \
        view_attention

    torch.manual_seed(0)
    points -= points % VA_TILE
    linears = {name: torch.nn.Linear(i, o) for name, (i, o) in {"k": (channels, channels), "v": (channels, channels),
               "pos1": (4, hidden), "pos2": (hidden, channels), "attn1": (channels, hidden), "attn2": (hidden, channels)}.items()}
    shifts = {name: IntShiftLinear.from_linear(layer, ShiftSpec(exponent_min=-6), 8, "per_token").eval()
              for name, layer in linears.items()}
    decoded = {name: layer.effective_weight().detach() for name, layer in shifts.items()}
    weights = {"k": decoded["k"], "v": decoded["v"]}
    for name in ("pos1", "pos2", "attn1", "attn2"):
        weights[f"{name}_w"], weights[f"{name}_b"] = decoded[name], linears[name].bias.detach()
    prepared = PreparedViewWeights.from_dict(weights)
    qp, features = torch.randn(points, channels), torch.randn(points, views, channels)
    ray_diff, mask = torch.randn(points, views, 4), (torch.rand(points, views) > 0.2).float()
    expected = reference_view_attention(qp, features, ray_diff, mask, weights)
    kv = kernel_ready(torch.cat([features @ weights["k"].t(), features @ weights["v"].t()], dim=-1))
    without_kv = _build(make_view_attention(cpu_target(), views, channels, hidden, kv_input=True))
    out = torch.empty(points, channels)
    arguments = [kernel_ready(qp).view(-1, VA_TILE, channels), kernel_ready(features).view(-1, VA_TILE, views, channels),
                 kernel_ready(ray_diff).view(-1, VA_TILE, views, 4), kernel_ready(mask).view(-1, VA_TILE, views),
                 kv.view(-1, VA_TILE, views, 2 * channels), *prepared.kernel_arguments()[1:], out.view(-1, VA_TILE, channels)]
    packed = export_int_shift(shifts["k"])
    packed_v = export_int_shift(shifts["v"])
    kv_layer = prepare_int_shift({**packed, "weight_int": torch.cat([packed["weight_int"], packed_v["weight_int"]]),
                                  "out_scale": torch.cat([packed["out_scale"], packed_v["out_scale"]]),
                                  "bias": torch.zeros(2 * channels)})
    rows_in = features.reshape(-1, channels)
    options = {"fp32_fused": lambda: view_attention(qp, features, ray_diff, mask, prepared),
               "fp32_fused_without_kv": lambda: (without_kv(*arguments), out)[1],
               "int8_kv_layer_alone": lambda: int_shift(rows_in, kv_layer)}
    kv_macs = points * views * channels * 2 * channels
    rows = {}
    for name, fn in options.items():
        result = fn()
        if name != "int8_kv_layer_alone":
            torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
        ms, cpu_ms = _time(fn, repeats)
        rows[name] = {"ms": ms, "cpu_ms": cpu_ms}
        print(f"  view attention {name:<24} {ms:8.2f} ms wall {cpu_ms:8.2f} ms CPU", flush=True)
    full, rest, integer = (rows[n]["ms"] for n in ("fp32_fused", "fp32_fused_without_kv", "int8_kv_layer_alone"))
    return {"points": points, "views": views, "channels": channels, "hidden": hidden, "kv_macs": kv_macs, "rows": rows,
            "kv_share_of_fp32_kernel": (full - rest) / full, "fp32_kv_gmac_per_s": kv_macs / (full - rest) / 1e6,
            "int8_kv_gmac_per_s": kv_macs / integer / 1e6,
            "fused_int8_kv_estimate_ms": rest + integer,
            "note": ("fused_int8_kv_estimate_ms = the kernel without k|v + the integer k|v layer alone: a sum of two "
                     "measured kernels (the integer one writes k|v to memory), not a kernel that exists")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tokens", type=int, default=49152, help="tokens per call (default: one fern chunk)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sections", nargs="+", choices=("layers", "ffn", "ffn_tiles", "view_attention"),
                        default=["layers", "ffn", "ffn_tiles", "view_attention"],
                        help="what to measure (default: all)")
    parser.add_argument("--loaded-machine", action="store_true",
                        help="record that other work shared the cores (numbers then only rank the options)")
    args = parser.parse_args(argv)
    if not vnni_available():
        raise SystemExit("int_shift_options: this CPU has no AVX-512 VNNI; nothing to compare")
    match_tvm_threads_to_torch()  # TVM's pool gets torch's threads, as in every render
    tune_cpu_allocator()  # as every render does: output buffers are reused, not page-faulted in per call
    tokens = args.tokens - args.tokens % TILE
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "allocator": allocator_state(),
              "tokens": tokens, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "loaded_machine": bool(args.loaded_machine),
              "note": ("cores shared with other jobs during this run: use the numbers to rank options, not as "
                       "speeds") if args.loaded_machine else "", "shapes": []}
    for in_features, out_features in SHAPES if "layers" in args.sections else []:
        torch.manual_seed(0)
        dense = torch.nn.Linear(in_features, out_features)
        layer = IntShiftLinear.from_linear(dense, ShiftSpec(exponent_min=-6), 8, "per_tensor").eval()
        x = torch.randn(tokens, in_features) * 2
        layer.activation_absmax.fill_(float(x.abs().amax()) * 0.9)  # a calibrated scale (a few values saturate)
        packed = export_int_shift(layer)
        expected = int_shift_reference(x, packed)
        macs = tokens * in_features * out_features
        rows = {}

        def add(name, fn, exact=True, reference=None, note=None):
            """Check fn against `reference` (default: the per-tensor 8-bit layer's), time it, record the row."""
            out = fn()
            same = bool(torch.equal(out, expected if reference is None else reference)) if exact else None
            if exact and not same:
                raise AssertionError(f"{name} ({in_features}->{out_features}) does not match the integer reference")
            ms, cpu_ms = _time(fn, args.repeats)
            rows[name] = {"ms": ms, "cpu_ms": cpu_ms, "gmac_per_s": macs / ms / 1e6,
                          "gmac_per_cpu_s": macs / cpu_ms / 1e6, "bit_exact": same} | ({"note": note} if note else {})
            print(f"  {in_features:>3}->{out_features:<3} {name:<22} {ms:8.2f} ms wall {cpu_ms:8.2f} ms CPU "
                  f"{macs / cpu_ms / 1e6:7.1f} GMAC/CPU-s", flush=True)

        print(f"shape [{tokens}, {in_features}] x [{in_features}, {out_features}]", flush=True)
        for tile, blocks in ((4, 4), (8, 2), (2, 8), (4, 2), (4, 1), (8, 1), (2, 4)):
            weights = prepare_int_shift(packed)
            add(f"vnni_u8s8_{tile}x{blocks}", lambda w=weights, t=tile, b=blocks: int_shift(x, w, tile=t, blocks=b))
        # the model's form (configs/shiftadd/h_int8_shift_ffn.yaml): a scale per token, at the default micro-tile
        per_token = export_int_shift(IntShiftLinear.from_linear(dense, ShiftSpec(exponent_min=-6), 8, "per_token").eval())
        weights_per_token = prepare_int_shift(per_token)
        add("vnni_u8s8_per_token", lambda: int_shift(x, weights_per_token), reference=int_shift_reference(x, per_token),
            note="scale per token (its own reference), default micro-tile")
        layer16 = IntShiftLinear.from_linear(dense, ShiftSpec(exponent_min=-6), 16, "per_tensor").eval()
        layer16.activation_absmax.copy_(layer.activation_absmax)
        packed16 = export_int_shift(layer16)
        weights16 = prepare_int_shift(packed16)
        add("vnni_s16s16", lambda: int_shift(x, weights16), reference=int_shift_reference(x, packed16),
            note="16-bit activations (its own reference)")

        w_int = packed["weight_int"].to(torch.int32)
        inv = torch.tensor([127.0]) / packed["absmax"]
        scale = packed["absmax"] / torch.tensor([127.0])
        tiles = kernel_ready(x).view(-1, TILE, in_features)
        y = torch.empty(tokens // TILE, TILE, out_features)
        common = [tiles, kernel_ready(inv), kernel_ready(scale), kernel_ready(packed["out_scale"]),
                  kernel_ready(packed["bias"])]
        mul = _build(_te_option(in_features, out_features, "mul"))
        w_t = kernel_ready(w_int.t().contiguous())
        add("llvm_int_mul", lambda: (mul(*common, w_t, y), y.view(tokens, out_features))[1])
        shift = _build(_te_option(in_features, out_features, "shift"))
        exponent = kernel_ready(torch.where(w_int != 0, torch.log2(w_int.abs().float().clamp_min(1)), 0)
                                .round().to(torch.int32).t().contiguous())
        sign = kernel_ready(torch.sign(w_int).to(torch.int32).t().contiguous())
        add("llvm_var_shift", lambda: (shift(*common, exponent, sign, y), y.view(tokens, out_features))[1])

        float_layer = layer.effective_weight().detach()
        codes = layer.export_codes()
        add("mat_shift_fp32", lambda: mat_shift(x, codes), exact=False)
        add("blas_fp32", lambda: F.linear(x, float_layer, layer.bias.detach()), exact=False)
        w8 = packed["weight_int"].t().contiguous()

        def int_mm():
            q = torch.round(x * inv).clamp_(-127, 127).to(torch.int8)
            acc = torch._int_mm(q, w8)
            return (acc.float() * scale) * packed["out_scale"] + packed["bias"]

        add("torch_int_mm_unfused", int_mm, exact=False)
        fastest = min(rows, key=lambda name: rows[name]["cpu_ms" if args.loaded_machine else "ms"])
        record["shapes"].append({"in": in_features, "out": out_features, "macs": macs, "rows": rows,
                                 "fastest": fastest})
    if "ffn" in args.sections:
        record["ffn"] = ffn_options(tokens, args.repeats)
    if "ffn_tiles" in args.sections:
        record["ffn_tiles"] = ffn_tile_options(tokens, args.repeats)
    if "view_attention" in args.sections:
        record["view_attention"] = view_attention_options(tokens, args.repeats)
    record["tvm_threads"] = tvm_thread_count()
    write_record(args.out, record, indent=2, note="wrote")
    return record


if __name__ == "__main__":
    with torch.no_grad():
        main()
