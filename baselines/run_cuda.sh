#!/usr/bin/env bash
# Regenerates baselines/cuda-h200: the canonical grid on one GPU in one lone process, its defaults
# on: trained to convergence (the auto budget on a GPU), fits side by side and captured in CUDA
# graphs, CUDA-graph sampling, the CPU cores but two scoring cells beside the fits. Writes report.md,
# results.csv and figures/ beside the rows. Extra arguments go to 'genbench run'
# (OUT_DIR=baselines/cuda-h100-full bash baselines/run_cuda.sh --budget full). Resumable: re-run to finish.
# GENBENCH='python benchmarks/grid_phases.py' runs it with the phase timers (its time split on stderr);
# MODELS=... trains a part of the grid's models (default: all of them; STEPS=... then names their step counts);
# SEEDS=... other seeds (default 0,1,2; a tuned grid's are not the tune's).
set -u
cd "$(dirname "$0")/.."
out="${OUT_DIR:-baselines/cuda-h200}"
start=$(date +%s)
${GENBENCH:-genbench} run --models "${MODELS:-diffusion,cm,vae,flow,gan}" \
  --datasets ring8,grid25,moons,circles,swissroll,pinwheel,spirals,checkerboard --seeds "${SEEDS:-0,1,2}" \
  --steps "${STEPS:-diffusion=1:2:5:10:20:50:100,cm-cd=1:2:4,cm-ct=1:2:4}" --device cuda --threads 1 \
  --out "$out" "$@" > /dev/null
echo "canonical grid wall time: $(( $(date +%s) - start )) s"
genbench report "$out" --out "$out/report.md" && genbench report "$out" --format csv --out "$out/results.csv"
