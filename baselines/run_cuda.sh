#!/usr/bin/env bash
# Regenerates baselines/cuda-h100: the canonical grid on one GPU, one process per dataset, all at
# once (tiny MLPs leave a GPU mostly idle; 8 processes share it). Resumable: re-run to finish.
set -u
cd "$(dirname "$0")/.."
start=$(date +%s)
for d in ring8 grid25 moons circles swissroll pinwheel spirals checkerboard; do
  genbench run --models diffusion,cm,vae,flow --datasets $d --seeds 0,1,2 \
    --steps diffusion=1:2:5:10:20:50:100,cm-cd=1:2:4,cm-ct=1:2:4 --device cuda --threads 1 \
    --param diffusion.cuda_graph=true --param cm-cd.cuda_graph=true --param cm-ct.cuda_graph=true \
    --out "baselines/cuda-h100/$d" > /dev/null &
done
wait
echo "canonical grid wall time: $(( $(date +%s) - start )) s"
