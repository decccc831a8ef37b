#!/usr/bin/env bash
# Regenerates baselines/cpu: the canonical grid on the CPU, one single-threaded fit process per
# core (--jobs auto), at the auto budget (the CPU's: default). Writes report.md and results.csv beside
# the rows. Resumable: re-run to finish. A run dir made with other settings (an older metric set) is
# refused rather than mixed: regenerate into a fresh one (OUT_DIR=baselines/cpu-new bash ...).
set -u
cd "$(dirname "$0")/.."
out="${OUT_DIR:-baselines/cpu}"
start=$(date +%s)
genbench run --models diffusion,cm,vae,flow,gan \
  --datasets ring8,grid25,moons,circles,swissroll,pinwheel,spirals,checkerboard --seeds 0,1,2 \
  --steps diffusion=1:2:5:10:20:50:100,cm-cd=1:2:4,cm-ct=1:2:4 --device cpu --threads 1 \
  --out "$out" > /dev/null
echo "canonical grid wall time: $(( $(date +%s) - start )) s"
genbench report "$out" --out "$out/report.md" && genbench report "$out" --format csv --out "$out/results.csv"
