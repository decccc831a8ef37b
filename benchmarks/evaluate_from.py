"""Do a halving rung's promotions need the evaluations early in its fits? From the learning curves
of a halving tune's trial fits (``baselines/cuda-h200-tune-curves/curves.jsonl``: per fit, its
validation score at each evaluation during training), per fraction f: the kept score (the best
evaluation's) from the evaluations at steps >= f x the rung's steps only, against the kept score from
all of them; how many fits keep the same score, how many of the trials each (model, rung, dataset)
promotes (its best third) are the same, and the share of the evaluations left.

    python benchmarks/evaluate_from.py [CURVES] [--fractions 0.25,0.33,0.5] [--eta 3]

Rungs of at least 8 trials on a dataset are compared (the tune's first rungs)."""
import argparse
import collections
import json
import math
from pathlib import Path


def kept(curve: list, start: float) -> float:
    scores = [s for step, s in curve if s is not None and step >= start]
    return min(scores) if scores else math.inf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("curves", type=Path, nargs="?",
                    default=Path(__file__).parent.parent / "baselines/cuda-h200-tune-curves/curves.jsonl")
    ap.add_argument("--fractions", default="0.25,0.33,0.5")
    ap.add_argument("--eta", type=int, default=3)
    args = ap.parse_args()
    fits = [json.loads(line) for line in args.curves.read_text().splitlines() if line.strip()]
    groups = collections.defaultdict(list)
    for f in fits:
        groups[(f["model"], f["steps"], f["dataset"], f["seed"])].append(f)
    groups = {k: v for k, v in groups.items() if len(v) >= 8}
    print(f"{sum(len(v) for v in groups.values())} fits in {len(groups)} (model, rung, dataset) groups")
    for frac in map(float, args.fractions.split(",")):
        same = fits_n = overlap = promoted = best_same = left = total = 0
        for (_, steps, _, _), fs in groups.items():
            full = {f["trial"]: kept(f["curve"], 0) for f in fs}
            late = {f["trial"]: kept(f["curve"], frac * steps) for f in fs}
            same += sum(full[t] == late[t] for t in full)
            fits_n += len(full)
            k = math.ceil(len(fs) / args.eta)
            top = [set(sorted(s, key=lambda t: (s[t], t))[:k]) for s in (full, late)]
            overlap, promoted = overlap + len(top[0] & top[1]), promoted + k
            best_same += min(full, key=lambda t: (full[t], t)) == min(late, key=lambda t: (late[t], t))
            left += sum(1 for f in fs for step, _ in f["curve"] if step >= frac * steps)
            total += sum(len(f["curve"]) for f in fs)
        print(f"from {frac:.2f} of the rung's steps: kept score unchanged in {same} of {fits_n} fits; "
              f"promoted {overlap} of {promoted} the same; best trial the same in {best_same} of {len(groups)}; "
              f"{left} of {total} evaluations ({left / total:.0%})")


if __name__ == "__main__":
    main()
