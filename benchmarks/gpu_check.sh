#!/usr/bin/env bash
# The one-command GPU check: on one H200 it finishes in <= 9 minutes and writes everything under $OUT (or the
# folder given). Prepare the carry folder first, on a machine with TVM's compiler:
#     python benchmarks/prepare_gpu_carry.py            # -> gpu_carry/ (wheels, TVM runtime, AOT CUDA kernels, fern)
# then, on the GPU machine, from the repository root:
#     bash benchmarks/gpu_check.sh [--carry gpu_carry] [OUT_DIR]
# CPU dry run of the same steps at tiny sizes (llvm AOT kernels, a procedural scene, seconds to a minute):
#     python benchmarks/prepare_gpu_carry.py --dry-run --carry /tmp/carry && bash benchmarks/gpu_check.sh --dry-run --carry /tmp/carry /tmp/out
#
# Stages (benchmarks/gpu_check.py), each under its own timeout inside one overall budget, so a failure in one
# still returns the others' results: env, kernel tests (tests/kernels/test_cuda_kernels.py + the self-check JSON),
# train configs/fern_gpu.yaml for a wall-clock budget + held-out PSNR/SSIM/LPIPS, latency of one fern frame
# (dense eager fp32 / bf16 / torch.compile vs every ShiftAdd variant on the reference and on the AOT kernels),
# summary (gpu_check.json: device, versions, command, per-stage status). stages.tsv: name, rc, seconds, timeout.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
CARRY=gpu_carry
OUT_DIR="${OUT:-gpu_check_out}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --carry) CARRY="$2"; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) OUT_DIR="$1" ;;
    esac
    shift
done
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
CARRY="$(cd "$CARRY" 2>/dev/null && pwd)" || { echo "error: carry folder $CARRY not found: run benchmarks/prepare_gpu_carry.py first" >&2; exit 2; }
export PYTHONUNBUFFERED=1
START=$(date +%s)
TOTAL_BUDGET=${GPU_CHECK_BUDGET_S:-530}   # the whole check, machine start excluded: <= 9 minutes
: > "$OUT_DIR/stages.tsv"

# --- the carried packages into a temporary target (no registry there) ---------------------------------------
SITE="$(mktemp -d)/site"
mkdir -p "$SITE"
if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$CARRY"/wheels/*.whl \
        || for wheel in "$CARRY"/wheels/*.whl; do "$PY" -m zipfile -e "$wheel" "$SITE"; done
fi
if [ "$DRY_RUN" = 1 ]; then
    # the dry run must not reach TVM's compiler either, exactly like the GPU machine (which has none)
    cp benchmarks/no_tvm_compiler.py "$SITE/sitecustomize.py"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SHIFTADD_GNT_TVM_RUNTIME="$CARRY/tvm_runtime"
export SHIFTADD_GNT_CACHE="$CARRY/cache"      # converted LPIPS weights; the MoE latency cache lands here too
mkdir -p "$SHIFTADD_GNT_CACHE"

if [ "$DRY_RUN" = 1 ]; then
    export SHIFTADD_GNT_AOT_KERNELS="$CARRY/kernels_llvm"
    DEVICE=cpu
    CONFIG=configs/default.yaml
    SCENE_ARGS=("data.scene=$CARRY/scene" "data.make_synthetic=false")
    read -r -a MODEL_ARGS < "$CARRY/dry_run_overrides.txt"   # the tiny model the llvm kernels were exported for
    TRAIN_MINUTES=0.05; TRAIN_ARGS=("train.steps=100000" "train.val_every=0" "train.ckpt_every=100000" "eval.lpips=false"
                                    "render.kernels=torch")
    # the dry run has no device lease to respect: a generous row budget so a busy CPU still times every row
    LATENCY_ARGS=(--repeats 1 --budget-seconds 200 --skip-compile --variants a_dense,c_hash_shift_linears)
    KERNEL_ARGS=(--quick)
    T_ENV=60; T_KERNELS=120; T_TRAIN=240; T_LATENCY=240
else
    export SHIFTADD_GNT_AOT_KERNELS="$CARRY/kernels_cuda"
    DEVICE=cuda
    CONFIG=configs/fern_gpu.yaml
    SCENE_ARGS=("data.scene=$CARRY/fern")
    MODEL_ARGS=()
    TRAIN_MINUTES=${GPU_CHECK_TRAIN_MINUTES:-3.25}
    # held-out quality on the PyTorch modules under the config's bf16 autocast (the fp32 TVM kernels take fp32
    # inputs only); the kernels are checked in the latency stage, on fp32 frames
    TRAIN_ARGS=("train.steps=100000" "train.val_every=0" "train.ckpt_every=100000" "render.kernels=torch")
    LATENCY_ARGS=(--repeats 2 --budget-seconds 110 "eval.stride=2")
    KERNEL_ARGS=()
    T_ENV=30; T_KERNELS=90; T_TRAIN=290; T_LATENCY=140
fi

stage() {  # stage NAME MAX_SECONDS command...: run under min(MAX, what is left of the budget); record rc + time
    local name="$1" limit="$2"; shift 2
    local left=$(( TOTAL_BUDGET - ($(date +%s) - START) ))
    [ "$left" -lt "$limit" ] && limit="$left"
    if [ "$limit" -le 5 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$limit" >> "$OUT_DIR/stages.tsv"
        echo "== $name skipped: out of the overall budget"; return
    fi
    echo "== $name (timeout ${limit}s)"
    local tic=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - tic ))" "$limit" >> "$OUT_DIR/stages.tsv"
}

stage env "$T_ENV" "$PY" benchmarks/gpu_check.py env --out "$OUT_DIR" --device "$DEVICE"
stage kernel_tests "$T_KERNELS" "$PY" -m pytest -q -rs -p no:cacheprovider tests/kernels/test_cuda_kernels.py \
    --junitxml "$OUT_DIR/cuda_kernels.xml"
stage kernels_selfcheck "$T_KERNELS" "$PY" benchmarks/gpu_check.py kernels --out "$OUT_DIR" --device "$DEVICE" "${KERNEL_ARGS[@]}"
stage train "$T_TRAIN" "$PY" benchmarks/gpu_check.py train --out "$OUT_DIR" --device "$DEVICE" --config "$CONFIG" \
    --minutes "$TRAIN_MINUTES" name=gpu_check "${SCENE_ARGS[@]}" "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}"
TEACHER="$OUT_DIR/runs/gpu_check/checkpoints/latest.pt"
stage latency "$T_LATENCY" "$PY" benchmarks/gpu_check.py latency --out "$OUT_DIR" --device "$DEVICE" --config "$CONFIG" \
    --teacher "$TEACHER" "${LATENCY_ARGS[@]}" "${SCENE_ARGS[@]}" "${MODEL_ARGS[@]}"
rm -f "$TEACHER"  # large and reproducible: keep what comes back small
TOTAL_BUDGET=$(( TOTAL_BUDGET + 90 )) stage summary 90 "$PY" benchmarks/gpu_check.py summary --out "$OUT_DIR" \
    --command-line "bash benchmarks/gpu_check.sh$( [ "$DRY_RUN" = 1 ] && echo ' --dry-run') --carry $CARRY $OUT_DIR" \
    $( [ "$DRY_RUN" = 1 ] && echo --dry-run )
echo "GPU check finished in $(( $(date +%s) - START ))s; results in $OUT_DIR (gpu_check.json)"
