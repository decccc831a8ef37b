#!/usr/bin/env bash
# The GPU measurements of baselines/README.md, in phases that each fit in one command of at most
# ten minutes, run one after another on the same (warm) machine: each phase stops itself after W
# seconds (SIGTERM: the run keeps its rows and its fits' snapshots, and the next call of the same
# phase resumes it), and writes its logs under LOG.
#
#   PHASE=tests bash benchmarks/cuda_session.sh   # a 96-member step's kernels, the CUDA tests, then cm-ct's window replay against
#                                                 # a step a replay (group_step.py), one group of mixed
#                                                 # batches against a group per batch, groups at once
#                                                 # in threads and in processes, then the tune
#   PHASE=streams bash benchmarks/cuda_session.sh # the grid's groups at once (group_step.py --together):
#                                                 # as they are, with the GPU's 32 hardware queues
#                                                 # (CUDA_DEVICE_MAX_CONNECTIONS), with the flow first,
#                                                 # then what the main thread pays to read back and
#                                                 # sample a model meanwhile, at three switch intervals
#   PHASE=grid  bash benchmarks/cuda_session.sh   # the converged canonical grid, from scratch, alone
#   PHASE=doubled bash benchmarks/cuda_session.sh # the same grid with every cap doubled, started or
#                                                 # resumed (benchmarks/cap_check.py compares the two)
#   PHASE=tune  bash benchmarks/cuda_session.sh   # the canonical tune, started or resumed; MODELS=vae,flow
#                                                 # tunes those alone, and CARRY=DIR writes the tune's
#                                                 # directory without checkpoints, kept states or
#                                                 # snapshots to DIR/tune.tgz.aa, .ab, ... (15 MiB each):
#                                                 # TUNE_FROM=DIR on the next machine starts from them
#                                                 # (its finished models are read from their rows; a
#                                                 # tune is assembled model by model, over sessions)
#   PHASE=pacgan bash benchmarks/cuda_session.sh  # PacGAN's Table 1 at the paper's budget, started or
#                                                 # resumed (PACKS=1,2,3,4 by default)
#
# Install genbench with the interpreter that runs it ('python3 -m pip install ...'): installed with a
# bare 'pip', the 'genbench' script could not import typer on the H200 machine (the grid's report
# step; pip writes its own interpreter into the scripts it installs).
#
# W: the phase's seconds (default 540): leave a minute of the command's limit after it, for a
# stopped run saves its fits' snapshots at their next window ends (up to 30 s measured in the tune),
# and a command that runs past the device's limit loses the machine and what STATE held. LOG: where
# the logs go (default gpu_runs/); STATE: where the grid and the tune write their run dirs (default
# /tmp/genbench-cuda: kept between calls on a warm machine, so a tune resumes); DEVICE: the tune's
# --device (default cuda; cpu for a smoke test of this script). The grid and the tune print their
# time split (grid_phases.py) and each group's end to LOG/*.err.
set -u
cd "$(dirname "$0")/.."
PHASE="${PHASE:-tests}"
case "$PHASE" in tests|streams|grid|doubled|tune|pacgan) ;; *) echo "PHASE=$PHASE: not a phase (tests, streams, grid, doubled, tune, pacgan)" >&2; exit 2 ;; esac
if ! command -v genbench > /dev/null; then  # (the built-in models are found through the package's entry points)
  echo "the $PHASE phase needs genbench installed (pip install .; offline: --no-build-isolation --no-deps)" >&2; exit 2
fi
W="${W:-540}"
LOG="${LOG:-gpu_runs}"
STATE="${STATE:-/tmp/genbench-cuda}"
mkdir -p "$LOG" "$STATE"
start=$(date +%s)
left() { echo $(( W - ($(date +%s) - start) )); }
# a command's limit: the seconds left, at most $1, at least 1 ('timeout 0' would mean no limit at all)
lim() { local t; t=$(left); (( t > $1 )) && t=$1; (( t < 1 )) && t=1; echo "$t"; }
export PYTHONUNBUFFERED=1
DATASETS=ring8,grid25,moons,circles,swissroll,pinwheel,spirals,checkerboard

tune() {
  local t; t=$(left)
  (( t > 30 )) || return 0
  timeout "$t" python3 benchmarks/grid_phases.py tune --models "${MODELS:-diffusion,cm,vae,flow,gan}" --datasets "$DATASETS" \
    --trials 32 --seeds 0 --device "${DEVICE:-cuda}" --groups-at-once 8 --halving 3 --max-members 96 --out "$STATE/tune" \
    > "$LOG/tune.out" 2>> "$LOG/tune.err"
  echo "tune: exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOG/phases.txt"
  ls "$STATE/tune" >> "$LOG/phases.txt" 2>&1
}

case "$PHASE" in
  tests)
    nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv > "$LOG/gpu.txt" 2>&1
    python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$LOG/gpu.txt"
    timeout 120 python3 benchmarks/group_step.py --models vae,flow,diffusion,cm-ct,gan --members 96 --steps 300 \
      --profile > "$LOG/profile.txt" 2>&1  # where a wide group's step spends the GPU's time
    echo "profile: exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOG/phases.txt"
    timeout "$(lim "$W")" python3 -m pytest -q tests/test_cuda.py -p no:cacheprovider > "$LOG/test_cuda.txt" 2>&1
    echo "test_cuda: exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOG/phases.txt"
    timeout "$(lim 150)" python3 benchmarks/group_step.py --models cm-ct \
      --replay window,step --rounds 2 > "$LOG/group_step_cmct.txt" 2>&1
    echo "group_step cm-ct: exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOG/phases.txt"
    for spec in "vae,diffusion 256 512 1024" "flow 128 256 512"; do  # a batch as a member field: one mixed
      set -- $spec; m=$1; shift                                       # group against a group per batch
      timeout "$(lim 90)" python3 benchmarks/group_step.py --models "$m" --members 96 \
        --steps 2000 --batches "$(IFS=,; echo "$*")" >> "$LOG/batches.txt" 2>&1
      for b in "$@"; do
        timeout "$(lim 60)" python3 benchmarks/group_step.py --models "$m" --members 32 \
          --steps 2000 --batches "$b" >> "$LOG/batches.txt" 2>&1
      done
    done
    echo "group_step batches: after $(( $(date +%s) - start )) s" | tee -a "$LOG/phases.txt"
    for how in "" --processes; do  # what bounds groups at once: the GPU, or the one interpreter
      timeout "$(lim 120)" python3 benchmarks/group_step.py --models vae,flow \
        --members 24 --at-once 1,2,4,8,12 $how >> "$LOG/at_once.txt" 2>&1
      echo "group_step at once $how: exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOG/phases.txt"
    done
    tune
    ;;
  streams)
    for how in "" "CUDA_DEVICE_MAX_CONNECTIONS=32" "--first flow" "--main-sample diffusion --switch-interval 0.005,0.001,0.0002"; do
      (( $(left) > 10 )) || break
      case "$how" in --*) set -- $how; e=() ;; "") set --; e=() ;; *) set --; e=("$how") ;; esac
      timeout "$(lim 150)" env "${e[@]}" python3 benchmarks/group_step.py --together \
        --models vae,flow,diffusion,cm-ct,gan --members 24 --steps 1500 --device "${DEVICE:-cuda}" $@ >> "$LOG/streams.txt" 2>&1
      echo "streams ${how:-as they are}: exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOG/phases.txt"
    done
    ;;
  grid)
    rm -rf "$STATE/grid"
    OUT_DIR="$STATE/grid" GENBENCH="timeout $(lim "$W") python3 benchmarks/grid_phases.py" bash baselines/run_cuda.sh \
      --score-jobs 14 --groups-at-once 6 > "$LOG/grid.out" 2> "$LOG/grid.err"
    echo "grid: after $(( $(date +%s) - start )) s" | tee -a "$LOG/phases.txt"
    cp "$STATE/grid/rows.jsonl" "$LOG/grid_rows.jsonl" 2>/dev/null
    cp "$STATE/grid/report.md" "$STATE/grid/results.csv" "$LOG/" 2>/dev/null
    ;;
  doubled)
    OUT_DIR="$STATE/doubled" GENBENCH="timeout $(lim "$W") python3 benchmarks/grid_phases.py" bash baselines/run_cuda.sh \
      --score-jobs 14 --groups-at-once 6 --param diffusion.train_steps=160000 --param cm-cd.train_steps=60000 \
      --param cm-ct.train_steps=240000 --param vae.train_steps=480000 --param flow.train_steps=200000 \
      --param gan.train_steps=120000 > "$LOG/doubled.out" 2>> "$LOG/doubled.err"
    echo "doubled: after $(( $(date +%s) - start )) s" | tee -a "$LOG/phases.txt"
    cp "$STATE/doubled/rows.jsonl" "$LOG/doubled_rows.jsonl" 2>/dev/null
    ;;
  tune)
    if [ -n "${TUNE_FROM:-}" ] && [ ! -d "$STATE/tune" ]; then
      cat "$TUNE_FROM"/tune.tgz.* | tar xzf - -C "$STATE" && echo "tune: started from $TUNE_FROM" | tee -a "$LOG/phases.txt"
    fi
    tune
    cp "$STATE/tune/tune.json" "$STATE/tune/tuned.json" "$LOG/" 2>/dev/null
    if [ -n "${CARRY:-}" ]; then
      mkdir -p "$CARRY" && rm -f "$CARRY"/tune.tgz.*
      tar czf - -C "$STATE" --exclude='*.pt' --exclude=ends --exclude=partial tune | split -b 15m - "$CARRY/tune.tgz."
      ls -l "$CARRY"/tune.tgz.* >> "$LOG/phases.txt"
    fi
    ;;
  pacgan)
    timeout "$(lim "$W")" genbench reproduce pacgan --packs "${PACKS:-1,2,3,4}" --device cuda --out "$STATE/pacgan" \
      > "$LOG/pacgan.out" 2>> "$LOG/pacgan.err"
    echo "pacgan: exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOG/phases.txt"
    for d in "$STATE"/pacgan/*/; do
      mkdir -p "$LOG/pacgan/$(basename "$d")"
      cp "$d"rows.jsonl "$d"manifest.json "$d"report.md "$LOG/pacgan/$(basename "$d")/" 2>/dev/null
    done
    ;;
esac
