#!/usr/bin/env bash
# The speed measurements of bench/RESULTS.md in one GPU lease. Runs its stages one after another
# in the background (its own process session), so they outlast one device command's time limit;
# bench/gpu_poll.sh waits for them and copies what they wrote to $OUT.
#
#   STAGES="ratios grid-no-validation" bash bench/gpu_speed_session.sh
#
# Stages (each in its own fresh work folder under $SESSION_DIR, default /tmp/speed):
#   ratios              the careful baseline (batch 4), ours (batch auto within 24 GiB) and a plain
#                       bf16 forward+backward through our model path, Qwen2.5-VL-3B and Qwen3-VL-4B,
#                       INT8 W8A8 and FP8, 128 samples, all-layers (bench/gpu_cell_bench.py)
#   kernels             autoquant.kernels liger against eager, same samples: ours (128 samples,
#                       batch auto within 24 GiB; liger first with a cold Triton cache, then again)
#                       and a plain forward+backward, INT8 W8A8 all-layers, both families; then
#                       bench/validation_forward_bench.py's held-out forwards with each
#   kernels-validation  autoquant.kernels eager against liger for a whole validation (vlmsens.validation
#                       with config/schema.yaml's settings, 100 synthetic held-out samples) after a
#                       16-sample INT8 cell, lm-only and all-layers, both families
#   profile             bench/validation_forward_bench.py --profile: the held-out forwards of both families,
#                       with the vision geometry made once per batch and on every forward, and where a
#                       forward's GPU time goes (kernel tables, GPU busy time, host calls that wait)
#   grid-no-validation  the 24 cells and the reports through Snakemake, validation off
#   grid                the 24 cells, their validations and the reports through Snakemake
# The grid stages build ModelOpt's CUDA extensions into the run's cache first (untimed, as on a
# host that ran a cell before): built on first use inside a cell, they cost about a minute per format.
# Carry .whl (bench/fetch_wheels.sh) and, if present, .devcache/ext.tgz (ModelOpt's built CUDA
# extensions) and .devcache/triton.tgz (compiled Triton kernels): warm caches of a host that ran before.
source bench/gpu_env.sh || exit 1
S=${SESSION_DIR:-/tmp/speed}; mkdir -p "$S"; rm -f "$S/done"
cat > "$S/run.sh" <<INNER
set -x
cd "$PWD"
warm() {  # warm extension and Triton caches, where carried
  mkdir -p "\$1/torch_extensions" ~/.triton
  [ -f .devcache/ext.tgz ] && tar xzf .devcache/ext.tgz -C "\$1"
  [ -f .devcache/triton.tgz ] && tar xzf .devcache/triton.tgz -C ~/.triton
  true
}
for stage in ${STAGES:-ratios grid-no-validation}; do
  echo "== \$stage \$(date +%T)"
  case \$stage in
    ratios)
      warm "$S/bench"
      python3 bench/gpu_cell_bench.py --workdir "$S/bench" --out "$S/ratios" --gpu-memory-gib 24 \
        --cell baseline:qwen2_5_vl:wint8_aint8:all-layers:128:4 --cell ours:qwen2_5_vl:wint8_aint8:all-layers:128:auto \
        --cell fwdbwd:qwen2_5_vl:wint8_aint8:all-layers:128:16 \
        --cell baseline:qwen3_vl:wint8_aint8:all-layers:128:4 --cell ours:qwen3_vl:wint8_aint8:all-layers:128:auto \
        --cell fwdbwd:qwen3_vl:wint8_aint8:all-layers:128:16 \
        --cell baseline:qwen2_5_vl:wfp8_afp8:all-layers:128:4 --cell ours:qwen2_5_vl:wfp8_afp8:all-layers:128:auto \
        --cell baseline:qwen3_vl:wfp8_afp8:all-layers:128:4 --cell ours:qwen3_vl:wfp8_afp8:all-layers:128:auto ;;
    kernels)
      warm "$S/bench"
      cells=()
      for f in qwen2_5_vl qwen3_vl; do
        cells+=(--cell ours:\$f:wint8_aint8:all-layers:128:auto:liger --cell ours:\$f:wint8_aint8:all-layers:128:auto:eager
                --cell ours:\$f:wint8_aint8:all-layers:128:auto:liger
                --cell fwdbwd:\$f:wint8_aint8:all-layers:128:16:eager --cell fwdbwd:\$f:wint8_aint8:all-layers:128:16:liger)
      done
      python3 bench/gpu_cell_bench.py --workdir "$S/bench" --out "$S/kernels" --gpu-memory-gib 24 "\${cells[@]}"
      TORCH_EXTENSIONS_DIR="$S/bench/torch_extensions" python3 bench/validation_forward_bench.py --workdir "$S/bench" \
        --out "$S/kernels-forward" --kernels eager --kernels liger --skip-patch-embed ;;
    profile)
      warm "$S/bench"
      TORCH_EXTENSIONS_DIR="$S/bench/torch_extensions" python3 bench/validation_forward_bench.py --workdir "$S/bench" \
        --out "$S/profile" --skip-patch-embed --profile ;;
    kernels-validation)
      warm "$S/bench"
      cells=()
      for f in qwen2_5_vl qwen3_vl; do for scope in all-layers lm-only; do for k in eager liger; do
        cells+=(--cell ours:\$f:wint8_aint8:\$scope:16:auto:\$k)
      done; done; done
      python3 bench/gpu_cell_bench.py --workdir "$S/bench" --out "$S/kernels-validation" --gpu-memory-gib 24 \
        --validate --eval-samples 100 "\${cells[@]}" ;;
    grid-no-validation|grid)
      W="$S/\$stage"; warm "\$W/results/.cache"
      python3 bench/grid_bench.py prepare --workdir "\$W"
      # ModelOpt's CUDA extensions are built (JIT) into the run's own cache on first use, about a
      # minute per format; a host that ran a cell before has them: built here, untimed, and reported
      TORCH_EXTENSIONS_DIR="\$W/results/.cache/torch_extensions" python3 -c "import sys; sys.path.insert(0, 'bench'); \\
from gpu_cell_bench import prebuild_extensions; print(f'extensions ready in {prebuild_extensions():.1f} s')"
      python3 bench/grid_bench.py run --workdir "\$W" \$([ \$stage = grid ] || echo --no-validation)
      python3 bench/grid_bench.py summary --workdir "\$W" --out "$S/\$stage-summary" ;;
  esac
done
tar czf "$S/triton.tgz" -C ~/.triton . 2>/dev/null
echo "== done \$(date +%T)"
INNER
setsid bash "$S/run.sh" > "$S/session.log" 2>&1 < /dev/null &
echo "started: $S/session.log"
