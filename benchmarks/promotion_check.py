"""Does promoting a rung's trials by their fit's kept validation score (``tune.kept_scores``: no cell
sampled) keep the trials that their cells' score (``tune.validation_scores``: fresh samples) ranks
best? On a tune's run dir whose rows have both (a rung run with cells at the converged budget):

    python benchmarks/promotion_check.py TUNE_OUT/trials/MODEL [--eta 3]   # (tunes of before: TUNE_OUT/trials)

Per (model, dataset): the trials, how many of the top 1/eta by cells the kept score also promotes,
whether the cells' best is among them, and the rank correlation of the two scores."""
import argparse
import collections
import json
import math
from pathlib import Path

from scipy.stats import spearmanr

from genbench import tune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--eta", type=int, default=3)
    args = ap.parse_args()
    rows = [json.loads(line) for line in (args.run / "rows.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("val_energy") is not None and r.get("kept_score") is not None]
    floors = tune.validation_floors((r["dataset"], int(r["seed"])) for r in rows)
    groups = collections.defaultdict(list)
    for r in rows:  # a trial's model is MODEL~KEY[~STEPS]: one group per family, rung and dataset
        model, _, rest = r["model"].partition("~")
        groups[(model, rest.partition("~")[2], r["dataset"])].append(r)
    print("model      steps   dataset        trials  top  both  cells' best promoted  spearman")
    for (model, steps, d), rs in sorted(groups.items()):
        mean = lambda score: {n: sum(v) / len(v) for n, v in score.items()}  # noqa: E731 - over seeds
        cell, kept = collections.defaultdict(list), collections.defaultdict(list)
        for r in rs:
            key = (d, int(r["seed"]))
            cell[r["model"]].append(tune.validation_scores([r], floors)[key])
            kept[r["model"]].append(tune.kept_scores([r])[key])
        cell, kept = mean(cell), mean(kept)
        top = math.ceil(len(cell) / args.eta)
        by_cell, by_kept = sorted(cell, key=cell.get), sorted(kept, key=kept.get)
        both = [n for n in cell if math.isfinite(cell[n]) and math.isfinite(kept[n])]
        rho = spearmanr([cell[n] for n in both], [kept[n] for n in both]).correlation if len(both) > 2 else math.nan
        print(f"{model:10} {steps or '-':7} {d:14} {len(cell):6} {top:4} {len(set(by_cell[:top]) & set(by_kept[:top])):5}"
              f"  {'yes' if by_cell[0] in by_kept[:top] else 'no':20}  {rho:.3f}")


if __name__ == "__main__":
    main()
