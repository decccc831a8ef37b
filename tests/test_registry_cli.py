"""Registry, plugins and the CLI, exercised end to end through subprocesses."""
import json
import sys

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


def test_a_source_tree_not_installed_is_named_as_the_cause(monkeypatch):
    """Without the package's metadata (a source tree on the path, never pip-installed) no built-in is
    registered: the error says so and how to mend it, not that 'vae' is unknown beside a list of
    aliases."""
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    with pytest.raises(UsageError, match="'vae': genbench's own models are not registered.*pip install -e ."):
        registry.resolve(["vae"])


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
    assert manifest["configs"]["gauss"] == {"mode": "ok", "marker": ""} and manifest["threads"] == 1

    csv = tmp_path / "t.csv"
    assert cli("report", str(out), "--format", "csv", "--out", str(csv)).returncode == 0
    df = pd.read_csv(csv)
    assert len(df) == 4 and {"w2", "w2_floor", "nfe", "status", "device_name"} <= set(df.columns)
    md = tmp_path / "t.md"
    assert cli("report", str(out), "--out", str(md)).returncode == 0
    text = md.read_text()
    assert "| gauss" in text and "± " in text and "Timing:" in text  # 2 seeds -> a CI


def test_a_run_logged_to_a_file_prints_status_lines(cli, tmp_path, monkeypatch):
    """Where stderr is not a terminal (a batch job's log), where the bar shows nothing until the end,
    a plain line now and then says how far the run is."""
    import re

    from genbench import cli as gcli

    monkeypatch.setattr(gcli._RichProgress, "PLAIN_EVERY_S", 0.05)
    r = cli("run", "--models", "gauss", "--datasets", "ring8,moons", "--seeds", "0", "--n-samples", "300",
            "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if re.match(r"\[\s*\d+ s\] (\d+/\d+ cells|planning): ", l)]
    assert lines, r.stderr


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
    r = cli("run", "--models", "gauss", "--param", "gauss.mode=hidden", "--n-samples", "200", "--out", str(tmp_path / "r3"))
    row = json.loads((tmp_path / "r3" / "rows.jsonl").read_text())
    assert r.returncode == 3 and row["status"] == "error", row  # a network nfe_module does not name is caught
    assert "NFE declaration is false: Linear ran during sample outside nfe_module" in row["error"]
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
    (["run", "--models", "quitter"], "model 'quitter' is broken (SystemExit: 7)"),
    (["run", "--models", "gauss", "--datasets", "ring9"], "unknown dataset 'ring9'"),
    (["run", "--models", "gauss", "--seeds", "0,x"], "expected comma-separated integers"),
    (["run", "--models", "gauss", "--seeds", "-1"], "must be >= 0"),
    (["run", "--models", "gauss", "--groups-at-once", "17"], "--groups-at-once 17: must be 1..16"),
    (["run", "--models", "gauss", "--max-members", "0"], "--max-members 0: must be >= 1"),
    (["run", "--models", "gauss", "--n-samples", "1"], "at least 2"),
    (["run", "--models", "gauss", "--budget", "huge"], "unknown budget 'huge'"),
    (["run", "--models", "gauss", "--param", "gauss.nope=1"], "unknown parameter 'nope'"),
    (["run", "--models", "gauss", "--param", "oops"], "expected MODEL.FIELD=VALUE"),
    (["run", "--models", "gauss", "--steps", "0"], "must be >= 1"),
    (["run", "--models", "gauss", "--threads", "0"], "--threads 0: must be >= 1"),
    (["reproduce", "--threads", "0"], "--threads 0: must be >= 1"),
    (["run", "--models", "gauss", "--jobs", "-1"], "--jobs -1: must be >= 1, or 0 for auto"),
    (["run", "--models", "gauss", "--score-jobs", "-1"], "--score-jobs -1: must be >= 0"),
    (["run", "--models", "gauss", "--metrics", "w2,mmd"], "unknown metric 'mmd'"),
    (["run", "--models", "gauss", "--floor-draws", "1"], "need at least 2 true samples"),
    (["calibrate", "--defects", "smudge"], "unknown defect 'smudge'"),
    (["calibrate", "--defects", "blur=2"], "must lie in (0, 1)"),
    (["calibrate", "--datasets", "ring9"], "unknown dataset 'ring9'"),
    (["calibrate", "--out", "x.txt"], "give a .md or .csv file"),
    (["report", "does-not-exist"], "does not exist"),
    (["report", "."], "holds no rows.jsonl"),
    (["report", ".", "--format", "xls"], "valid: md, csv"),
    # config values are validated by each model's config before anything is created
    (["run", "--models", "vae", "--param", "vae.lr=-1"], "VAEConfig.lr = -1.0: must be > 0"),
    (["run", "--models", "vae", "--param", "vae.lr=nan"], "expected a finite number"),
    (["run", "--models", "vae", "--param", "vae.batch=-5"], "VAEConfig.batch = -5: must be > 0"),
    (["run", "--models", "vae", "--param", "vae.train_steps=0"], "VAEConfig.train_steps = 0: must be > 0"),
    (["run", "--models", "vae", "--param", "vae.latent=0"], "VAEConfig.latent = 0: must be > 0"),
    (["run", "--models", "diffusion", "--param", "diffusion.sampler=rk4"], "sampler = 'rk4': valid: euler, heun"),
    (["run", "--models", "cm-ct", "--param", "cm-ct.tau_max=50"], "tau_max = 50.0: must lie in"),
    (["run", "--models", "flow", "--param", "flow.coupling=spline"], "valid: unbounded, nflows"),
    (["run", "--models", "gauss", "--seeds", "99999999999999999999999"], "seeds must lie in 0.."),
    (["run", "--models", "gauss", "--seeds", "0,,1"], "an empty item"),
    (["run", "--models", ""], "--models: empty list"),
    (["run", "--models", "gauss", "--threads", "999"], "--threads 999: this process may use"),
    (["reproduce", "--threads", "999"], "--threads 999: this process may use"),
    (["run", "--models", "gauss", "--n-samples", "10000000"], "scoring needs about"),
    (["run", "--models", "gauss", "--steps", "nosuchmodel=3"], "'nosuchmodel' is not in this run's models"),
    (["run", "--models", "diffusion,vae", "--steps", "vae=3"], "vae samples in one pass"),
    (["run", "--models", "gauss", "--steps", "3"], "none of this run's models samples in several steps"),
    (["run", "--models", "cd-needy"], "model cd-needy: its teacher gauss lacks pf-ode denoiser"),
    (["run", "--models", "gauss", "--out", "afile"], "afile is a file, not a directory"),
    (["run", "--models", "gauss", "--out", "afile/run"], "afile is a file, so afile/run cannot be a directory"),
    (["run", "--models", "gauss", "--out", "x" * 300], "is 300 bytes long; file systems allow at most 255"),
    (["report", ".", "--out", "afile/x.md"], "afile is a file"),
    (["plot", "does-not-exist"], "does not exist"),
    (["plot", "afile"], "afile is a file, not a run dir"),
    # the second hardening round's bad inputs
    (["run", "--models", "gauss", "--out", ""], "--out '': empty path"),
    (["report", ".", "--out", " "], "--out '': empty path"),
    (["run", "--models", "vae", "--param", "vae.batch=99999999999999999999"], "must be at most 2147483647"),
    (["run", "--models", "vae", "--param", "vae.hidden=1000000000000"], "VAEConfig.hidden = 1000000000000: must be at most"),
    (["run", "--models", "vae", "--param", "vae.train_steps=99999999999999999999999"], "must be at most 2147483647"),
    (["run", "--models", "gauss", "--steps", ""], "--steps: empty list"),
    (["run", "--models", "gauss", "--metrics", ""], "--metrics '': empty"),
    (["run", "--models", "gauss", "--metrics", "w2,w2"], "w2 given twice"),
    (["calibrate", "--defects", ""], "--defects '': empty"),
    (["calibrate", "--n-samples", "1000000000000"], "scoring needs about"),
    (["run", "--models", "gauss", "--score-jobs", "100000"], "--score-jobs 100000: this process may use"),
    (["run", "--models", "gauss", "--jobs", "1", "--score-jobs", "64"], "--score-jobs 64: this process may use"),
    (["run", "--models", "gauss", "--datasets", "ring8,ring8"], "ring8 given twice"),
    (["run", "--models", "gauss,gauss"], "gauss given twice"),
    (["run", "--models", "gauss", "--seeds", "0,0"], "0 given twice"),
    (["run", "--models", "diffusion", "--steps", "diffusion=1,diffusion=2"], "diffusion given twice"),
    (["run", "--models", "gauss", "--seeds", "\uff11"], "digits 0-9"),
    (["run", "--models", "gauss", "--seeds", "1_0"], "digits 0-9"),
    (["run", "--models", "gauss", "--task-gpus", "0.5"], "--task-gpus 0.5: only --executor ray"),
    (["run", "--metrics", "default,default"], "default given twice"),  # no --models: plugins join, the error alone
    (["run", "--seeds", "0,0"], "0 given twice"),
]

#: mistakes the command-line parser itself finds: one line through genbench's entry point too
PARSER = [
    (["run", "--n-samples", "1e3"], "Invalid value for '--n-samples'"),
    (["run", "--threads", "abc"], "Invalid value for '--threads'"),
    (["run", "--no-such-option"], "No such option: --no-such-option"),
    (["report"], "Missing argument"),
    (["run", "--datasets", "ring8", "moons"], "lists are comma-separated"),
]


@pytest.mark.parametrize("args,message", PARSER, ids=[" ".join(a) for a, _ in PARSER])
def test_parser_mistakes_are_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    from genbench import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["genbench", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "results").exists()


def test_genbench_alone_prints_its_help_and_exits_0(monkeypatch, capsys):
    from genbench import cli

    monkeypatch.setattr(sys, "argv", ["genbench"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0 and "Commands" in capsys.readouterr().out


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("0", False), ("", False), ("no", False)])
def test_genbench_debug_is_on_only_when_it_says_so(monkeypatch, value, on):
    from genbench.api import debug_enabled

    monkeypatch.setenv("GENBENCH_DEBUG", value)
    assert debug_enabled() is on


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(plugin_path, tmp_path, monkeypatch, args, message):
    """In-process (the CLI's own code, without a Python start per case)."""
    from typer.testing import CliRunner

    from genbench.cli import app

    monkeypatch.syspath_prepend(str(plugin_path))  # the test plugin's entry points
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a directory")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, (r.stdout, r.stderr, r.exception)
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


def test_report_never_pools_settings_and_refuses_what_it_cannot_compare(cli, tmp_path):
    """Runs of two n's read together are two labelled sections; a baseline of failed rows and a
    manifest that is not an object are one-line errors; --jobs is capped at the plan's fit units."""
    a, b, failed = tmp_path / "a", tmp_path / "b", tmp_path / "failed"
    assert cli("run", "--models", "gauss", "--n-samples", "100", "--jobs", "8", "--out", str(a)).returncode == 0
    assert json.loads((a / "rows.jsonl").read_text())["jobs"] == 1  # one fit unit: one process
    assert cli("run", "--models", "gauss", "--n-samples", "150", "--out", str(b)).returncode == 0
    r = cli("report", str(a), str(b))
    assert r.returncode == 0, r.stderr
    assert "2 different settings" in r.stdout
    assert "## Settings: budget default, n = 100" in r.stdout and "## Settings: budget default, n = 150" in r.stdout
    assert cli("run", "--models", "gauss", "--param", "gauss.mode=fail", "--out", str(failed)).returncode == 3
    r = cli("report", str(a), "--compare", str(failed))
    assert r.returncode == 2 and "no finished cells to compare against" in r.stderr and "Traceback" not in r.stderr
    r = cli("report", str(a), str(b), "--compare", str(a))
    assert r.returncode == 2 and "holds rows of 2 settings" in r.stderr
    r = cli("report", str(b), "--compare", str(a))  # gauss against itself at another n: one cell a dataset
    assert r.returncode == 0 and "## Rankings by c2st" in r.stdout and "No pair of cells is reordered" in r.stdout, r.stderr
    r = cli("report", str(b), "--compare", str(a), "--rank-by", "w3")
    assert r.returncode == 2 and "--rank-by 'w3' is not a metric column; valid: c2st" in r.stderr
    (a / "manifest.json").write_text("[]")
    for args in (["report", str(a)], ["run", "--models", "gauss", "--n-samples", "100", "--out", str(a)]):
        r = cli(*args)
        assert r.returncode == 2 and "manifest.json holds a list, not a JSON object" in r.stderr, r.stderr


def test_list_names_every_plugin_problem_and_exits_0(cli):
    r = cli("list")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    out = r.stdout
    assert "quitter" in out and "SystemExit: 7" in out  # a plugin that exits on import is only broken
    assert "nodoc" in out and "(no docstring)" in out
    assert "is multistep but does not define default_steps()" in out
    assert "name clash: 'twin' is claimed by oddplug (oddplug:NoDoc) and otherplug (toyplug:GaussFit)" in out
    assert "(ignored: oddplug (oddplug:NoDoc) also claims this name)" in out  # vae stays the built-in


def test_plugins_are_imported_only_when_named(plugin_path, tmp_path, monkeypatch):
    """A run of other models never imports a plugin (nor pays for its import or its failure);
    naming it imports it; the built-in keeps its name against a plugin claiming it."""
    from genbench import registry

    marker = tmp_path / "imported"
    monkeypatch.setenv("ODDPLUG_MARKER", str(marker))
    monkeypatch.delitem(sys.modules, "oddplug", raising=False)  # an in-process test may have imported it
    monkeypatch.syspath_prepend(str(plugin_path))
    entries = registry.resolve(["gauss", "vae"])
    assert [e.source for e in entries] == ["plugin", "built-in"] and not marker.exists()
    assert registry.resolve(["noisy"])[0].cls.__name__ == "NoDoc" and marker.exists()
    with pytest.raises(UsageError, match="model 'twin' is broken .name clash"):
        registry.resolve(["twin"])
    with pytest.raises(UsageError, match="model 'malformed' is broken"):
        registry.resolve(["malformed"])


def test_scoring_processes_give_the_rows_of_inline_scoring(cli, tmp_path):
    """--score-jobs: cells and floor draws scored in worker processes while the fits go on, and the
    VAE's held-out bound evaluated there from its checkpoint, give the same rows as scoring and
    evaluating in the fit process."""
    rows = {}
    for jobs in (0, 2):
        out = tmp_path / f"s{jobs}"
        r = cli("run", "--models", "gauss,gauss-paths,vae", "--datasets", "ring8,moons", "--n-samples", "300",
                "--budget", "quick", "--param", "vae.train_steps=60", "--floor-draws", "3", "--jobs", "1",
                "--score-jobs", jobs, "--out", out)
        assert r.returncode == 0, r.stderr
        rows[jobs] = {(x["model"], x["dataset"]): x for x in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    assert rows[0].keys() == rows[2].keys() and len(rows[0]) == 6
    for key, a in rows[0].items():
        b = rows[2][key]
        assert b["score_jobs"] == 2 and a["score_jobs"] == 0 and a["status"] == b["status"] == "done"
        same = [c for c in a if c.startswith(("w2", "energy", "precision", "recall", "c2st", "hq_frac", "modes",
                                              "nll", "elbo"))]
        assert len(same) > 10 and {c: a[c] for c in same} == {c: b[c] for c in same}
        assert key[0] != "vae" or (a["elbo"] < 0 and a["nll_bound"] > 0)  # evaluated, and a bound
        if key[0] == "gauss-paths":  # evaluated in the fit process, then on a copy restored in a scoring process
            assert (a["restored"], b["restored"]) == (0.0, 1.0) and a["nll"] == b["nll"]


@pytest.mark.slow
def test_a_grid_fitted_side_by_side_matches_the_one_by_one_grid(cli, tmp_path):
    """--side-by-side (the GPU default, forced here on the CPU): the diffusion units are fitted as
    one stacked network, each recorded and checkpointed as its own fit; the rows' metrics are the
    one-by-one run's, and report --compare flags nothing."""
    common = ["run", "--models", "diffusion,cm-cd,gauss", "--datasets", "ring8,moons", "--seeds", "0,1", "--budget",
              "quick", "--steps", "diffusion=5,cm-cd=1", "--n-samples", "300", "--floor-draws", "2",
              "--param", "diffusion.nll_points=0"]
    for mode, jobs in (("--side-by-side", "2"), ("--one-by-one", "1")):  # groups first, then two fit processes
        r = cli(*common, mode, "--jobs", jobs, "--out", tmp_path / mode.strip("-"))
        assert r.returncode == 0, r.stderr
    for model in ("diffusion", "cm-cd"):  # the students after their teachers, each with its own
        fits = [json.loads(p.read_text()) for p in sorted((tmp_path / "side-by-side" / "fits").glob(f"{model}__*.json"))]
        assert len(fits) == 4 and all(f["side_by_side"] == 4 for f in fits)
    assert all(f["teacher_train_s"] > 0 for f in fits)
    rows = {}
    for mode in ("side-by-side", "one-by-one"):
        rows[mode] = {(x["model"], x["dataset"], x["seed"]): x for x in
                      map(json.loads, (tmp_path / mode / "rows.jsonl").read_text().splitlines())}
    assert rows["side-by-side"].keys() == rows["one-by-one"].keys() and len(rows["one-by-one"]) == 12
    for key, a in rows["one-by-one"].items():
        b = rows["side-by-side"][key]
        assert b["w2"] == pytest.approx(a["w2"], abs=1e-3) and b["hq_frac"] == pytest.approx(a["hq_frac"], abs=0.01)
    r = cli("report", tmp_path / "side-by-side", "--compare", tmp_path / "one-by-one")
    assert r.returncode == 0 and r.stdout.count("| ok") == 6 and "REGRESSION" not in r.stdout, r.stdout
    assert "## Rankings by c2st" in r.stdout and "their difference):" not in r.stdout, r.stdout  # no reversal beyond


def test_a_plain_run_says_that_installed_plugins_join(cli, tmp_path, monkeypatch):
    """Without --models every registered model runs; where that takes in a plugin, the run says so
    (here the registry holds the test plugin's gauss alone)."""
    from genbench import registry

    full = registry.discover
    monkeypatch.setattr(registry, "discover", lambda load=True: {"gauss": full()["gauss"]})
    r = cli("run", "--n-samples", "100", "--floor-draws", "2", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "note: no --models given: every registered model runs, plugins included: gauss (toyplug)" in r.stderr
    r = cli("run", "--models", "gauss", "--n-samples", "100", "--floor-draws", "2", "--out", str(tmp_path / "run"))
    assert r.returncode == 0 and "plugins included" not in r.stderr
