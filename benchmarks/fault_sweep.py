"""A fault and bad-input sweep of `genbench run` (minutes; not part of the test suite).

Every fault breaks a real run of a small plan (diffusion with two step counts, its cm-cd student,
the VAE; two datasets; `--jobs` 1 and 2) the way a crash, a disk or a person would, then runs the
same command again (once more where the first answer was the expected refusal), and compares
the finished run dir with an uninterrupted reference run: every cell done, every figure but
timing and provenance equal to the reference's, nothing written outside the run dir, no run
left hanging. Bad inputs must exit 2 with one line on stderr and create nothing.

    python benchmarks/fault_sweep.py [--faults 40] [--seed 0] [--out /tmp/genbench-sweep]

Prints one line per fault and per bad input, then the totals.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PLAN = ["--models", "diffusion,cm-cd,vae", "--datasets", "ring8,moons", "--seeds", "0", "--budget", "quick",
        "--steps", "diffusion=1:4,cm-cd=1:2", "--param", "diffusion.train_steps=120", "--param",
        "cm-cd.train_steps=100", "--param", "vae.train_steps=120", "--param", "diffusion.nll_points=100",
        "--n-samples", "300", "--floor-draws", "2", "--threads", "1"]
#: row fields that differ between two runs of one plan: identity, provenance, timing
NOT_COMPARED = {"run_id", "executor", "jobs", "score_jobs", "host", "train_s", "teacher_train_s", "sample_s",
                "sample_s_min", "sample_s_iqr", "sample_calls", "sample_calls_per_block", "git_sha", "fit_sha256",
                "refit_reason", "group_train_s"}
TIMEOUT = 300


def genbench(*args, preexec=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genbench.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "genbench.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def rows(out: Path) -> dict:
    got = {}
    for line in (out / "rows.jsonl").read_bytes().splitlines():
        try:
            r = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(r, dict) and "model" in r:
            got[(r["model"], r["dataset"], r["seed"], r["steps"])] = r
    return got


def differences(out: Path, ref: dict) -> list[str]:
    """What the finished run dir ``out`` lacks or holds otherwise than the reference."""
    if not (out / "rows.jsonl").exists():
        return ["no rows.jsonl"]
    got = rows(out)
    bad = [f"missing {k}" for k in ref if k not in got]
    for k, r in got.items():
        if k not in ref:
            bad.append(f"extra {k}")
            continue
        if r.get("status") != "done":
            bad.append(f"{k} {r.get('status')}: {r.get('error')}")
            continue
        for f in set(r) | set(ref[k]):
            if f not in NOT_COMPARED and r.get(f) != ref[k].get(f):
                bad.append(f"{k} {f}: {r.get(f)!r} != {ref[k].get(f)!r}")
    return bad


def one_line(r, code: int) -> bool:
    lines = r.stderr.strip().splitlines()
    return r.returncode == code and "Traceback" not in r.stderr and len([x for x in lines if x.startswith("error:")]) == 1


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (read off /proc: each process's parent)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


# -- the faults ---------------------------------------------------------------------------------
def kill_main(out, rng, jobs, sig, duration):
    """The run's own process signalled at a random moment of its run."""
    p = start("run", *PLAN, "--jobs", jobs, "--out", out)
    time.sleep(rng.uniform(0.05, 1.0) * duration)
    os.killpg(p.pid, sig) if sig == signal.SIGKILL else p.send_signal(sig)
    p.wait(TIMEOUT)
    return f"{signal.Signals(sig).name} of the run (jobs {jobs})"


def kill_worker(out, rng, duration, how):
    """A worker process (a fit worker of '--jobs 2', or the scoring process of '--score-jobs 1')
    killed at a random moment once the workers run; the run must end by itself."""
    p = start("run", *PLAN, *how, "--out", out)
    t0 = time.perf_counter()
    while not children(p.pid) and p.poll() is None and time.perf_counter() - t0 < duration:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 0.5) * duration)
    kids = children(p.pid)
    if kids:
        os.kill(rng.choice(kids), signal.SIGKILL)
    try:
        p.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise RuntimeError("the run hung after a worker was killed") from None
    return f"SIGKILL of a worker process ({' '.join(how)}, {len(kids)} descendants, exit {p.returncode})"


def break_artefact(out, rng, ref_dir):
    """A finished run dir's artefact torn, flipped, emptied, deleted, swapped for a folder, or a
    rows line torn / doubled / made binary; then the same command again."""
    shutil.copytree(ref_dir, out)
    files = [p for p in out.rglob("*") if p.is_file() and p.name not in (".lock",)]
    p = rng.choice(files)
    how = rng.choice(["truncate", "flip", "empty", "delete", "folder", "garbage-line", "torn-line", "double-line"])
    data = p.read_bytes()
    if how == "truncate":
        p.write_bytes(data[: rng.randrange(max(1, len(data)))])
    elif how == "flip" and data:
        i = rng.randrange(len(data))
        p.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:])
    elif how == "empty":
        p.write_bytes(b"")
    elif how == "delete":
        p.unlink()
    elif how == "folder":  # refused with one line (exit 1); the person then removes the folder
        p.unlink()
        p.mkdir()
        r = genbench("run", *PLAN, "--jobs", "1", "--out", out)
        if p.name != "manifest.json" and r.returncode != 0 and not one_line(r, 1):
            raise RuntimeError(f"a folder in place of {p.name}: answered {r.returncode}: {r.stderr.strip()[-200:]}")
        p.rmdir() if p.is_dir() else None
    else:
        rp = out / "rows.jsonl"
        lines = rp.read_bytes().splitlines(keepends=True)
        if how == "garbage-line":
            lines.insert(rng.randrange(len(lines) + 1), b"\x00\xffnot a row\n")
        elif how == "torn-line":
            lines[-1] = lines[-1][: len(lines[-1]) // 2]
        else:
            lines.append(rng.choice(lines))
        rp.write_bytes(b"".join(lines))
        p = rp
    return f"{how} {p.relative_to(out)}"


def disk_full(out, rng, ref_dir):
    """Writes fail past a random file size (RLIMIT_FSIZE, as a full disk would)."""
    limit = rng.choice([200, 2_000, 20_000, 200_000])

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = genbench("run", *PLAN, "--jobs", "1", "--out", out, preexec=cap)
    if r.returncode not in (0, 1) or (r.returncode == 1 and not one_line(r, 1)):
        raise RuntimeError(f"a full disk answered {r.returncode}: {r.stderr.strip()[-200:]}")
    return f"file size limit {limit} B"


def link_out(out, rng, ref_dir):
    """A run-dir entry replaced by a symbolic link to a file or folder outside it."""
    shutil.copytree(ref_dir, out)
    outside = out.parent / f"{out.name}-outside"
    outside.mkdir()
    name = rng.choice(["rows.jsonl", ".lock", "samples", "checkpoints", "fits", "manifest.json"])
    src = out / name
    dst = outside / name
    shutil.move(src, dst)
    src.symlink_to(dst)
    for s in (out / "samples").glob("*.npz") if name != "samples" else dst.glob("*.npz"):
        s.unlink()  # cells to redo: something must be written
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    r = genbench("run", *PLAN, "--jobs", "1", "--out", out)
    after = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    if after != before:
        raise RuntimeError(f"{name}: a file outside the run dir was written")
    if r.returncode != 0 and not one_line(r, 1):  # read through it, or refused with one line
        raise RuntimeError(f"{name}: answered {r.returncode}: {r.stderr.strip()[-200:]}")
    src.unlink()
    shutil.move(dst, src)
    how = "refused" if r.returncode else "only read through"
    return f"symlink {name} -> outside ({how}, nothing written outside)"


# -- bad inputs ---------------------------------------------------------------------------------
def bad_inputs() -> list[list[str]]:
    base = ["run", "--models", "vae", "--datasets", "ring8"]
    out = [
        ["run", "--models", "nosuch"], ["run", "--models", "vae,"], ["run", "--models", ",vae"],
        ["run", "--models", "vae,vae"], ["run", "--models", "VAE"], ["run", "--models", "vae;flow"],
        ["run", "--datasets", "ring8,"], ["run", "--datasets", "Ring8"], ["run", "--datasets", "moons,moons"],
        ["run", "--seeds", "a"], ["run", "--seeds", "1.5"], ["run", "--seeds", "0x10"], ["run", "--seeds", "+1"],
        ["run", "--seeds", "1,1"], ["run", "--seeds", "٣"], ["run", "--seeds", " "],
        ["run", "--steps", "0"], ["run", "--steps", "-3"], ["run", "--steps", "1.5"], ["run", "--steps", "a"],
        ["run", "--steps", "1,,2"], ["run", "--steps", "diffusion="], ["run", "--steps", "=3"],
        ["run", "--steps", "diffusion=1,3"], ["run", "--steps", "diffusion=1:1"], ["run", "--budget", ""],
        ["run", "--budget", "Quick"], ["run", "--n-samples", "0"], ["run", "--n-samples", "-5"],
        ["run", "--n-samples", "1.5"], ["run", "--n-samples", "10**9"], ["run", "--n-samples", "100000000"],
        ["run", "--floor-draws", "0"], ["run", "--floor-draws", "x"], ["run", "--metrics", "w2,"],
        ["run", "--metrics", "W2"], ["run", "--metrics", "default,default"], ["run", "--device", "gpu"],
        ["run", "--device", ""], ["run", "--device", "cuda"], ["run", "--threads", "-1"], ["run", "--threads", "2.5"],
        ["run", "--jobs", "x"], ["run", "--jobs", "-2"], ["run", "--score-jobs", "x"], ["run", "--score-jobs", "-3"],
        ["run", "--score-jobs", "9999"], ["run", "--param", "vae"], ["run", "--param", "vae.lr"],
        ["run", "--param", "vae.lr="], ["run", "--param", ".lr=1"], ["run", "--param", "vae.=1"],
        ["run", "--param", "vae.lr=abc"], ["run", "--param", "vae.lr=inf"], ["run", "--param", "vae.lr=-inf"],
        ["run", "--param", "vae.lr=0"], ["run", "--param", "vae.batch=1.5"], ["run", "--param", "vae.batch=0"],
        ["run", "--param", "vae.batch=3000000000"], ["run", "--param", "vae.cuda_graph=maybe"],
        ["run", "--param", "nosuch.lr=1"], ["run", "--param", "flow.lr=1"], ["run", "--param", "vae.nosuch=1"],
        ["run", "--executor", "mpi"], ["run", "--executor", ""], ["run", "--address", "x:1"],
        ["run", "--slurm", "partition=gpu"], ["run", "--retries", "-1"], ["run", "--task-gpus", "2"],
        ["run", "--executor", "ray", "--task-gpus", "0"], ["run", "--out", ""], ["run", "--out", "x" * 300],
        ["run", "--frobnicate"], ["run", "extra"], ["run", "--datasets", "ring8", "moons"],
        ["run", "--seeds"], ["report"], ["report", "nosuchdir"], ["report", "--format", "xls", "."],
        ["report", ".", "--compare"], ["plot"], ["plot", "nosuchdir"], ["plot", ".", "--out", ""],
        ["calibrate", "--datasets", "nosuch"], ["calibrate", "--defects", "blur=0"], ["calibrate", "--defects", ""],
        ["calibrate", "--reps", "1"], ["calibrate", "--n-samples", "5"], ["calibrate", "--jobs", "-1"],
        ["calibrate", "--device", "tpu"], ["calibrate", "--out", "table.xlsx"], ["calibrate", "--metrics", ""],
        ["calibrate", "--n-samples", "1000000000000"], ["reproduce", "--budget", "nosuch"],
        ["reproduce", "--param", "x"], ["reproduce", "--threads", "0"], ["bench-sampler", "--steps", "0"],
        ["bench-sampler", "--sampler", "rk4"], ["bench-sampler", "--repeats", "1"], ["nosuchcommand"],
    ]
    return [a if a[0] != "run" or "--models" in a else base + a[1:] for a in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/genbench-sweep")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    ref_dir = root / "reference"
    r = genbench("run", *PLAN, "--jobs", "1", "--out", ref_dir)
    assert r.returncode == 0, r.stderr
    duration = time.perf_counter() - t0
    ref = rows(ref_dir)
    print(f"reference: {len(ref)} cells in {duration:.0f} s", flush=True)

    kinds = ([lambda o, j=j, s=s: kill_main(o, rng, j, s, duration) for j in (1, 2)
              for s in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)]
             + [lambda o: kill_worker(o, rng, duration, ["--jobs", "2"])] * 2
             + [lambda o: kill_worker(o, rng, duration, ["--jobs", "1", "--score-jobs", "1"])] * 2
             + [lambda o: break_artefact(o, rng, ref_dir)] * 4 + [lambda o: disk_full(o, rng, ref_dir)] * 2
             + [lambda o: link_out(o, rng, ref_dir)] * 2)
    survived, failed = 0, []
    for i in range(args.faults):
        out = root / f"fault{i}"
        try:
            what = rng.choice(kinds)(out)
            r = genbench("run", *PLAN, "--jobs", rng.choice(["1", "2"]), "--out", out)  # resume / repair
            if r.returncode != 0:
                raise RuntimeError(f"the run after the fault answered {r.returncode}: {r.stderr.strip()[-300:]}")
            bad = differences(out, ref)
            if bad:
                raise RuntimeError("; ".join(bad[:3]))
            survived += 1
            print(f"ok    {i:3d} {what}", flush=True)
        except Exception as e:  # noqa: BLE001 - a failure of the sweep is reported, the sweep goes on
            failed.append((i, f"{type(e).__name__}: {e}"))
            print(f"FAIL  {i:3d} {e}", flush=True)

    bad_ok, bad_failed = 0, []
    scratch = root / "bad"
    scratch.mkdir()
    for a in bad_inputs():
        r = subprocess.run([sys.executable, "-m", "genbench.cli", *a], capture_output=True, text=True, cwd=scratch,
                           timeout=120)
        made = list(scratch.iterdir())
        if r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not made:
            bad_ok += 1
        else:
            bad_failed.append((a, r.returncode, r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else "",
                               [p.name for p in made]))
            for p in made:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    for a, code, last, made in bad_failed:
        print(f"BAD   {' '.join(a)!r}: exit {code}, {last}, created {made}", flush=True)
    n_bad = len(bad_inputs())
    print(f"\nfaults: {args.faults} tried, {survived} survived with nothing lost, {len(failed)} failed")
    print(f"bad inputs: {n_bad} tried, {bad_ok} answered with one line and exit 2, {len(bad_failed)} otherwise")
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    sys.exit(1 if failed or bad_failed else 0)


if __name__ == "__main__":
    main()
