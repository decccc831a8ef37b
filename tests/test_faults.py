"""Fault injection: what a run dir survives (kill -9, torn rows and artefacts, a full disk, a
read-only dir, a concurrent run) and what it refuses to do (execute code it reads back). Each test
breaks a real run dir the way a crash, a disk or a person would, then runs the real CLI."""
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

QUICK = ["--models", "gauss", "--datasets", "ring8,moons", "--n-samples", "200", "--floor-draws", "2", "--jobs", "1"]


@pytest.fixture
def gb(plugin_path, tmp_path, monkeypatch):
    """The genbench CLI with the test plugin on the path: in this process, or in a subprocess where
    the test needs one (``background``, or ``preexec`` run in the child before exec: resource
    limits, dropped privileges)."""
    from conftest import in_process

    monkeypatch.syspath_prepend(str(plugin_path))
    monkeypatch.chdir(tmp_path)
    here = in_process(monkeypatch)

    def run(*args, preexec=None, timeout=600, background=False):
        if preexec is None and not background:
            return here(*args)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "genbench.cli", *map(str, args)]
        if background:
            return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, preexec_fn=preexec)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout,
                              preexec_fn=preexec)

    return run


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


def one_line_error(r, code: int, *needles: str, mid_run: bool = False) -> None:
    """Exit ``code`` with one error line holding ``needles``; nothing else on stderr unless the
    failure came ``mid_run`` (the progress bar's line precedes it)."""
    assert r.returncode == code, (r.returncode, r.stdout[-500:], r.stderr)
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and (mid_run or len(lines) == 1), r.stderr
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, r.stderr
    for n in needles:
        assert n in lines[-1], r.stderr


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_torn_last_row_is_quarantined_and_its_cell_redone(gb, tmp_path):
    out = tmp_path / "run"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    text = (out / "rows.jsonl").read_text()
    first, second = text.splitlines()
    (out / "rows.jsonl").write_text(first + "\n" + second[: len(second) // 2])  # killed mid-write
    r = gb("run", *QUICK, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "torn last line of rows.jsonl" in r.stderr and "1 of 2 cells were already done" in r.stderr
    rows = rows_of(out)  # every line parses: the next row did not land on the torn one
    assert Counter((x["model"], x["dataset"]) for x in rows) == {("gauss", "ring8"): 1, ("gauss", "moons"): 1}
    assert (out / "rows.torn").read_text() == second[: len(second) // 2] + "\n"  # kept byte for byte


def test_lines_that_are_not_rows_are_skipped_by_every_reader(gb, tmp_path):
    out = tmp_path / "run"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    with open(out / "rows.jsonl", "a") as fh:
        fh.write("[1, 2, 3]\nnull\n{\"model\": 1}\n")
    r = gb("report", out, "--format", "csv")
    assert r.returncode == 0 and "skipped 3 line(s)" in r.stderr, r.stderr
    assert len(r.stdout.strip().splitlines()) == 3  # header + two cells
    assert gb("plot", out).returncode == 0
    r = gb("run", *QUICK, "--out", out)
    assert r.returncode == 0 and "3 line(s) of rows.jsonl are not rows" in r.stderr, r.stderr


def test_torn_artefacts_heal_on_the_next_run(gb, tmp_path):
    """A truncated checkpoint, fit record or samples file is detected by its checksum: the unit is
    trained again (the row says why) or the cell redone; plot never crashes on one."""
    out = tmp_path / "run"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    ring, moons = out / "samples" / "gauss__ring8__s0.npz", out / "checkpoints" / "gauss__moons__s0.pt"
    ring.write_bytes(ring.read_bytes()[:100])
    r = gb("plot", out)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    moons.write_bytes(moons.read_bytes()[:50])
    kept = [x for x in rows_of(out) if x["dataset"] == "ring8"]
    (out / "rows.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept))  # the moons cell must be redone
    r = gb("run", *QUICK, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "1 finished cell(s) run again: their samples file is missing or does not match" in r.stderr
    latest = {x["dataset"]: x for x in rows_of(out)}
    assert latest["moons"]["status"] == "done" and "checkpoint not reused" in latest["moons"]["refit_reason"]
    assert latest["ring8"]["status"] == "done" and len(rows_of(out)) == 3  # ring8 redone once, appended
    fit = out / "fits" / "gauss__ring8__s0.json"
    fit.write_text(fit.read_text()[:30])
    (out / "rows.jsonl").write_text("")
    r = gb("run", *QUICK, "--out", out)
    assert r.returncode == 0, r.stderr
    latest = {x["dataset"]: x for x in rows_of(out)}
    assert latest["ring8"]["refit_reason"] == "fit record unreadable, torn or altered (its checksum does not match)"
    assert latest["moons"]["refit_reason"] is None  # its checkpoint was whole: reused
    assert not leftovers(out)


def test_a_planted_pickle_runs_no_code_even_with_a_matching_checksum(gb, tmp_path):
    """An attacker who also rewrites the fit record's checksum still meets torch.load(weights_only=True)."""
    import hashlib
    import pickle

    out = tmp_path / "run"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    blob = pickle.dumps(Payload())
    (out / "checkpoints" / "gauss__ring8__s0.pt").write_bytes(blob)
    fit = out / "fits" / "gauss__ring8__s0.json"
    from genbench.store import json_checksum

    rec = json.loads(fit.read_text())
    rec.pop("checksum")
    rec["checkpoint_sha256"] = hashlib.sha256(blob).hexdigest()
    fit.write_text(json.dumps(rec | {"checksum": json_checksum(rec)}))  # the record's own checksum forged too
    (out / "rows.jsonl").write_text("")
    r = gb("run", *QUICK, "--out", out)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    row = {x["dataset"]: x for x in rows_of(out)}["ring8"]
    assert row["status"] == "done" and "UnpicklingError" in row["refit_reason"]


def test_a_second_run_into_a_busy_dir_is_refused_naming_the_holder(gb, tmp_path):
    out = tmp_path / "run"
    first = gb("run", "--models", "vae", "--n-samples", "200", "--out", out, background=True)
    try:
        deadline = time.time() + 120
        while not (out / "manifest.json").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        r = gb("run", "--models", "vae", "--n-samples", "200", "--out", out)
        one_line_error(r, 2, f"in use by another genbench run (pid {first.pid})")
    finally:
        first.kill()
        first.wait()


def test_a_lost_manifest_does_not_disable_the_settings_check(gb, tmp_path):
    out = tmp_path / "run"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    before = (out / "rows.jsonl").read_text()
    (out / "manifest.json").unlink()
    args = [a if a != "200" else "300" for a in QUICK]
    one_line_error(gb("run", *args, "--out", out), 2, "holds rows made with other settings")
    assert (out / "rows.jsonl").read_text() == before
    r = gb("run", *QUICK, "--out", out)  # the same settings: resumed, the manifest rebuilt with the rows' run id
    assert r.returncode == 0 and "2 of 2 cells were already done" in r.stderr, r.stderr
    assert json.loads((out / "manifest.json").read_text())["run_id"] == rows_of(out)[0]["run_id"]


def _file_limit(limit: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_a_full_disk_is_one_line_and_tears_nothing(gb, tmp_path):
    """RLIMIT_FSIZE makes every write past the limit fail as a full disk would (EFBIG; Python
    ignores SIGXFSZ). The run stops with exit 1 naming the file; nothing is torn or left behind,
    and the next run completes the plan."""
    out = tmp_path / "run"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    first = rows_of(out)[0]
    (out / "rows.jsonl").write_text(json.dumps(first) + "\n")
    size = (out / "rows.jsonl").stat().st_size
    for p in (out / "samples").iterdir():
        p.unlink()
    r = gb("run", *QUICK, "--out", out, preexec=_file_limit(size + 200))
    one_line_error(r, 1, "cannot write", "no space", mid_run=True)
    assert (out / "rows.jsonl").read_text() == json.dumps(first) + "\n"
    assert not leftovers(out)
    r = gb("run", *QUICK, "--out", out)
    assert r.returncode == 0, r.stderr
    assert Counter(x["dataset"] for x in rows_of(out)) == {"ring8": 2, "moons": 1}  # ring8: redone (samples gone)


def _without_dac_override():
    """Root ignores file permissions through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: the child drops
    both from its bounding set (kept across exec), so that a read-only dir is one for it too."""
    if os.geteuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                os._exit(99)


@pytest.fixture
def readonly(tmp_path):
    """A folder made read-only after the test has written into it (see ``_without_dac_override``)."""
    top = tmp_path / "ro"
    top.mkdir()

    def seal():
        for p in [top, *top.rglob("*")]:
            os.chmod(p, 0o555 if p.is_dir() else 0o444)
        probe = subprocess.run([sys.executable, "-c", f"open({str(top / 'probe')!r}, 'w')"], capture_output=True,
                               preexec_fn=_without_dac_override)
        if probe.returncode == 0:
            pytest.skip("this process cannot give up its file-permission override (a read-only dir is not one here)")

    yield top, seal
    for p in [top, *top.rglob("*")]:
        if p.is_dir():
            os.chmod(p, 0o755)


@pytest.mark.slow
def test_a_read_only_dir_is_one_line_exit_1(gb, tmp_path, readonly):
    top, seal = readonly
    out = top / "run"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    seal()
    ro = _without_dac_override
    one_line_error(gb("run", *QUICK, "--out", top / "other", preexec=ro), 1, "not writable")
    one_line_error(gb("run", *QUICK, "--out", out, preexec=ro), 1, "cannot write", "it is not writable")
    one_line_error(gb("plot", out, preexec=ro), 1, "not writable")
    one_line_error(gb("report", out, "--out", top / "r.md", preexec=ro), 1, "not writable")
    r = gb("report", out, preexec=ro)  # reading needs no write access
    assert r.returncode == 0 and "| gauss" in r.stdout, r.stderr


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_and_duplicates_nothing(gb, tmp_path):
    """Three runs killed (SIGKILL, SIGTERM, SIGKILL) at random moments (seeded), then one to the
    end: every cell once, done."""
    out = tmp_path / "run"
    args = ["run", "--models", "gauss", "--datasets", "ring8,moons,grid25", "--seeds", "0,1", "--n-samples", "200",
            "--floor-draws", "2", "--out", out]
    rng = random.Random(0)
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        p = gb(*args, background=True)
        time.sleep(rng.uniform(2.0, 8.0))
        p.send_signal(sig)
        p.wait()
    r = gb(*args)
    assert r.returncode == 0, r.stderr
    keys = Counter((x["dataset"], x["seed"]) for x in rows_of(out) if x["status"] == "done")
    assert set(keys) == {(d, s) for d in ("ring8", "moons", "grid25") for s in (0, 1)}
    assert all(c == 1 for c in keys.values()), keys
    assert not leftovers(out)


def test_a_killed_local_worker_never_hangs_the_run(gb, tmp_path):
    """A worker process of '--jobs 2' killed mid-fit (SIGKILL): its task runs again in a fresh pool
    (the run finishes whole); with '--retries 0' its cells become error rows and the rest finish."""
    marker = tmp_path / "die"
    plan = ["--models", "gauss", "--datasets", "ring8,moons", "--seeds", "0,1", "--n-samples", "200",
            "--floor-draws", "2", "--jobs", "2", "--param", "gauss.mode=die", "--param", f"gauss.marker={marker}"]
    marker.touch()  # the first gauss fit that sees it kills its own worker
    r = gb("run", *plan, "--out", tmp_path / "a", timeout=300)
    assert r.returncode == 0, r.stderr
    assert not marker.exists() and {row["status"] for row in rows_of(tmp_path / "a")} == {"done"}
    assert len(rows_of(tmp_path / "a")) == 4

    marker.touch()
    r = gb("run", *plan, "--retries", "0", "--out", tmp_path / "b", timeout=300)
    assert r.returncode == 3, r.stderr
    rows = rows_of(tmp_path / "b")
    failed = [row for row in rows if row["status"] != "done"]
    assert failed and all("a worker process died 1 time(s)" in row["error"] for row in failed), failed
    assert {(row["dataset"], row["seed"]) for row in rows} == {(d, s) for d in ("ring8", "moons") for s in (0, 1)}


def test_an_altered_fit_record_or_floor_is_not_reused(gb, tmp_path):
    """Records carry a checksum of their own content: one digit changed in a fit record or a
    floor, and the cell redone, the record is refitted and the floor recomputed, not trusted."""
    out = tmp_path / "run"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    truth = {r["dataset"]: r for r in rows_of(out)}
    fit = out / "fits" / "gauss__ring8__s0.json"
    fit.write_text(fit.read_text().replace('"final_loss": 0.0', '"final_loss": 7.0'))
    floor = out / "floors" / "moons__s0.json"
    w2 = json.loads(floor.read_text())["value"]["w2_floor"]
    floor.write_text(floor.read_text().replace(json.dumps(w2), json.dumps(w2 / 2)))
    for p in (out / "samples").iterdir():
        p.unlink()
    assert gb("run", *QUICK, "--out", out).returncode == 0
    redone = {r["dataset"]: r for r in rows_of(out)}
    assert redone["ring8"]["final_loss"] == 0.0 and "fit record" in redone["ring8"]["refit_reason"]
    assert redone["moons"]["w2_floor"] == truth["moons"]["w2_floor"] == w2


def test_a_line_that_is_not_text_is_skipped_by_a_run_with_workers(gb, tmp_path):
    out = tmp_path / "run"
    plan = [*QUICK[:-2], "--seeds", "0,1", "--jobs", "2", "--out", out]
    assert gb("run", *plan).returncode == 0
    with open(out / "rows.jsonl", "ab") as fh:
        fh.write(b"\xff\xfe not utf-8 \xc3\x28\n")
    r = gb("run", *plan)
    assert r.returncode == 0 and "1 line(s) of rows.jsonl are not rows" in r.stderr, r.stderr


def test_broken_records_and_rows_are_skipped_by_report_and_plot(gb, tmp_path):
    """A fit record whose losses are text, one that is a JSON list, and a row whose device_name
    is a list: report and plot skip them with a notice and exit 0."""
    out = tmp_path / "run"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    (out / "fits" / "gauss__ring8__s0.json").write_text('{"losses": "x", "log_every": "y"}')
    (out / "fits" / "gauss__moons__s0.json").write_text("[1, 2]")
    row = rows_of(out)[0] | {"device_name": ["a", "b"], "dataset": "moons"}
    with open(out / "rows.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    for args in (["report", out], ["plot", out]):
        r = gb(*args)
        assert r.returncode == 0 and "skipped 1 line(s) that are not rows" in r.stderr, (args, r.stderr)
        assert "internal error" not in r.stderr


@pytest.mark.parametrize("entry", ["rows.jsonl", "samples", ".lock", "floors"])
def test_nothing_is_written_through_a_link_out_of_the_run_dir(gb, tmp_path, entry):
    out, outside = tmp_path / "run", tmp_path / "outside"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    outside.mkdir()
    target = outside / ("dir" if entry in ("samples", "floors") else "file")
    if entry in ("samples", "floors"):
        (out / entry).rename(target)
        for p in target.iterdir() if entry == "samples" else []:
            p.unlink()  # its cells are redone: their samples are written again
    else:
        target.write_bytes((out / entry).read_bytes() if (out / entry).exists() else b"precious")
        (out / entry).unlink()
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    (out / entry).symlink_to(target)
    for p in (out / "samples").iterdir() if entry != "samples" else []:
        p.unlink()  # cells to redo: their samples are written again
    if entry == "floors":
        (out / "rows.jsonl").unlink()
    r = gb("run", *QUICK, "--out", out)
    one_line_error(r, 1, "is a symbolic link", mid_run=True)
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before  # nothing written outside


def test_report_out_never_replaces_a_device_and_writes_through_links(gb, tmp_path):
    out = tmp_path / "run"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    r = gb("report", out, "--out", "/dev/null")
    assert r.returncode == 0, r.stderr
    assert Path("/dev/null").is_char_device()
    link = tmp_path / "null-link"
    link.symlink_to("/dev/null")
    assert gb("report", out, "--out", link).returncode == 0
    assert link.is_symlink() and Path("/dev/null").is_char_device()
    target = tmp_path / "report.md"
    target.write_text("old")
    (tmp_path / "md-link").symlink_to(target)
    assert gb("report", out, "--out", tmp_path / "md-link").returncode == 0
    assert (tmp_path / "md-link").is_symlink() and "gauss" in target.read_text()  # the link's target written


def test_a_read_only_samples_dir_is_one_line_exit_1(gb, tmp_path):
    """The temporary file's cleanup fails in a read-only dir too; the first error is the one named."""
    out = tmp_path / "run"
    assert gb("run", *QUICK, "--out", out).returncode == 0
    for p in (out / "samples").iterdir():
        p.unlink()
    os.chmod(out / "samples", 0o555)
    try:
        r = gb("run", *QUICK, "--out", out, preexec=_without_dac_override)
        if r.returncode == 0:
            pytest.skip("this process cannot give up its file-permission override")
        one_line_error(r, 1, "cannot write", "samples", mid_run=True)
        assert all(row["status"] == "done" for row in rows_of(out))  # no error rows
    finally:
        os.chmod(out / "samples", 0o755)
