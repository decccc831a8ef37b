"""A run directory on disk.

    manifest.json          settings, versions, device, git sha, the config of every model
    rows.jsonl             one JSON row per cell, appended (one write + fsync) the moment it ends
    samples/<cell>.npz     generated samples (+ trajectories / one-step maps where a model has them)
    fits/<unit>.json       training record of each fitted model (loss curve, times)
    floors/<dataset>__s<seed>.json  every metric's noise floor for that reference sample
    checkpoints/<unit>.pt  trained weights (reused on resume and as teachers)

A row appended by a run that was killed mid-write is at worst a partial last line, which readers
skip; a later row with the same key supersedes an earlier one (a re-run of a failed cell).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .api import UsageError

KEY = ("model", "dataset", "seed", "steps")


def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY)


def cell_name(model: str, dataset: str, seed: int, steps: int | None = None) -> str:
    return f"{model}__{dataset}__s{seed}" + ("" if steps is None else f"__k{steps}")


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -- manifest -----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"run dir {self.path}: unreadable manifest.json ({e})") from None

    def write_manifest(self, manifest: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.manifest_path)

    # -- rows ---------------------------------------------------------------------------------
    @property
    def rows_path(self) -> Path:
        return self.path / "rows.jsonl"

    def append_row(self, row: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(row, default=float) + "\n").encode()
        fd = os.open(self.rows_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def rows(self) -> list[dict]:
        """The latest row of each cell, in the order cells first appeared."""
        if not self.rows_path.exists():
            return []
        latest: dict[tuple, dict] = {}
        for line in self.rows_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial line left by a killed run
            latest[row_key(row)] = row
        return list(latest.values())

    # -- per-cell files -----------------------------------------------------------------------
    def file(self, kind: str, name: str, suffix: str) -> Path:
        p = self.path / kind / f"{name}{suffix}"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def save_samples(self, name: str, **arrays) -> Path:
        import numpy as np

        p = self.file("samples", name, ".npz")
        tmp = p.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, p)
        return p

    def load_samples(self, name: str) -> dict | None:
        import numpy as np

        p = self.path / "samples" / f"{name}.npz"
        if not p.exists():
            return None
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

    def save_json(self, kind: str, name: str, obj) -> None:
        p = self.file(kind, name, ".json")
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, default=float))
        os.replace(tmp, p)

    def load_json(self, kind: str, name: str):
        p = self.path / kind / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def cached_json(self, kind: str, name: str, ident: dict, compute):
        """``compute()``'s result, saved as kind/name.json beside ``ident`` and reused while the
        saved ident matches; processes sharing the run dir take a lock so one computes, the others
        wait and read it."""
        import fcntl

        lock = self.file(kind, name, ".lock")
        with open(lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                saved = self.load_json(kind, name)
            except (OSError, json.JSONDecodeError):
                saved = None
            if isinstance(saved, dict) and saved.get("ident") == json.loads(json.dumps(ident, default=str)):
                return saved["value"]
            value = compute()
            self.save_json(kind, name, {"ident": ident, "value": value})
            return value


def open_existing(path: str | os.PathLike) -> RunDir:
    """A run dir to read (report / plot): it must exist and hold rows."""
    rd = RunDir(path)
    if not rd.path.is_dir():
        raise UsageError(f"run dir {rd.path} does not exist; give a directory written by 'genbench run'")
    rd.read_manifest()
    if not rd.rows_path.exists():
        raise UsageError(f"run dir {rd.path} holds no rows.jsonl; give a directory written by 'genbench run'")
    return rd


def open_many(path: str | os.PathLike) -> list[RunDir]:
    """A run dir, or a folder whose subfolders are run dirs (a baseline made by several processes)."""
    p = Path(path)
    if p.is_dir() and not (p / "rows.jsonl").exists():
        subs = sorted(d for d in p.iterdir() if (d / "rows.jsonl").exists())
        if subs:
            return [open_existing(d) for d in subs]
    return [open_existing(p)]
