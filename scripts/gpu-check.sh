#!/usr/bin/env bash
# What can be checked on a GPU host today, in one short run (GPU time is scarce).
#
#   scripts/gpu-check.sh build   # on a machine with the Rust toolchain (Debian 12, glibc 2.36):
#                                # builds gpu-bundle/ (stripped binaries built with --features cuda)
#   scripts/gpu-check.sh run     # on the GPU host, from the repository root with gpu-bundle/ in it:
#                                # writes $OUT/figures.txt where OUT is set (the device tool's
#                                # folder that comes back, so that a run cut short keeps what it
#                                # measured), else gpu-bundle/figures.txt; also printed
#
# The GPU host has no Rust toolchain and no network; it has a Python with PyTorch whose pip packages
# hold the CUDA libraries (cuBLAS, NVRTC, NCCL) off the default library path, which `run` finds and
# puts on LD_LIBRARY_PATH. `run` checks, each step bounded in time:
#   - the host: GPU, driver, glibc (the binaries were built against glibc 2.36);
#   - which CUDA library names load (cudarc's bindings ask for `.so.12`-style names; CUDA 13 ships
#     `.so.13`);
#   - the CUDA tests: device discovery (`kernels_cuda`), the MoE layer on the GPU against the CPU
#     layer and bit for bit run to run (`model_cuda_moe`), the whole model against the CPU model
#     and 20 training steps against the CPU loop and a second GPU run (`model_cuda_gpt`), and the
#     NCCL communicator on one GPU (`net_nccl`: a single-rank all-to-all-v with itself, bit for
#     bit; an abort), and the actor runtime with one worker exchanging its expert rows through NCCL
#     (`runtime_collectives`: the transport's bits; its stand-in tests run too);
#   - the main job's model on the actor runtime (1 worker) for EXCHANGE_STEPS steps, its expert
#     rows over the transport, through NCCL in process, and through NCCL from a worker process
#     (`--processes 1`: the NCCL ids from the coordinator): the same checkpoint bytes, and the
#     tokens/s of each;
#   - the main job's model trained on the GPU for TRAIN_STEPS steps (`semoe train --device cuda`)
#     within a Device budget of 8 GiB (its tensors' peak printed against it), its validation loss
#     next to the CPU's for the same steps (the same on every CPU, bit for bit);
#   - the MoE layer at the issue's size (16,384 tokens, width 1024, hidden 4096, 8 experts, top-2),
#     semoe's (`semoe bench moe-layer --device cuda`) and PyTorch's, side by side, in float32, TF32
#     and bfloat16, each with the matrix rate cuBLAS reaches at the expert products' size.
# Whole run: about 3 minutes after the host is up when every step passes. The steps' own limits add
# up to more than one command may run, so the run has a budget (GPU_CHECK_BUDGET_S, default 540 s):
# each step is cut to what is left of it less 30 s (the grace a step cut short gets after SIGTERM),
# and a step with under 5 s left is skipped and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=gpu-bundle
# The main job's model trained for TRAIN_STEPS steps (otherwise the defaults) ends at this validation
# loss on the CPU (`semoe train --steps 3000`, 2026-12-06, an AVX-512 machine: an AVX2-only CPU's
# matrix kernels give slightly different bits, so compare to about 1e-3).
TRAIN_STEPS=3000
CPU_VAL_LOSS=1.5575
# Steps of the actor runtime's run over NCCL and over the transport (compared bit for bit).
EXCHANGE_STEPS=200
TESTS=(kernels_cuda model_cuda_moe model_cuda_gpt net_nccl runtime_collectives)

build() {
    set -e
    rm -rf "$BUNDLE"
    mkdir -p "$BUNDLE"
    # No debug info: the bundle travels to the host (it must stay well under 64 MiB). A target
    # folder of its own, so that the usual release build is left as it is.
    export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_TARGET_DIR=target/gpu-check
    cargo build --release --features cuda
    cp target/gpu-check/release/semoe "$BUNDLE/semoe"
    local args=()
    for t in "${TESTS[@]}"; do args+=(--test "$t"); done
    # `cargo test --no-run` names each test binary it built: "Executable tests/x.rs (target/...)".
    cargo test --release --features cuda --no-run "${args[@]}" 2>&1 | tee "$BUNDLE/build.log"
    for t in "${TESTS[@]}"; do
        local exe
        exe=$(sed -n "s|.*Executable tests/$t.rs (\(.*\))|\1|p" "$BUNDLE/build.log" | tail -1)
        [ -n "$exe" ] || { echo "no test binary for $t in the build log" >&2; exit 1; }
        cp "$exe" "$BUNDLE/$t"
    done
    strip "$BUNDLE"/semoe "${TESTS[@]/#/$BUNDLE/}"
    rm -f "$BUNDLE/build.log"
    du -sh "$BUNDLE"
    echo "built $BUNDLE/: carry it to the GPU host and run: scripts/gpu-check.sh run"
}

run() {
    [ -x "$BUNDLE/semoe" ] || { echo "no $BUNDLE/semoe: run 'scripts/gpu-check.sh build' first" >&2; exit 1; }
    local out="${OUT:-$BUNDLE}/figures.txt"
    : > "$out"
    local deadline=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-540} ))
    say() { echo "$*" | tee -a "$out"; }
    step() { # step SECONDS TITLE COMMAND...: run bounded (by its limit and the run's budget)
        local limit=$1 title=$2
        shift 2
        local left=$(( deadline - $(date +%s) ))
        say ""
        # A step cut short gets SIGTERM, and 30 s more to end (semoe train then finishes its step,
        # evaluates and checkpoints) before SIGKILL: within the budget too.
        [ $((left - 30)) -lt "$limit" ] && limit=$((left - 30))
        if [ "$limit" -lt 5 ]; then
            say "== $title: skipped (the run's budget is spent)"
            return
        fi
        say "== $title ($(date -u +%H:%M:%S), up to ${limit} s)"
        timeout -k 30 "$limit" "$@" 2>&1 | tee -a "$out"
        local rc=${PIPESTATUS[0]}
        [ "$rc" = 0 ] || say "!! exit status $rc$([ "$rc" = 124 ] && echo " (cut at ${limit} s)")"
    }
    local py=${PYTHON:-python3}
    say "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    step 30 "host" bash -c 'nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; ldd --version | head -1; uname -r; nproc'
    # The CUDA libraries of PyTorch's pip packages (nvidia/*/lib), first on the library path.
    local libs
    libs=$("$py" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = set()
for base in nvidia.__path__:
    dirs.update(d for d in glob.glob(os.path.join(base, "*", "lib")) if os.path.isdir(d))
print(":".join(sorted(dirs)))
EOF
)
    if [ -n "$libs" ]; then
        export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        say "LD_LIBRARY_PATH += PyTorch's CUDA libraries ($(echo "$libs" | tr ':' '\n' | wc -l) folders)"
    else
        say "no nvidia pip packages under $py: the system's library path only"
    fi
    # cudarc opens `libX.so`, `libX.so.<its CUDA major>`, `.so.12`, `.so.11`, ... `.so.1`: NCCL's
    # `libnccl.so.2` and CUDA 13's `.so.13` are not among them. Where only such a name exists, an
    # unversioned link to it goes into $BUNDLE/lib-links (first on the path), and says so.
    mkdir -p "$BUNDLE/lib-links"
    for lib in cublas cublasLt nvrtc nccl curand; do
        local have="" newest="" path="${LD_LIBRARY_PATH:-}"
        for d in ${path//:/ } /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/lib64; do
            for n in "lib$lib.so" "lib$lib.so.12" "lib$lib.so.11" "lib$lib.so.1"; do
                [ -e "$d/$n" ] && have="$d/$n"
            done
            for f in "$d/lib$lib.so."[0-9]*; do
                [ -e "$f" ] && newest="$f"
            done
        done
        if [ -z "$have" ] && [ -n "$newest" ]; then
            ln -sf "$newest" "$BUNDLE/lib-links/lib$lib.so"
            say "linked lib$lib.so -> $newest"
        fi
    done
    export LD_LIBRARY_PATH="$PWD/$BUNDLE/lib-links${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    step 30 "CUDA library names found" bash -c 'for n in libcuda.so.1 libcublas.so libcublas.so.12 libcublas.so.13 libcublasLt.so.12 libcublasLt.so.13 libnvrtc.so libnvrtc.so.12 libnvrtc.so.13 libnccl.so libnccl.so.2; do
        found=""; for d in ${LD_LIBRARY_PATH//:/ } /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/lib64; do [ -e "$d/$n" ] && found="$d/$n" && break; done
        [ -z "$found" ] && found=$(ldconfig -p 2>/dev/null | awk -v n="$n" "\$1==n {print \$NF; exit}")
        echo "$n: ${found:-not found}"; done'
    step 20 "semoe runs here (glibc)" "$BUNDLE/semoe" --version
    for t in "${TESTS[@]}"; do
        step 120 "test $t" "$BUNDLE/$t" --nocapture --test-threads 1
    done
    local size=(--tokens 16384 --d-model 1024 --d-ff 4096 --experts 8 --k 2 --iters 10 --warmup 3)
    for precision in f32 tf32 bf16; do
        local tf32=""
        [ "$precision" = tf32 ] && tf32=--tf32
        [ "$precision" = bf16 ] && tf32=--bf16
        step 120 "semoe MoE layer on the GPU ($precision)" "$BUNDLE/semoe" bench moe-layer --device cuda \
            --precision "$precision" "${size[@]}"
        step 180 "PyTorch MoE layer on the GPU ($precision)" "$py" bench/moe_layer_torch.py --device cuda \
            "${size[@]}" $tf32
    done
    # The actor runtime, one worker, its expert rows over the transport and through NCCL on GPU 0:
    # the same parameters, bit for bit, and the cost of the round trips through the device.
    for exchange in transport nccl; do
        rm -rf "$BUNDLE/run-$exchange"
        step 180 "the actor runtime, 1 worker, expert rows over $exchange ($EXCHANGE_STEPS steps)" \
            "$BUNDLE/semoe" train --workers 1 --exchange "$exchange" --steps "$EXCHANGE_STEPS" \
            --run-dir "$BUNDLE/run-$exchange" --quiet
    done
    # The same through a worker process: the coordinator makes the NCCL ids and sends them over
    # the control plane; the worker (on GPU 0) builds its communicators from them.
    rm -rf "$BUNDLE/run-process-nccl"
    step 180 "one worker process, expert rows through NCCL ($EXCHANGE_STEPS steps)" \
        "$BUNDLE/semoe" train --processes 1 --exchange nccl --steps "$EXCHANGE_STEPS" \
        --run-dir "$BUNDLE/run-process-nccl" --quiet
    local last="checkpoints/step-$(printf %08d "$EXCHANGE_STEPS")"
    step 10 "the same parameters over NCCL as over the transport" bash -c "
        ok=0
        for run in run-nccl run-process-nccl; do for f in model.safetensors optimizer.safetensors; do
            if cmp '$BUNDLE/run-transport/$last/'\$f '$BUNDLE/'\$run/'$last/'\$f; then
                echo \"\$run \$f: bitwise the same\"
            else
                ok=1
            fi
        done; done
        exit \$ok"
    rm -rf "$BUNDLE/run-gpu"
    step 300 "training on the GPU ($TRAIN_STEPS steps; the CPU reaches validation loss $CPU_VAL_LOSS)" \
        "$BUNDLE/semoe" train --device cuda --device-budget 8GiB --steps "$TRAIN_STEPS" --run-dir "$BUNDLE/run-gpu" --quiet
    say ""
    say "figures in $out"
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *)
        echo "usage: scripts/gpu-check.sh build|run" >&2
        exit 2
        ;;
esac
