"""Registry, plugins and the CLI, exercised end to end through subprocesses."""
import json

import pandas as pd
import pytest

from genbench import registry
from genbench.api import UsageError


def test_builtins_come_from_entry_points():
    found = registry.discover()
    for name in ("diffusion", "vae", "flow"):
        assert found[name].source == "built-in" and found[name].cls is not None


def test_unknown_model_is_usage_error():
    with pytest.raises(UsageError, match="unknown model 'nope'; valid: .*vae"):
        registry.resolve(["nope"])


def test_list_shows_plugin_and_broken_plugin(cli):
    r = cli("list")
    assert r.returncode == 0, r.stderr
    assert "gauss" in r.stdout and "plugin" in r.stdout
    assert "broken" in r.stdout and "ModuleNotFoundError" in r.stdout


def test_plugin_runs_end_to_end_and_report(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("run", "--models", "gauss", "--datasets", "ring8,moons", "--seeds", "0,1", "--n-samples", "300",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "gauss" in r.stdout and "data (floor)" in r.stdout
    rows = [json.loads(l) for l in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(x["status"] == "done" for x in rows)
    assert all(x["nfe"] == 1 and x["source"] == "plugin" for x in rows)
    ring = [x for x in rows if x["dataset"] == "ring8"][0]
    assert ring["modes_total"] == 8 and ring["modes_captured"] == 0  # a single Gaussian covers no mode
    assert ring["w2"] > ring["w2_floor"]
    # every default metric with its floor; a single Gaussian is told from ring8 by the classifier
    for c in ("energy", "precision", "recall", "density", "coverage", "c2st", "hq_frac", "mode_tv"):
        assert ring[c] is not None and ring[f"{c}_floor"] is not None and ring[f"{c}_floor_std"] > 0
    assert ring["c2st"] > ring["c2st_floor"] + 3 * ring["c2st_floor_std"] and ring["metric_errors"] is None
    assert (out / "floors" / "ring8__s0.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["configs"]["gauss"] == {"mode": "ok"} and manifest["threads"] == 1

    csv = tmp_path / "t.csv"
    assert cli("report", str(out), "--format", "csv", "--out", str(csv)).returncode == 0
    df = pd.read_csv(csv)
    assert len(df) == 4 and {"w2", "w2_floor", "nfe", "status", "device_name"} <= set(df.columns)
    md = tmp_path / "t.md"
    assert cli("report", str(out), "--out", str(md)).returncode == 0
    text = md.read_text()
    assert "| gauss" in text and "± " in text and "Timing:" in text  # 2 seeds -> a CI


def test_failing_and_diverging_cells_are_rows_and_the_rest_go_on(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("run", "--models", "gauss,vae", "--budget", "quick", "--param", "gauss.mode=fail", "--n-samples", "200",
            "--out", str(out))
    assert r.returncode == 3, r.stderr  # a run with failed cells says so in its exit status
    assert "1 of 2 cells did not finish (1 error)" in r.stderr and "Traceback" not in r.stderr
    rows = {x["model"]: x for x in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    assert rows["gauss"]["status"] == "error" and "planned failure" in rows["gauss"]["error"]
    assert rows["vae"]["status"] == "done"
    out2 = tmp_path / "run2"
    r = cli("run", "--models", "gauss", "--param", "gauss.mode=nan", "--n-samples", "200", "--out", str(out2))
    assert r.returncode == 3 and "(1 diverged)" in r.stderr
    row = json.loads((out2 / "rows.jsonl").read_text())
    assert row["status"] == "diverged" and "not finite" in row["error"]
    # the row is still written whole: NFE, timing, floors, and each metric empty with its reason
    assert row["nfe"] == 1 and row["sample_s"] > 0 and row["w2_floor"] > 0
    assert row["w2"] is None and "200 of 200 samples are not finite" in row["metric_errors"]["w2"]


def test_calibrate_prints_the_seeds_each_metric_needs(cli, tmp_path):
    r = cli("calibrate", "--datasets", "moons", "--defects", "shift=0.5,blur=0.000001", "--metrics", "w2,c2st",
            "--reps", "3", "--n-samples", "200", "--jobs", "1", "--out", str(tmp_path / "cal.csv"))
    assert r.returncode == 0, r.stderr
    assert "| moons     | 1 (c2st)    | –" in r.stdout  # a 0.5-std shift at once, a 1e-6 blur never
    assert "jittered by N(0, (0.0001% of the data's std)^2)" in r.stdout
    rows = pd.read_csv(tmp_path / "cal.csv")
    assert set(rows["column"]) == {"w2", "c2st"} and len(rows) == 4


BAD = [
    (["run", "--models", "nope"], "unknown model 'nope'"),
    (["run", "--models", "broken"], "model 'broken' is broken"),
    (["run", "--models", "gauss", "--datasets", "ring9"], "unknown dataset 'ring9'"),
    (["run", "--models", "gauss", "--seeds", "0,x"], "expected comma-separated integers"),
    (["run", "--models", "gauss", "--seeds", "-1"], "must be >= 0"),
    (["run", "--models", "gauss", "--n-samples", "1"], "at least 2"),
    (["run", "--models", "gauss", "--budget", "huge"], "unknown budget 'huge'"),
    (["run", "--models", "gauss", "--param", "gauss.nope=1"], "unknown parameter 'nope'"),
    (["run", "--models", "gauss", "--param", "oops"], "expected MODEL.FIELD=VALUE"),
    (["run", "--models", "gauss", "--steps", "0"], "must be >= 1"),
    (["run", "--models", "gauss", "--threads", "0"], "--threads 0: must be >= 1"),
    (["reproduce", "--threads", "0"], "--threads 0: must be >= 1"),
    (["run", "--models", "gauss", "--jobs", "-1"], "--jobs -1: must be >= 1, or 0 for auto"),
    (["run", "--models", "gauss", "--metrics", "w2,mmd"], "unknown metric 'mmd'"),
    (["run", "--models", "gauss", "--floor-draws", "1"], "need at least 2 true samples"),
    (["calibrate", "--defects", "smudge"], "unknown defect 'smudge'"),
    (["calibrate", "--defects", "blur=2"], "must lie in (0, 1)"),
    (["calibrate", "--datasets", "ring9"], "unknown dataset 'ring9'"),
    (["calibrate", "--out", "x.txt"], "give a .md or .csv file"),
    (["report", "does-not-exist"], "does not exist"),
    (["report", "."], "holds no rows.jsonl"),
    (["report", ".", "--format", "xls"], "valid: md, csv"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(cli, tmp_path, args, message):
    r = cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()  # nothing trained, nothing written


def test_cuda_without_gpu_is_usage_error(cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = cli("run", "--models", "gauss", "--device", "cuda")
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr


def test_different_settings_do_not_overwrite_a_run_dir(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("run", "--models", "gauss", "--n-samples", "100", "--out", str(out)).returncode == 0
    before = (out / "rows.jsonl").read_text()
    r = cli("run", "--models", "gauss", "--n-samples", "200", "--out", str(out))
    assert r.returncode == 2 and "n_samples=100" in r.stderr
    assert (out / "rows.jsonl").read_text() == before
