#!/usr/bin/env bash
# The small and medium cells of the real grid (16 AutoQuantize cells) and one validation, through
# Snakemake on a GPU host, as in bench/RESULTS.md ("Small and medium cells through Snakemake").
# Run from the repository root on the GPU machine; LIMIT_S bounds Snakemake's wall time; the
# summary (wall per rule and per job, start-up per job) goes to $OUT.
source bench/gpu_env.sh || exit 1
W=${WORKDIR:-/tmp/g2}; LIMIT_S=${LIMIT_S:-360}
mkdir -p "$W/results/.cache"
[ -f .devcache/ext.tgz ] && tar xzf .devcache/ext.tgz -C "$W/results/.cache"   # a warm extension cache, if carried
python3 bench/grid_bench.py prepare --workdir "$W" > "$W/prep.log" 2>&1 || { tail "$W/prep.log"; exit 1; }
R=$W/results/autoquant; T=""
for m in qwen2_5_vl_3b qwen3_vl_4b; do for f in wint8_aint8 wfp8_afp8; do for s in lm-only all-layers; do for z in small medium; do
  T="$T $R/$m/$f/$s/$z/quant_manifest.json"; done; done; done; done
T="$T $R/qwen2_5_vl_3b/wint8_aint8/all-layers/medium/validation.json"
start=$(date +%s)
echo "[{\"command\": \"bench/grid_subset.sh\", \"validation\": true, \"exit\": null, \"started\": $start, \"wall_s\": null}]" > "$W/runs.json"
timeout "$LIMIT_S" python3 -m snakemake $T --snakefile "$PWD/Snakefile" --directory "$W" --configfile "$W/grid_config.yaml" \
  --replace-workflow-config --cores 4 --resources gpu=1 > "$W/smk.log" 2>&1
echo "snakemake exit $? wall $(( $(date +%s) - start )) s"
python3 bench/grid_bench.py summary --workdir "$W" --out "$OUT" | tail -40
cp /tmp/vlmsens-*/*.log "$OUT/" 2>/dev/null; cp "$W/smk.log" "$OUT/"; true
