import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter


def test_killed_run_resumes_without_redoing_finished_cells(plugin_path, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "genbench.cli", "run", "--models", "gauss,vae", "--datasets", "ring8,moons",
           "--budget", "quick", "--n-samples", "300", "--out", str(out)]
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
    first = rows_file.read_text()
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
