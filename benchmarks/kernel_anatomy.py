"""Why a fused CPU kernel runs at the speed it does, on a machine without hardware counters (on this VM `perf stat`
reports cycles and instructions as not supported). For each kernel at the model's shapes (fern_blend: C = 32,
6 views, 24 samples per ray, FFN hidden 128):

  working set   ms per 49,152 tokens for one call on a whole render chunk (inputs of 6 MB for an FFN, 38 MB for
                a view attention) and for 16 calls on 3,072 tokens (0.4-2.4 MB, in the cores' caches): equal
                times mean the kernel is not bound by memory bandwidth;
  threads       the same with TVM on 1 thread and on 2 (each in its own process: TVM sizes its pool once);
  code          the compiled kernel's instructions (objdump of the exported library, the function holding its
                loops), by class: int8 dot products (vpdpbusd), fp32 multiply-adds and multiplies, other vector
                instructions, scalar and control. Static counts of the code, not instructions retired: loops over
                output blocks run their body more than once. They say how much of the code is the products that
                a fraction of the peak counts.

  parts         for k's integer view sublayer (the largest integer kernel of a frame): its time per part, the
                kernel built with each part (positions, k|v, logits, softmax, q_fc, out_fc) left out in turn.

  python benchmarks/kernel_anatomy.py --out results/kernel_anatomy_cpu.json [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.runtime import quiet_openmp_workers  # noqa: E402 (before torch: libgomp reads it once)

quiet_openmp_workers()

import torch  # noqa: E402
from torch import nn  # noqa: E402

CHUNK_TOKENS, SMALL_TOKENS, SAMPLES, VIEWS, CHANNELS, HIDDEN, HEADS = 49152, 3072, 24, 6, 32, 128, 4
PART_ROUNDS = 7  # rounds of the view sublayer's time per part (a part's time: the median of its per-round times)


def _static_view_layers(norm: nn.Module):
    """k's integer view attention layers (calibrated per-tensor scales, on random inputs of the model's kind) in the
    kernel layout: (IntViewWeights, IntViewSublayerWeights)."""
    from gnt_shiftadd.models.transformers import ViewAttention
    from gnt_shiftadd.shiftadd.int_shift import integer_linears_
    from gnt_shiftadd.shiftadd.reparameterize import calibrate_int_shift_linears
    from kernels import int_view_attention

    static_view = integer_linears_(ViewAttention(CHANNELS).eval(), act_scale="per_tensor")
    calibrate_int_shift_linears(static_view, lambda: static_view(
        torch.randn(256, 1, CHANNELS), torch.randn(256, 1, VIEWS, CHANNELS), torch.randn(256, 1, VIEWS, 4),
        torch.ones(256, 1, VIEWS, 1)))
    return (int_view_attention.IntViewWeights.from_module(static_view),
            int_view_attention.IntViewSublayerWeights.from_modules(norm, static_view))


def view_sublayer_parts(repeats: int) -> dict:
    """Time per part of k's and l's integer view sublayer (per tensor, LN in the kernel) on a whole chunk: the kernel
    built with each part of int_view_attention.PARTS left out in turn (its output then wrong), rounds alternating
    between the full kernel and the ablated ones; a part's ms = the median over rounds of the full kernel's time
    minus the kernel's without it in the same round. Parts overlap in the core, so they need not sum to the whole."""
    import tvm

    from kernels.build import cpu_target
    from kernels.int_view_attention import PARTS, make_int_view_attention

    torch.manual_seed(0)
    norm = nn.LayerNorm(CHANNELS, eps=1e-6).eval()
    weights, sub = _static_view_layers(norm)
    tokens = CHUNK_TOKENS
    x, features = torch.randn(tokens, 1, CHANNELS), torch.randn(tokens, VIEWS, CHANNELS)
    ray_diff, mask = torch.randn(tokens, VIEWS * 4) * 0.3, (torch.rand(tokens, VIEWS) > 0.2).float()
    out = torch.empty(tokens, 1, CHANNELS)
    args = (x, x, sub.ln_w, sub.ln_b, features, ray_diff, mask, *weights.tensors(), *sub.tensors()[2:], out)
    target = tvm.target.Target(cpu_target())
    kernels = {}
    for left_out in ((),) + tuple((part,) for part in PARTS):
        main = tvm.compile(make_int_view_attention(VIEWS, CHANNELS, sublayer=True, eps=sub.eps, per_token=False,
                                                   leave_out=frozenset(left_out)), target=target)["main"]
        kernels["full" if not left_out else "without_" + left_out[0]] = (lambda main=main: main(*args))
    rounds = {name: [] for name in kernels}
    for _ in range(PART_ROUNDS):
        for name, run in kernels.items():
            rounds[name].append(_median_ms(run, 1, repeats))
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    # a part's time per round (the full kernel's minus the ablated one's, timed next to each other), then the median
    parts = {part: statistics.median(full - without for full, without in zip(rounds["full"], rounds["without_" + part]))
             for part in PARTS}
    return {"ms": medians, "part_ms": parts, "rounds_ms": rounds}


def kernel_cases() -> dict:
    """name -> (call(tokens) -> a function that runs the kernel once on that many tokens, the IRModule maker
    (target -> IRModule) whose code is counted)."""
    from gnt_shiftadd.models.transformers import FeedForward, RayAttention, ViewAttention
    from gnt_shiftadd.shiftadd.hashed_attention import HashedQuadraticAttention
    from gnt_shiftadd.shiftadd.int_shift import export_int_shift, integer_linears_
    from gnt_shiftadd.shiftadd.reparameterize import calibrate_int_shift_linears
    from kernels import ffn, int_ray_attention, int_shift, int_view_attention, ray_attention, view_attention
    from kernels.apply import KernelRayAttentionSublayer

    torch.manual_seed(0)
    dense_view = ViewAttention(CHANNELS).eval()
    view_weights = view_attention.PreparedViewWeights.from_dict(view_attention.view_attention_weights(dense_view))
    int_view = integer_linears_(ViewAttention(CHANNELS).eval())
    norm = nn.LayerNorm(CHANNELS, eps=1e-6).eval()
    int_weights = int_view_attention.IntViewWeights.from_module(int_view)
    int_sub = int_view_attention.IntViewSublayerWeights.from_modules(norm, int_view)
    dense_ff = FeedForward(CHANNELS, HIDDEN).eval()
    ffn_w = ffn.ffn_weights(norm, dense_ff)
    int_ff = integer_linears_(FeedForward(CHANNELS, HIDDEN).eval())
    fc1, fc2 = (int_shift.prepare_int_shift(export_int_shift(layer)) for layer in (int_ff.fc1, int_ff.fc2))
    ln_w, ln_b = norm.weight.detach(), norm.bias.detach()
    ray = RayAttention(CHANNELS, HEADS).eval()
    ray.core = HashedQuadraticAttention(HEADS, CHANNELS // HEADS, 16).eval()
    ray_w = KernelRayAttentionSublayer(norm, ray).weights
    int_ray = integer_linears_(RayAttention(CHANNELS, HEADS).eval())
    int_ray.core = ray.core
    int_ray_w = int_ray_attention.IntRayWeights.from_modules(norm, int_ray)
    # k's kernels: the same blocks with calibrated per-tensor scales (calibrated on random inputs of the same kind)
    static_weights, static_sub = _static_view_layers(norm)
    static_ff = integer_linears_(FeedForward(CHANNELS, HIDDEN).eval(), act_scale="per_tensor")
    calibrate_int_shift_linears(static_ff, lambda: static_ff(norm(torch.randn(256, CHANNELS))))
    static_fc1, static_fc2 = (int_shift.prepare_int_shift(export_int_shift(layer))
                              for layer in (static_ff.fc1, static_ff.fc2))
    static_ray = integer_linears_(RayAttention(CHANNELS, HEADS).eval(), act_scale="per_tensor")
    static_ray.core = ray.core
    calibrate_int_shift_linears(static_ray, lambda: static_ray(norm(torch.randn(16, SAMPLES, CHANNELS))))
    static_ray_w = int_ray_attention.IntRayWeights.from_modules(norm, static_ray)

    def view_inputs(tokens):
        return (torch.randn(tokens, CHANNELS), torch.randn(tokens, VIEWS, CHANNELS), torch.randn(tokens, VIEWS, 4),
                (torch.rand(tokens, VIEWS) > 0.2).float())

    def on(tokens, make):
        inputs = view_inputs(tokens)
        return lambda: make(*inputs)

    rays = lambda tokens: torch.randn(tokens // SAMPLES, SAMPLES, CHANNELS)  # noqa: E731
    return {
        "view_attention": (lambda n: on(n, lambda q, f, d, m: view_attention.view_attention(q, f, d, m, view_weights)),
                           lambda t: view_attention.make_view_attention(t, VIEWS, CHANNELS, CHANNELS // 8)),
        "int_view_attention": (lambda n: on(n, lambda q, f, d, m: int_view_attention.int_view_attention(
            q, f, d, m, int_weights)), lambda t: int_view_attention.make_int_view_attention(VIEWS, CHANNELS)),
        "int_view_sublayer": (lambda n: on(n, lambda q, f, d, m: int_view_attention.int_view_sublayer(
            q, f, d, m, int_weights, int_sub)), lambda t: int_view_attention.make_int_view_attention(
            VIEWS, CHANNELS, sublayer=True, eps=1e-6)),
        "ffn_sublayer": (lambda n: (lambda x: lambda: ffn.ffn_sublayer(x, ffn_w))(torch.randn(n, CHANNELS)),
                         lambda t: ffn.make_ffn_sublayer(t, CHANNELS, HIDDEN, 1, 1e-6)),
        "int_ffn_sublayer": (lambda n: (lambda x: lambda: int_shift.int_ffn_sublayer(x, ln_w, ln_b, 1e-6, fc1, fc2))(
            torch.randn(n, CHANNELS)), lambda t: int_shift.make_int_ffn(
            CHANNELS, HIDDEN, 8, True, int_shift.FFN_TILE, int_shift.FFN_BLOCKS, norm_eps=1e-6)),
        "ray_attention_hashed": (lambda n: (lambda x: lambda: ray_attention.ray_attention(x, ray_w))(rays(n)),
                                 lambda t: ray_attention.make_ray_attention(t, SAMPLES, CHANNELS, HEADS, "hashed",
                                                                            16, 1e-6)),
        "int_ray_attention": (lambda n: (lambda x: lambda: int_ray_attention.int_ray_attention(x, int_ray_w))(
            rays(n)), lambda t: int_ray_attention.make_int_ray_attention(SAMPLES, CHANNELS, HEADS, 16, 1e-6)),
        "int_view_sublayer[per_tensor]": (lambda n: on(n, lambda q, f, d, m: int_view_attention.int_view_sublayer(
            q, f, d, m, static_weights, static_sub)), lambda t: int_view_attention.make_int_view_attention(
            VIEWS, CHANNELS, sublayer=True, eps=1e-6, per_token=False)),
        "int_ffn_sublayer[per_tensor]": (lambda n: (lambda x: lambda: int_shift.int_ffn_sublayer(
            x, ln_w, ln_b, 1e-6, static_fc1, static_fc2))(torch.randn(n, CHANNELS)), lambda t: int_shift.make_int_ffn(
            CHANNELS, HIDDEN, 8, False, int_shift.FFN_TILE, int_shift.FFN_BLOCKS, norm_eps=1e-6)),
        "int_ray_attention[per_tensor]": (lambda n: (lambda x: lambda: int_ray_attention.int_ray_attention(
            x, static_ray_w))(rays(n)), lambda t: int_ray_attention.make_int_ray_attention(
            SAMPLES, CHANNELS, HEADS, 16, 1e-6, per_token=False)),
    }


def _median_ms(fn, calls: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def worker(repeats: int) -> dict:
    """ms per CHUNK_TOKENS tokens for every kernel, whole chunk vs in-cache pieces (this process's TVM threads)."""
    from kernels.build import match_tvm_threads_to_torch, tvm_thread_count
    from kernels.dispatch import recording

    match_tvm_threads_to_torch()
    result = {"tvm_threads": tvm_thread_count(), "kernels": {}}
    if tvm_thread_count() > 1:
        result["view_sublayer_parts"] = view_sublayer_parts(repeats)
    for name, (call, _) in kernel_cases().items():
        whole, small = call(CHUNK_TOKENS), call(SMALL_TOKENS)
        record: dict = {}
        with recording(record):
            whole()
        if set(record.values()) != {"tvm"}:
            raise SystemExit(f"kernel_anatomy: {name} did not run on TVM ({record})")
        rounds = {"whole_chunk": [], "in_cache": []}
        for _ in range(3):  # alternate, so a drift in the machine's speed reaches both alike
            rounds["whole_chunk"].append(_median_ms(whole, 1, repeats))
            rounds["in_cache"].append(_median_ms(small, CHUNK_TOKENS // SMALL_TOKENS, repeats))
        result["kernels"][name] = {key: statistics.median(values) for key, values in rounds.items()} | {
            "rounds_ms": rounds}
    return result


def _classify(mnemonic: str) -> str:
    if mnemonic.startswith(("vpdpbusd", "vpdpwssd")):
        return "int8_dot"
    if re.match(r"vf(n)?m(add|sub)", mnemonic):
        return "fp32_fma"
    if mnemonic.startswith(("vmulps", "vmulss")):
        return "fp32_mul"
    if mnemonic.startswith("v") or mnemonic.startswith("k"):
        return "vector_other"
    return "scalar_control"


def instruction_mix(make, workdir: Path, name: str) -> dict:
    """Static instruction counts by class in the function of the compiled kernel that holds the most vector
    instructions (its loops; the argument checks of the entry point are left out)."""
    import tvm

    from kernels.build import cpu_target

    target = cpu_target()
    library = workdir / (re.sub(r"[^A-Za-z0-9_]+", "_", name) + ".so")
    tvm.compile(make(target), target=target).export_library(str(library))
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                             check=True).stdout
    functions: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            current = header.group(1)
            functions[current] = []
        elif current and re.match(r"^\s+[0-9a-f]+:\s+\S", line):
            functions[current].append(line.split(":", 1)[1].split()[0])
    body_name, body = max(functions.items(), key=lambda item: sum(m.startswith("v") for m in item[1]))
    counts: dict[str, int] = {}
    for mnemonic in body:
        kind = _classify(mnemonic)
        counts[kind] = counts.get(kind, 0) + 1
    total = sum(counts.values())
    return {"function": body_name, "instructions": total, "by_class": counts,
            "fraction": {kind: count / total for kind, count in counts.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON to write")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.repeats)))
        return 0
    if not args.out:
        parser.error("--out is required")
    from gnt_shiftadd.evaluation.evaluate import environment, write_record
    from kernels.int_shift import vnni_available

    if not vnni_available():
        raise SystemExit("kernel_anatomy: the integer kernels need a CPU with AVX-512 VNNI")
    timings = {}
    for threads in (1, 2):
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        proc = subprocess.run([sys.executable, __file__, "--worker", "--repeats", str(args.repeats)], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"kernel_anatomy worker ({threads} threads) failed:\n{proc.stderr[-3000:]}")
        timings[threads] = json.loads(proc.stdout.strip().splitlines()[-1])
    record = {"command": "python benchmarks/kernel_anatomy.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(), "tokens": {"whole_chunk": CHUNK_TOKENS, "in_cache": SMALL_TOKENS},
              "shapes": {"channels": CHANNELS, "views": VIEWS, "samples": SAMPLES, "ffn_hidden": HIDDEN,
                         "heads": HEADS}, "kernels": {}}
    with tempfile.TemporaryDirectory(prefix="kernel_anatomy_") as workdir:
        for name, (_, make) in kernel_cases().items():
            entry = {f"{threads}_thread{'s' if threads > 1 else ''}": timings[threads]["kernels"][name]
                     for threads in (1, 2)}
            one, two = entry["1_thread"]["whole_chunk"], entry["2_threads"]["whole_chunk"]
            entry["thread_scaling"] = one / two
            entry["in_cache_over_whole"] = entry["2_threads"]["in_cache"] / entry["2_threads"]["whole_chunk"]
            entry["code"] = instruction_mix(make, Path(workdir), name)
            record["kernels"][name] = entry
            mix = entry["code"]["fraction"]
            print(f"{name:22s} {two:6.2f} ms (2 threads; 1 thread x{entry['thread_scaling']:.2f}; in cache "
                  f"x{entry['in_cache_over_whole']:.2f})  code: {entry['code']['instructions']} instructions, "
                  f"{100 * mix.get('int8_dot', 0):.0f}% vpdpbusd, {100 * mix.get('fp32_fma', 0):.0f}% FMA, "
                  f"{100 * mix.get('fp32_mul', 0):.0f}% fp32 mul", flush=True)
    parts = timings[2]["view_sublayer_parts"]
    record["view_sublayer_parts"] = {"kernel": "int_view_sublayer[per_tensor]", "threads": 2} | parts
    print("int_view_sublayer[per_tensor] time per part (full kernel minus the kernel without it, 2 threads): "
          + ", ".join(f"{part} {ms:.2f}" for part, ms in parts["part_ms"].items())
          + f" of {parts['ms']['full']:.2f} ms", flush=True)
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
