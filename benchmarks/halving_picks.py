"""Does successive halving's last rung change the pick? From a halving tune's trial rows (its run
dirs, ``OUT/trials/MODEL``, or the one run dir ``OUT/trials`` of the tunes of before), per model and dataset:
the trial the penultimate rung ranks best, the trial the last rung picks, and the finalists'
validation scores at the last rung's steps (the converged budget's score: lower is better).

    python benchmarks/halving_picks.py TUNE_OUT [--seed 0]

Reads rows only (works on a tune stopped after some model's last rung: tune.json need not exist)."""
import argparse
import json
from collections import defaultdict
from pathlib import Path

from genbench.tune import validation_floors, validation_scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    files = sorted((args.out / "trials").glob("**/rows.jsonl"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["model"].count("~") == 2]  # trials at a rung: MODEL~KEY~STEPS
    floors = validation_floors((r["dataset"], int(r["seed"])) for r in rows)
    scores: dict = defaultdict(lambda: defaultdict(dict))  # model -> key -> steps -> {dataset: score}
    by_trial = defaultdict(list)
    for r in rows:
        by_trial[r["model"]].append(r)
    for name, rs in by_trial.items():
        model, key, steps = name.split("~")
        for (d, _), v in validation_scores(rs, floors).items():
            scores[model][key].setdefault(int(steps), {})[d] = v
    for model, trials in scores.items():
        rungs = sorted({s for t in trials.values() for s in t})
        if len(rungs) < 2:
            continue
        prev, last = rungs[-2], rungs[-1]
        same = compared = 0
        print(f"{model}: rungs at {', '.join(map(str, rungs))} steps")
        for d in sorted({d for t in trials.values() for g in t.values() for d in g}):
            at = {rung: {k: t[rung][d] for k, t in trials.items() if d in t.get(rung, {})} for rung in (prev, last)}
            if not at[prev] or not at[last]:
                continue
            p_prev, p_last = min(at[prev], key=at[prev].get), min(at[last], key=at[last].get)
            compared += 1
            same += p_prev == p_last
            finalists = ", ".join(f"{k} {v:.1f}" for k, v in sorted(at[last].items(), key=lambda kv: kv[1]))
            print(f"  {d:13s} best at {prev}: {p_prev}; picked at {last}: {p_last}; finalists at {last}: {finalists}")
        print(f"  the penultimate rung's best is the pick on {same} of {compared} datasets")


if __name__ == "__main__":
    main()
