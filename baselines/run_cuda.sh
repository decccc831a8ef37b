#!/usr/bin/env bash
# Regenerates baselines/cuda-h100: the canonical grid on one GPU, 16 fit processes sharing it (one per CPU core of the H100 machine) (tiny
# MLPs leave a GPU mostly idle), CUDA-graph sampling on. The sample_s columns therefore carry the
# other processes' load; lone-process timings come from 'genbench reproduce' and 'bench-graph'.
# Resumable: re-run to finish.
set -u
cd "$(dirname "$0")/.."
start=$(date +%s)
genbench run --models diffusion,cm,vae,flow \
  --datasets ring8,grid25,moons,circles,swissroll,pinwheel,spirals,checkerboard --seeds 0,1,2 \
  --steps diffusion=1:2:5:10:20:50:100,cm-cd=1:2:4,cm-ct=1:2:4 --device cuda --threads 1 --jobs 16 \
  --param diffusion.cuda_graph=true --param cm-cd.cuda_graph=true --param cm-ct.cuda_graph=true \
  --out "${OUT_DIR:-baselines/cuda-h100}" > /dev/null
echo "canonical grid wall time: $(( $(date +%s) - start )) s"
