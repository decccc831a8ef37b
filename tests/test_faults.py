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
    assert latest["ring8"]["refit_reason"] == "fit record unreadable (torn or foreign)"
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
    rec = json.loads(fit.read_text())
    rec["checkpoint_sha256"] = hashlib.sha256(blob).hexdigest()
    fit.write_text(json.dumps(rec))
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
