import json
import os

import pytest
import signal
import subprocess
import sys
import time
from collections import Counter

pytestmark = pytest.mark.slow  # real processes killed, interrupted and pooled: end-to-end runs


@pytest.mark.parametrize("jobs", [1, 2])
def test_killed_run_resumes_without_redoing_finished_cells(plugin_path, tmp_path, jobs):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "genbench.cli", "run", "--models", "gauss,vae", "--datasets", "ring8,moons",
           "--budget", "quick", "--n-samples", "300", "--jobs", str(jobs), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(plugin_path))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows_file = out / "rows.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for both gauss cells, then kill while vae trains
        if rows_file.exists() and len(rows_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # worker processes must leave with the run that started them, writing nothing more
    first = rows_file.read_text()
    time.sleep(2)
    assert rows_file.read_text() == first
    n_first = len(first.splitlines())
    assert 2 <= n_first < 4, "the run should have been killed mid-way"

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    text = rows_file.read_text()
    assert text.startswith(first)  # finished rows untouched
    rows = [json.loads(l) for l in text.splitlines()]
    keys = Counter((x["model"], x["dataset"]) for x in rows)
    assert set(keys) == {(m, d) for m in ("gauss", "vae") for d in ("ring8", "moons")}
    assert all(c == 1 for c in keys.values()), keys  # nothing redone
    assert all(x["status"] == "done" for x in rows)


def test_parallel_run_gives_the_serial_rows(cli_process, tmp_path):
    """--jobs 2 runs fit chains in two processes (cm-cd with its teacher in one); every cell is
    written once and the numbers are those of the serial run (same seeds, one thread each)."""
    common = ["run", "--models", "gauss,cm-cd,vae", "--datasets", "ring8,moons", "--budget", "quick",
              "--n-samples", "300"]
    for jobs in (1, 2):
        r = cli_process(*common, "--jobs", str(jobs), "--out", str(tmp_path / f"j{jobs}"))
        assert r.returncode == 0, r.stderr
    rows = {}
    for jobs in (1, 2):
        lines = (tmp_path / f"j{jobs}" / "rows.jsonl").read_text().splitlines()
        rows[jobs] = {(x["model"], x["dataset"]): x for x in map(json.loads, lines)}
        assert len(lines) == len(rows[jobs]) == 6
        assert {x["jobs"] for x in rows[jobs].values()} == {jobs}
        assert all(x["status"] == "done" for x in rows[jobs].values())
    for key, serial in rows[1].items():
        assert rows[2][key]["w2"] == serial["w2"], key
        assert rows[2][key]["teacher_train_s"] is not None or key[0] != "cm-cd"


def _terminal_sigint():
    """SIGINT at its default in the run, as in a terminal: a harness started in the background
    passes SIGINT ignored down to its children, and the run then rightly ignores Ctrl-C too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_parallel_run_at_once(plugin_path, tmp_path):
    """Ctrl-C (SIGINT to the whole process group) ends the run and its workers within seconds,
    without a traceback, while the workers are still training."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(plugin_path))
    proc = subprocess.Popen([sys.executable, "-m", "genbench.cli", "run", "--models", "vae,flow", "--datasets",
                             "ring8,moons", "--n-samples", "300", "--jobs", "2", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_terminal_sigint)
    deadline = time.time() + 120
    while not (out / "manifest.json").exists() and time.time() < deadline:  # written just before the workers start
        time.sleep(0.1)
    time.sleep(4)  # workers starting or training (default budget: a fit takes tens of seconds)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 30  # promptly: the workers are terminated, not waited for (a hang meets the 60 s timeout)
    assert proc.returncode != 0 and "Traceback" not in err
    rows = out / "rows.jsonl"
    before = rows.read_text() if rows.exists() else ""
    time.sleep(3)
    assert (rows.read_text() if rows.exists() else "") == before  # no worker left running


def test_a_planted_pickle_checkpoint_runs_no_code_and_is_retrained(cli_process, tmp_path):
    """Checkpoints are read with weights_only=True: a pickle whose __reduce__ runs a command is
    refused, and the unit is trained again."""
    import pickle

    out = tmp_path / "run"
    args = ["run", "--models", "vae", "--budget", "quick", "--n-samples", "200", "--out", str(out)]
    assert cli_process(*args).returncode == 0
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = next((out / "checkpoints").glob("vae__ring8__s0.pt"))
    ckpt.write_bytes(pickle.dumps(Payload()))
    (out / "rows.jsonl").unlink()  # the cell must be redone, so the checkpoint is read
    r = cli_process(*args)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    row = json.loads((out / "rows.jsonl").read_text())
    assert row["status"] == "done"
    import torch

    assert "enc" in torch.load(ckpt, weights_only=True)  # the unit was trained again and saved
