#!/usr/bin/env bash
# Regenerates baselines/cpu: the canonical grid on the CPU, one single-threaded process per core
# (two on a 2-core machine), each over half of the datasets. Resumable: re-run to finish.
set -u
cd "$(dirname "$0")/.."
run() {
  genbench run --models diffusion,cm,vae,flow --datasets "$2" --seeds 0,1,2 \
    --steps diffusion=1:2:5:10:20:50:100,cm-cd=1:2:4,cm-ct=1:2:4 --device cpu --threads 1 \
    --out "baselines/cpu/$1"
}
start=$(date +%s)
run part-a ring8,grid25,moons,circles > /dev/null &
run part-b swissroll,pinwheel,spirals,checkerboard > /dev/null &
wait
echo "canonical grid wall time: $(( $(date +%s) - start )) s"
