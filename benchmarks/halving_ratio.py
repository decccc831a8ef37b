"""Would a steeper halving ratio keep the trials that matter? From the learning curves of an ETA-3
halving tune's first two rungs (``baselines/cuda-h200-tune-curves/curves.jsonl``), per (model,
dataset) with all 32 trials at the first rung (a 27th of the cap): the first cut of ETA 4 (made at
a 64th of the cap, keeping 8: each trial's score there read off its curve, the evaluations from a
quarter of those steps to them) against ETA 3's (at a 27th, keeping 11): is the trial best at a
27th of the cap kept, and the trial best at a ninth (the second rung: among ETA 3's promoted)?

    python benchmarks/halving_ratio.py [CURVES]"""
import argparse
import collections
import json
import math
from pathlib import Path


def score_at(curve: list, end: float) -> float:
    scores = [s for step, s in curve if s is not None and end / 4 <= step <= end]
    return min(scores) if scores else math.inf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("curves", type=Path, nargs="?",
                    default=Path(__file__).parent.parent / "baselines/cuda-h200-tune-curves/curves.jsonl")
    args = ap.parse_args()
    by = collections.defaultdict(dict)  # (model, dataset) -> steps -> trial -> fit
    for line in args.curves.read_text().splitlines():
        f = json.loads(line)
        by[(f["model"], f["dataset"])].setdefault(f["steps"], {})[f["trial"]] = f
    kept = collections.Counter()
    pairs = 0
    for rungs in by.values():
        steps = sorted(rungs)
        if len(steps) < 2 or len(rungs[steps[0]]) < 32:
            continue
        pairs += 1
        first, second = rungs[steps[0]], rungs[steps[1]]
        cap = steps[0] * 27
        best27 = min(first, key=lambda t: (first[t]["kept_score"], t))
        best9 = min(second, key=lambda t: (second[t]["kept_score"], t))
        for eta, at in ((3, cap / 27), (4, cap / 64)):
            score = {t: score_at(f["curve"], at) for t, f in first.items()}
            top = set(sorted(score, key=lambda t: (score[t], t))[:math.ceil(len(first) / eta)])
            kept[(eta, "27th")] += best27 in top
            kept[(eta, "9th")] += best9 in top
    for eta in (3, 4):
        print(f"ETA {eta}: the first cut keeps the best at a 27th of the cap in {kept[(eta, '27th')]} of {pairs} "
              f"(model, dataset) pairs, the best at a ninth in {kept[(eta, '9th')]}")


if __name__ == "__main__":
    main()
