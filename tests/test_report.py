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
