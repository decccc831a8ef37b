"""A run directory on disk.

    manifest.json          settings, versions, device, git sha, the config of every model
    rows.jsonl             one JSON row per cell, appended whole (under a lock, checked, fsynced)
    samples/<cell>.npz     generated samples (+ trajectories / one-step maps where a model has them)
    fits/<unit>.json       training record of each fitted model (loss curve, times, checkpoint sha256)
    floors/<dataset>__s<seed>.json  every metric's noise floor for that reference sample
    checkpoints/<unit>.pt  trained weights (reused on resume and as teachers)
    .lock                  held by the one run writing the dir (its pid inside)

Every artefact is written to a temporary file, fsynced and renamed into place, so it is whole or
absent; its sha256 is recorded (the samples' and the fit record's in the cell's row, the
checkpoint's in the fit record) and checked before it is reused. A row is appended under an
exclusive lock of rows.jsonl; a short write is undone (the file is cut back to where it was). A
torn last line (a writer killed mid-write) is moved to ``rows.torn`` when the dir is next opened
for writing; readers skip lines that are not JSON objects and count them. A later row with the
same key supersedes an earlier one (a re-run of a failed cell). Nothing read back is executed:
rows, records and manifests are JSON, samples are loaded with ``allow_pickle=False``, checkpoints
with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import stat
from pathlib import Path

from .api import RunDirError, UsageError

KEY = ("model", "dataset", "seed", "steps")
#: the artefact folders of a run dir and their files' suffix
ARTEFACTS = {"samples": ".npz", "fits": ".json", "floors": ".json", "checkpoints": ".pt"}
#: an artefact's relative path, kind/name.suffix, a plain name in its folder (what a task may hand back)
_ARTEFACT = re.compile("^(" + "|".join(f"{kind}/[A-Za-z0-9][A-Za-z0-9._+-]*{re.escape(suffix)}"
                                       for kind, suffix in ARTEFACTS.items()) + ")$")


def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY)


def cell_name(model: str, dataset: str, seed: int, steps: int | None = None) -> str:
    """The file name of a fit unit's artefacts (fits/, checkpoints/) or, with ``steps``, a cell's (samples/)."""
    return f"{model}__{dataset}__s{seed}" + ("" if steps is None else f"__k{steps}")


def floor_name(dataset: str, seed: int) -> str:
    """The file name of a (dataset, seed)'s noise floors (floors/)."""
    return f"{dataset}__s{seed}"


def artefact_rel(kind: str, name: str) -> str:
    return f"{kind}/{name}{ARTEFACTS[kind]}"


def load_state(data: bytes, device: str):
    """A checkpoint's state dict from its bytes, read as data: tensors and plain containers only
    (``torch.load(weights_only=True)``), never code."""
    import torch

    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def torch_bytes(state) -> bytes:
    """``torch.save`` of a state (tensors and plain containers) into bytes."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def finite_json(obj):
    """``obj`` with every non-finite float replaced by None, so that strict JSON readers accept it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return finite_json(obj.item())
    return obj


def dumps(obj, **kw) -> str:
    return json.dumps(finite_json(obj), allow_nan=False, default=str, **kw)


#: the row fields that hold a JSON object (every other field holds a number, text, a boolean or null)
NESTED_ROW_FIELDS = ("metric_errors",)


def _flat(row: dict) -> bool:
    """Whether every value of ``row`` is a scalar (or, in NESTED_ROW_FIELDS, an object of scalars)."""
    scalar = (str, int, float, bool, type(None))
    return all(isinstance(v, scalar) or (k in NESTED_ROW_FIELDS and isinstance(v, dict)
                                         and all(isinstance(x, scalar) for x in v.values())) for k, v in row.items())


def json_checksum(obj) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, as ``dumps`` writes it back)."""
    return sha256(dumps(json.loads(dumps(obj)), sort_keys=True).encode())


def environment_error(path: Path, e: OSError) -> RunDirError:
    """A one-line error naming the path and the cause (a full disk, permissions, ...)."""
    cause = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file size limit reached (no space)",
             errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
             errno.ENAMETOOLONG: "file name too long", errno.ENOTDIR: "a path component is a file"}.get(
        e.errno, e.strerror or str(e))
    return RunDirError(f"cannot write {path}: {cause}")


def no_links(path: Path, root: Path) -> None:
    """Refuses (RunDirError) a ``path`` under ``root`` any of whose components below ``root`` is a
    symbolic link: genbench writes only inside its run dir, never through a link out of it."""
    rel = Path(path).relative_to(root)
    at = Path(root)
    for part in rel.parts:
        at = at / part
        if at.is_symlink():
            raise RunDirError(f"cannot write {path}: {at} is a symbolic link (to {os.readlink(at)}); genbench "
                              "writes only regular files inside its run dir: remove the link")


def atomic_write(path: Path, data: bytes, root: Path | None = None) -> None:
    """``data`` written to a temporary file, fsynced, then renamed over ``path``: the file is whole or
    as it was; on failure the temporary file is removed and a RunDirError raised (naming the first
    error, never one of the cleanup). With ``root`` (a run dir), no component of ``path`` below it
    may be a symbolic link. Without, ``path`` may be a link (its target is written) or a character
    device or FIFO (written through: ``--out /dev/stdout``); nothing that is not a regular file is
    ever renamed over."""
    path = Path(path)
    if root is not None:
        no_links(path, root)
    else:
        path = Path(os.path.realpath(path)) if path.is_symlink() else path
        if path.exists() and not path.is_file():
            mode = path.stat().st_mode
            if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
                raise RunDirError(f"cannot write {path}: it is not a regular file, a character device or a FIFO")
            try:
                with open(path, "wb") as fh:
                    fh.write(data)
            except OSError as e:
                raise environment_error(path, e) from None
            return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # a read-only dir refuses the cleanup too: the first error is the one
            tmp.unlink(missing_ok=True)
        raise environment_error(path, e) from None


def check_out_dir(out: str | os.PathLike) -> Path:
    """An output directory that exists, or can be created, and can be written; checked without
    creating anything. A path that cannot be a directory is a UsageError (exit 2), one the file
    system refuses (permissions, read-only) a RunDirError (exit 1)."""
    p = Path(out)
    too_long = [part for part in p.parts if len(os.fsencode(part)) > 255]
    if too_long:
        raise UsageError(f"output path {str(p)[:80]}...: a name in it is {len(os.fsencode(too_long[0]))} bytes long; "
                         "file systems allow at most 255")
    if p.exists() and not p.is_dir():
        raise UsageError(f"output path {p} is a file, not a directory; give a directory")
    ancestor = p
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"output path {p}: {ancestor} is a file, so {p} cannot be a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        where = "it" if ancestor == p else str(ancestor)
        raise RunDirError(f"cannot write {p}: {where} is not writable (permissions or a read-only file system)")
    return p


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.skipped_lines = 0  # lines of rows.jsonl that the last read could not use
        self._lock_fh = None

    # -- the writer's lock ----------------------------------------------------------------------
    def lock(self) -> None:
        """Takes the dir for this process (an exclusive flock held until ``unlock`` or exit); a
        second writer gets a UsageError naming the holder's pid. Taking it twice is a no-op."""
        if self._lock_fh is not None:
            return
        p = self.path / ".lock"
        no_links(p, self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fh = os.fdopen(os.open(p, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644), "a+")
        except OSError as e:
            raise environment_error(p, e) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise UsageError(f"run dir {self.path} is in use by another genbench run (pid {holder}); "
                             "wait for it to end or use another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_fh = fh

    def unlock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()  # closing releases the flock
            self._lock_fh = None

    # -- manifest -----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            m = json.loads(self.manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"run dir {self.path}: unreadable manifest.json ({type(e).__name__}); move it "
                             "away and re-run to rebuild it from the rows") from None
        if not isinstance(m, dict):
            raise UsageError(f"run dir {self.path}: manifest.json holds a {type(m).__name__}, not a JSON object; "
                             "move it away and re-run to rebuild it from the rows")
        return m

    def write_manifest(self, manifest: dict) -> None:
        atomic_write(self.manifest_path, dumps(manifest, indent=2, sort_keys=True).encode(), root=self.path)

    # -- rows ---------------------------------------------------------------------------------
    @property
    def rows_path(self) -> Path:
        return self.path / "rows.jsonl"

    def _cut_torn_tail(self, fd: int) -> int:
        """Moves bytes after the last newline (a torn last line) to rows.torn; returns their count.
        Called with rows.jsonl locked."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return 0
        start = size
        while start > 0:
            chunk = os.pread(fd, min(65536, start), max(0, start - 65536))
            i = chunk.rfind(b"\n")
            if i >= 0:
                start = max(0, start - 65536) + i + 1
                break
            start = max(0, start - 65536)
        torn = os.pread(fd, size - start, start)
        no_links(self.path / "rows.torn", self.path)
        with os.fdopen(os.open(self.path / "rows.torn", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                               0o644), "ab") as fh:
            fh.write(torn + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.ftruncate(fd, start)
        return len(torn)

    def _open_rows(self) -> int:
        """rows.jsonl opened for appending and locked exclusively; RunDirError where it cannot be."""
        no_links(self.rows_path, self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.rows_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise environment_error(self.rows_path, e) from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def repair(self) -> int:
        """Quarantines a torn last line of rows.jsonl (see the module doc); returns its size in bytes."""
        if not self.rows_path.exists():
            return 0
        fd = self._open_rows()
        try:
            return self._cut_torn_tail(fd)
        except OSError as e:
            raise environment_error(self.rows_path, e) from None
        finally:
            os.close(fd)

    def append_row(self, row: dict) -> None:
        """Appends one row whole or not at all: under an exclusive lock of rows.jsonl (shared by
        every process writing this dir), after a torn tail is cut; a short or failed write cuts the
        file back to its size before the write and raises RunDirError."""
        line = (dumps(row) + "\n").encode()
        fd = self._open_rows()
        try:
            self._cut_torn_tail(fd)
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    n = os.write(fd, view)
                    if n <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    view = view[n:]
                os.fsync(fd)
            except OSError as e:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise environment_error(self.rows_path, e) from None
        finally:
            os.close(fd)

    def rows(self) -> list[dict]:
        """The latest row of each cell, in the order cells first appeared. Lines that are not rows
        (a torn line, foreign text, a JSON object without a cell key or with a value that is not a
        number, text, true/false or null) are skipped and counted in ``skipped_lines``."""
        self.skipped_lines = 0
        if not self.rows_path.exists():
            return []
        latest: dict[tuple, dict] = {}
        try:
            data = self.rows_path.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read {self.rows_path}: {e.strerror}") from None
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not (isinstance(row, dict) and all(k in row for k in KEY) and isinstance(row["model"], str)
                    and isinstance(row["dataset"], str) and type(row["seed"]) is int
                    and (row["steps"] is None or type(row["steps"]) is int) and _flat(row)):
                self.skipped_lines += 1
                continue
            try:
                latest[row_key(row)] = row
            except TypeError:  # an unhashable key value
                self.skipped_lines += 1
        return list(latest.values())

    # -- per-cell files -----------------------------------------------------------------------
    def _write_artefact(self, kind: str, name: str, suffix: str, data: bytes) -> str:
        atomic_write(self.path / kind / f"{name}{suffix}", data, root=self.path)
        return sha256(data)

    def _read_artefact(self, kind: str, name: str, suffix: str, expected: str | None) -> bytes | None:
        """The file's bytes, or None when it is missing, unreadable or its sha256 differs from
        ``expected`` (where one is given)."""
        p = self.path / kind / f"{name}{suffix}"
        try:
            data = p.read_bytes()
        except OSError:
            return None
        return data if expected is None or sha256(data) == expected else None

    def sha(self, kind: str, name: str, suffix: str) -> str | None:
        data = self._read_artefact(kind, name, suffix, None)
        return None if data is None else sha256(data)

    def has(self, kind: str, name: str) -> bool:
        """Whether kind/<name> exists (whole or not)."""
        return (self.path / artefact_rel(kind, name)).exists()

    def artefact_bytes(self, rel: str) -> bytes | None:
        """The bytes of the artefact at relative path ``rel`` (kind/name.suffix), or None when missing."""
        try:
            return (self.path / rel).read_bytes() if _ARTEFACT.match(rel) else None
        except OSError:
            return None

    def artefact_shas(self) -> dict[str, str]:
        """Relative path -> sha256 of every artefact file (what a task may hand back)."""
        out = {}
        for kind in ARTEFACTS:
            folder = self.path / kind
            for p in sorted(folder.glob("*")) if folder.is_dir() else []:
                rel = f"{kind}/{p.name}"
                if _ARTEFACT.match(rel) and p.is_file():
                    out[rel] = sha256(p.read_bytes())
        return out

    def bundle(self, before: dict, notes: list) -> dict:
        """What a task hands back from this (scratch) run dir: its rows, the artefacts it wrote or
        changed since ``before`` (``artefact_shas()`` then; relative path -> bytes), its notes. Read
        as data: rows through the reader, files as bytes."""
        files = {rel: self.artefact_bytes(rel) for rel, sha in self.artefact_shas().items() if before.get(rel) != sha}
        return {"rows": self.rows(), "files": {k: v for k, v in files.items() if v is not None},
                "notes": [str(n) for n in notes]}

    def artefact_path(self, rel) -> Path:
        """Where the artefact at relative path ``rel`` goes; a name that is not a run-dir artefact
        (another folder, a path outside the dir, not a string) is refused with ValueError."""
        if not isinstance(rel, str) or not _ARTEFACT.match(rel) or ".." in rel:
            raise ValueError(f"{str(rel)[:80]!r} is not a run-dir artefact (kind/name.suffix)")
        return self.path / rel

    def save_samples(self, name: str, **arrays) -> str:
        """Writes samples/<name>.npz; returns its sha256."""
        import numpy as np

        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return self._write_artefact("samples", name, ".npz", buf.getvalue())

    def load_samples(self, name: str, sha: str | None = None) -> dict | None:
        """The arrays of samples/<name>.npz, or None when missing, torn or not matching ``sha``."""
        import numpy as np

        data = self._read_artefact("samples", name, ".npz", sha)
        if data is None:
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # noqa: BLE001 - a torn or foreign file is treated as missing
            return None

    def save_checkpoint(self, name: str, state: dict) -> str:
        return self._write_artefact("checkpoints", name, ".pt", torch_bytes(state))

    def checkpoint_bytes(self, name: str, sha: str | None) -> bytes:
        """The bytes of checkpoints/<name>.pt; raises ValueError when it is missing or does not
        match ``sha``."""
        data = self._read_artefact("checkpoints", name, ".pt", sha)
        if data is None:
            raise ValueError("missing, or its sha256 does not match the fit record")
        return data

    def copy_checkpoint(self, src: str, dst: str, sha: str) -> str:
        """checkpoints/<src>.pt (checked against ``sha``) written as checkpoints/<dst>.pt; its sha256."""
        return self._write_artefact("checkpoints", dst, ".pt", self.checkpoint_bytes(src, sha))

    def load_checkpoint(self, name: str, sha: str | None, device: str):
        """The state dict of checkpoints/<name>.pt, read as data (``load_state``)."""
        return load_state(self.checkpoint_bytes(name, sha), device)

    # -- mid-fit snapshots (partial/): a fit's state while it trains, gone once its fit is saved --
    def _save_state(self, folder: str, name: str, state: dict) -> None:
        atomic_write(self.path / folder / f"{name}.pt", torch_bytes(state), root=self.path)

    def _state_bytes(self, folder: str, name: str) -> bytes | None:
        """The bytes of folder/<name>.pt (no link on its way), or None where there is none."""
        p = self.path / folder / f"{name}.pt"
        if not p.is_file():
            return None
        no_links(p, self.path)
        return p.read_bytes()

    def save_partial(self, name: str, state: dict) -> None:
        self._save_state("partial", name, state)

    def load_partial(self, name: str, device: str):
        """The snapshot partial/<name>.pt read as data (``load_state``), or None where there is none
        (a torn or unreadable one raises: the caller says why it starts over)."""
        data = self._state_bytes("partial", name)
        return None if data is None else load_state(data, device)

    def drop_partial(self, name: str) -> None:
        with contextlib.suppress(OSError):
            (self.path / "partial" / f"{name}.pt").unlink()

    # -- fits' states at their cap (ends/): kept for a longer fit of the same path to continue from
    def save_end(self, name: str, state: dict) -> None:
        self._save_state("ends", name, state)

    def load_end(self, name: str, device: str):
        """The state ends/<name>.pt read as data, or None where there is none (or it cannot be read)."""
        data = self._state_bytes("ends", name)
        try:
            return None if data is None else load_state(data, device)
        except Exception:  # noqa: BLE001 - a torn state: the fit starts from step 0
            return None

    def has_end(self, name: str) -> bool:
        return (self.path / "ends" / f"{name}.pt").is_file()

    def drop_ends(self, names: set[str]) -> None:
        """Removes the kept states named (where there are); the folder too where none is left."""
        folder = self.path / "ends"
        for name in names:
            with contextlib.suppress(OSError):
                (folder / f"{name}.pt").unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()

    def tidy_partial(self) -> None:
        """Removes partial/ where it is empty (every fit saved): called at a run's end, under its
        lock, when nothing writes snapshots any more; a folder still holding one is kept."""
        with contextlib.suppress(OSError):
            (self.path / "partial").rmdir()

    def save_json(self, kind: str, name: str, obj: dict) -> str:
        """Writes kind/<name>.json: the dict ``obj`` with a ``checksum`` of its own content (sha256
        of its canonical JSON), so that a record altered after it was written is not trusted
        (``load_json``); returns the file's sha256."""
        return self._write_artefact(kind, name, ".json", dumps({**obj, "checksum": json_checksum(obj)}).encode())

    def load_json(self, kind: str, name: str, sha: str | None = None, unchecked_ok: bool = False):
        """The dict saved as kind/<name>.json (its ``checksum`` removed), or None when it is missing,
        unreadable, not matching ``sha``, or altered since it was written (its checksum does not
        match, or it has none: written before records carried one; ``unchecked_ok`` accepts those,
        for display only)."""
        data = self._read_artefact(kind, name, ".json", sha)
        if data is None:
            return None
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(obj, dict):
            return None
        if "checksum" not in obj:
            return obj if unchecked_ok else None
        checksum = obj.pop("checksum")
        return obj if checksum == json_checksum(obj) else None

    def cached_json(self, kind: str, name: str, ident: dict, compute):
        """``compute()``'s result, saved as kind/name.json beside ``ident`` and reused while the
        saved ident matches; processes sharing the run dir take a lock so one computes, the others
        wait and read it."""
        lock = self.path / kind / f"{name}.lock"
        no_links(lock, self.path)
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fh = os.fdopen(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644), "w")
        except OSError as e:
            raise environment_error(lock, e) from None
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            saved = self.saved_value(kind, name, ident)
            if saved is not None:
                return saved
            value = compute()
            self.save_json(kind, name, {"ident": ident, "value": value})
            return value

    def saved_value(self, kind: str, name: str, ident: dict):
        """What ``cached_json`` saved as kind/name.json, where its saved ident matches; else None."""
        saved = self.load_json(kind, name)
        if isinstance(saved, dict) and saved.get("ident") == json.loads(dumps(ident)):
            return saved["value"]
        return None


def open_existing(path: str | os.PathLike) -> RunDir:
    """A run dir to read (report / plot): it must exist and hold rows."""
    rd = RunDir(path)
    if rd.path.is_file():
        raise UsageError(f"{rd.path} is a file, not a run dir; give the directory written by 'genbench run' "
                         f"({rd.path.parent})")
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
