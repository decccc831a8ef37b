import pandas as pd

from genbench import report


def _rows(w2s, hq, modes=8, device="cpu-x"):
    return [{"model": "m", "variant": "", "dataset": "ring8", "seed": s, "steps": 1, "nfe": 1, "n_samples": 2000,
             "w2": w, "w2_floor": 0.29, "w2_floor_std": 0.05, "modes_captured": modes, "modes_total": 8,
             "hq_frac": hq, "mode_tv": 0.02, "train_s": 1.0, "sample_s": 0.01, "device": "cpu",
             "device_name": device, "threads": 1, "status": "done"} for s, w in enumerate(w2s)]


def test_compare_flags_only_what_is_beyond_the_seed_spread():
    base = report.tidy(_rows([0.30, 0.31, 0.29], 0.95))
    same = report.compare(report.tidy(_rows([0.305], 0.94, device="other")), base)
    assert list(same["flag"]) == ["ok"]
    worse = report.compare(report.tidy(_rows([0.50], 0.95)), base)
    assert worse["flag"].iloc[0] == "REGRESSION: w2"
    lost = report.compare(report.tidy(_rows([0.30], 0.60, modes=6)), base)
    assert lost["flag"].iloc[0] == "REGRESSION: modes, hq_frac"


def test_markdown_aggregates_seeds_with_a_t_interval():
    df = report.tidy(_rows([0.30, 0.31, 0.29], 0.95))
    md = report.markdown(df)
    assert "0.3 ± 0.025" in md  # t_{0.975,2} * 0.01 / sqrt(3) = 0.0248
    table = report.aggregate(df)["cpu-x"]
    assert table["model"].tolist() == ["data (floor)", "m"] and table["seeds"].tolist() == ["", 3]
    assert isinstance(report.aggregate(df)["cpu-x"], pd.DataFrame)


def test_markdown_marks_only_what_lies_outside_the_floor_band():
    rows = _rows([0.30, 0.31, 0.29], 0.95)
    for r in rows:
        r |= {"hq_frac_floor": 0.989, "hq_frac_floor_std": 0.002, "c2st": 0.51, "c2st_floor": 0.5,
              "c2st_floor_std": 0.02}
    table = report.aggregate(report.tidy(rows))["cpu-x"]
    model = table[table["model"] == "m"].iloc[0]
    assert model["hq_frac"].endswith(report.MARK)  # 0.95 is 34 stds below the data's 0.989
    assert not model["w2"].endswith(report.MARK)  # 0.30 against 0.29 +- 3 x 0.05 / sqrt(3)
    assert not model["c2st"].endswith(report.MARK)  # 0.51 against 0.5 +- 3 x 0.02 / sqrt(3)
    floor = table[table["model"] == "data (floor)"].iloc[0]
    assert floor["hq_frac"] == "0.989 (0.002)" and floor["w2"] == "0.29 (0.05)"
    # the band narrows with the seed count: the same 0.1-std offset is marked with many seeds
    assert report.outside_floor([0.3] * 1000, [0.29] * 1000, [0.05] * 1000)
    assert not report.outside_floor([0.3] * 3, [0.29] * 3, [0.05] * 3)


def test_protocol_line_names_the_timing_window_the_rows_record():
    rows = _rows([0.30, 0.31], 0.95)
    rows[0]["sample_min_time_s"] = 0.05
    assert "at least 5 blocks and 0.05, 0.25 s" in report.protocol_line(report.tidy(rows))  # the second: a legacy row
    rows[1]["sample_min_time_s"] = 0.05
    assert "at least 5 blocks and 0.05 s" in report.protocol_line(report.tidy(rows))


def _cell(model, steps, val_energy, hq, sample_s, variant=""):
    return [{"model": model, "variant": variant, "dataset": "ring8", "seed": s, "steps": steps, "nfe": steps,
             "val_energy": val_energy, "hq_frac": hq, "sample_s": sample_s, "device_name": "gpu-x", "status": "done"}
            for s in range(2)]


def test_matched_quality_finds_the_fewest_ladder_steps_at_least_as_good_on_both_metrics():
    rows = (_cell("ladder", 5, 0.010, 0.90, 0.005) + _cell("ladder", 10, 0.004, 0.95, 0.010, "a")
            + _cell("ladder", 10, 0.003, 0.97, 0.012, "b") + _cell("ladder", 20, 0.002, 0.99, 0.020)
            + _cell("fast", 1, 0.004, 0.96, 0.001)  # energy met at 10 steps, hq_frac only by variant b
            + _cell("poor", 2, 0.001, 0.995, 0.001))  # better than every rung: no match
    table = report.matched_quality(report.tidy(rows)).set_index("model")
    assert table.loc["fast", "ladder steps to match"] == "10 (b)" and table.loc["fast", "time ratio"] == "12"
    assert table.loc["poor", "ladder steps to match"].startswith("none of 20")
    assert "ladder" not in table.index
    md = report.markdown(report.tidy(rows))
    assert "## Matched-quality speedup" in md


def test_matched_quality_needs_a_ladder():
    rows = _cell("a", 1, 0.01, 0.9, 0.001) + _cell("b", 2, 0.01, 0.9, 0.001)
    assert report.matched_quality(report.tidy(rows)) is None


def test_the_convergence_table_counts_seeds_in_the_band_and_their_time():
    rows = _rows([0.30, 0.31, 0.29], 0.95)
    for i, r in enumerate(rows):
        r |= {"stop_reason": "converged at step 900" if i else "cap reached", "train_steps": 1000, "kept_step": 500,
              "target_step": 400 if i else None, "target_s": 2.0 * i if i else None, "target_step_energy": 300,
              "target_step_support": 400 if i else None, "train_s": 10.0}
    table = report.convergence_table(report.tidy(rows)).iloc[0]
    assert table["reached the data"] == "2/3" and table["energy in band"] == "3/3" and table["support in band"] == "2/3"
    assert table["steps to reach"] == "400" and table["seconds to reach"] == "3"
    assert table["stopped"] == "2 converged, 1 cap reached"
    # a time to target above the fit's training time cannot be: left out, marked, and said why
    rows[2]["train_s"] = 3.0
    df = report.tidy(rows)
    assert report.convergence_table(df).iloc[0]["seconds to reach"] == "2" + report.IMPOSSIBLE_MARK
    assert report.IMPOSSIBLE_NOTE in report.markdown(df)
    rows[1]["train_s"] = 1.0
    assert report.convergence_table(report.tidy(rows)).iloc[0]["seconds to reach"] == "–" + report.IMPOSSIBLE_MARK


def test_rank_changes_name_only_reversals_both_runs_separate():
    """Two models on two datasets: on ring8 the run reverses a clear order (beyond the seed spread),
    on moons a near tie (within it); c2st ranks by its distance from 0.5 (0.45 is as far as 0.55)."""
    def rows(values: dict) -> pd.DataFrame:
        out = []
        for (model, dataset), c2sts in values.items():
            for seed, c in enumerate(c2sts):
                out.append({"model": model, "dataset": dataset, "seed": seed, "steps": 1, "c2st": c, "w2": 0.3,
                            "status": "done", "device_name": "x"})
        return report.tidy(out)

    base = rows({("a", "ring8"): [0.52, 0.53, 0.52], ("b", "ring8"): [0.70, 0.71, 0.69],
                 ("a", "moons"): [0.550, 0.560, 0.540], ("b", "moons"): [0.552, 0.562, 0.542]})
    run = rows({("a", "ring8"): [0.80, 0.81, 0.79], ("b", "ring8"): [0.44, 0.45, 0.45],
                ("a", "moons"): [0.553, 0.563, 0.543], ("b", "moons"): [0.551, 0.561, 0.541]})
    table, lines = report.rank_changes(run, base, "c2st")
    ring8 = table[table["dataset"] == "ring8"].set_index("cell")
    assert ring8["rank_base"].to_dict() == {"a (1 step)": 1, "b (1 step)": 2}
    assert ring8["rank_run"].to_dict() == {"a (1 step)": 2, "b (1 step)": 1}  # |0.447 - 0.5| beats |0.80 - 0.5|
    assert len(lines) == 2
    assert lines[0].startswith("moons: b (1 step) now ahead of a (1 step)") and lines[0].endswith("within the seed spread")
    assert lines[1].startswith("ring8: b (1 step) now ahead of a (1 step)") and lines[1].endswith("beyond the seed spread")
    md = report.rankings_markdown(table, lines, "c2st", "base")
    assert "1 beyond the seed spread" in md and "- ring8: b (1 step) now ahead" in md and "- moons" not in md
    _, none = report.rank_changes(base, base, "c2st")
    assert none == []
