"""The ledger of a run dir: its manifest and settings (checked before it is extended), the cells
it has done, every row written (whole, with its identity and provenance), and a task's bundle
absorbed (its files, then its rows). The one writer of rows."""
from __future__ import annotations

import platform
import time
import traceback
import uuid

from .. import __version__
from .. import datasets as ds_mod
from ..api import Diverged, UsageError, debug_enabled
from ..store import RunDir, artefact_rel, atomic_write, cell_name, floor_name, row_key
from .plan import Cell, Resolved, config_source, device_name, git_sha, json_norm


class Ledger:
    def __init__(self, store: RunDir, r: Resolved, progress=None):
        self.store, self.r, self.plan = store, r, r.plan
        self.progress = progress
        self.notes: list[str] = []  # what the run did besides the plan (repairs, redone cells), for the user
        self.prov: dict = {}

    # -- settings and manifest --------------------------------------------------------------------
    def check_settings(self) -> None:
        """A run dir is extended only with its own settings and device: checked against the
        manifest and, independently of it, against the settings hash and device of every row."""
        device, store = self.r.device, self.store
        old = store.read_manifest()
        if old is not None:
            saved = old.get("settings") if isinstance(old.get("settings"), dict) else {}
            for k, v in self.plan.settings().items():
                if json_norm(saved.get(k)) != json_norm(v):
                    raise UsageError(f"run dir {store.path} was made with {k}={saved.get(k)!r}, not {v!r}; "
                                     "use another --out or the same settings")
            if old.get("device") != device:
                raise UsageError(f"run dir {store.path} was run on device {old.get('device')!r}, not "
                                 f"{device!r}; use another --out")
        mine = self.plan.settings_hash()
        for r in store.rows():
            if r.get("settings_hash", mine) != mine or r.get("budget", self.plan.budget) != self.plan.budget \
                    or r.get("n_samples", self.plan.n_samples) != self.plan.n_samples:
                raise UsageError(f"run dir {store.path} holds rows made with other settings (budget "
                                 f"{r.get('budget')}, n_samples {r.get('n_samples')}, settings hash "
                                 f"{r.get('settings_hash')}; this run's: {mine}); use another --out or the same settings")
            if r.get("device", device) != device:
                raise UsageError(f"run dir {store.path} holds rows run on device {r.get('device')!r}, not "
                                 f"{device!r}; use another --out")

    def provenance(self, executor: str | None = None) -> dict:
        """What every row of this process carries about where and how it ran."""
        import torch

        return {
            "device": self.r.device,
            "device_name": device_name(self.r.device),
            "threads": torch.get_num_threads(),
            "jobs": self.plan.jobs,
            "score_jobs": self.plan.score_jobs,
            "groups_at_once": self.plan.groups_at_once,
            "max_members": self.plan.max_members,
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda if self.r.device.startswith("cuda") else None,
            "genbench_version": __version__,
            "git_sha": git_sha(),
            "python": platform.python_version(),
            "host": platform.node(),
            "executor": executor or self.plan.executor,
        }

    def setup_process(self, executor: str | None = None) -> None:
        """Per process (the run's and each worker's): the thread count, and the provenance that
        every row carries (``executor``: the run's, where a task runs for a cluster executor)."""
        import torch

        torch.set_num_threads(self.plan.threads)
        self.prov = self.provenance(executor)

    def open(self) -> None:
        """Under the run dir's lock: a torn rows file repaired, the settings re-checked, the
        manifest written."""
        torn = self.store.repair()
        if torn:
            self.notes.append(f"a torn last line of rows.jsonl ({torn} bytes, a run killed mid-write) was "
                              "moved to rows.torn; its cell is run again")
        self.check_settings()
        self.setup_process()
        self.write_manifest()

    def write_manifest(self) -> None:
        old = self.store.read_manifest() or {}
        union = lambda k, new: sorted(set(old.get(k, [])) | set(new), key=str)  # noqa: E731
        rows = self.store.rows()
        self.store.write_manifest({
            # a manifest lost while rows remain is rebuilt with their run id
            "run_id": old.get("run_id") or next((r["run_id"] for r in rows if r.get("run_id")), None) or uuid.uuid4().hex[:12],
            "created": old.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": self.plan.settings(),
            "models": union("models", [e.name for e in self.r.entries]),
            "datasets": union("datasets", self.plan.datasets),
            "seeds": union("seeds", self.plan.seeds),
            "configs": {**old.get("configs", {}), **self.r.configs},
            "dataset_versions": {**old.get("dataset_versions", {}),
                                 **{d: ds_mod.get(d).version for d in self.plan.datasets}},
            **self.provenance(),
        })

    # -- cells ----------------------------------------------------------------------------------------
    def done_cells(self) -> set[Cell]:
        """Cells finished with their samples file intact (its sha256 as the row recorded it); a
        cell whose samples are missing or torn is run again."""
        done = set()
        for r in self.store.rows():
            if r.get("status") != "done":
                continue
            sha = r.get("samples_sha256")
            if sha is not None and self.store.sha("samples", cell_name(r["model"], r["dataset"], r["seed"], r["steps"]),
                                                  ".npz") != sha:
                continue
            done.add(Cell(*row_key(r)))
        return done

    def note_done(self, keys: set, done: set) -> None:
        """The notes on cells skipped, and on finished cells run again (their samples lost)."""
        finished = {row_key(r) for r in self.store.rows() if r.get("status") == "done"} & keys
        redo = finished - done
        if redo:
            self.notes.append(f"{len(redo)} finished cell(s) run again: their samples file is missing or does "
                              "not match the sha256 in their row")
        if finished - redo:
            self.notes.append(f"{len(finished - redo)} of {len(keys)} cells were already done and were skipped")

    def rows(self, keys: set) -> list[dict]:
        """The run dir's rows of the cells ``keys``."""
        rows = self.store.rows()
        if self.store.skipped_lines:
            self.notes.append(f"{self.store.skipped_lines} line(s) of rows.jsonl are not rows and were skipped")
        return [r for r in rows if row_key(r) in keys]

    # -- rows -----------------------------------------------------------------------------------------
    def base_row(self, model: str, dataset: str, seed: int) -> dict:
        """A row's identity and provenance."""
        return {"run_id": self.store.read_manifest()["run_id"], "model": model,
                "source": self.r.entry(model).source, "dataset": dataset,
                "dataset_version": ds_mod.get(dataset).version, "seed": seed, "budget": self.plan.budget,
                "n_samples": self.plan.n_samples, "settings_hash": self.plan.settings_hash(),
                "config_source": config_source(self.plan, model, dataset), **self.prov}

    def write(self, row: dict, error: BaseException | None) -> None:
        """Appends ``row`` with its status: done, or diverged / error with the error's first line."""
        if error is None:
            row |= {"status": "done", "error": None}
        else:
            status = "diverged" if isinstance(error, Diverged) else "error"
            msg = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            row |= {"status": status, "error": msg}
            if debug_enabled():
                traceback.print_exception(error)
        self.store.append_row(row)
        if self.progress is not None:
            self.progress.advance()

    def fail_cells(self, units, error: BaseException) -> None:
        """Error rows for the cells of ``units`` that a failed task left undone."""
        done = {row_key(r) for r in self.store.rows() if r.get("status") == "done"}  # as this run wrote them
        for cell in self.r.cells(units):
            if tuple(cell) not in done:
                self.write(self.base_row(cell.model, cell.dataset, cell.seed)
                           | {"steps": cell.steps, "variant": safe_variant(self.r.model(cell.model, cell.dataset))}, error)

    # -- tasks ------------------------------------------------------------------------------------------
    def task_inputs(self, units) -> dict[str, bytes]:
        """What a task starts from (relative path -> bytes): the manifest, and the fit records,
        checkpoints (its units' and their teachers') and noise floors this run dir has."""
        names = set()
        for m, d, s in units:
            names.add(cell_name(m, d, s))
            teacher = self.r.teacher(m)
            if teacher is not None:
                names.add(cell_name(teacher.name, d, s))
        rels = [artefact_rel(kind, n) for kind in ("fits", "checkpoints") for n in names]
        rels += [artefact_rel("floors", floor_name(d, s)) for d, s in {(d, s) for _, d, s in units}]
        files = {"manifest.json": self.store.manifest_path.read_bytes()}
        for rel in rels:
            data = self.store.artefact_bytes(rel)
            if data is not None:
                files[rel] = data
        return files

    def absorb(self, bundle: dict, units) -> None:
        """A task's bundle written into the run dir by this process alone: its files first (each
        name checked, written atomically), then its rows (only the cells of ``units``)."""
        mine = set(self.r.cells(units))
        try:
            files = [(self.store.artefact_path(rel), bytes(data)) for rel, data in bundle.get("files", {}).items()]
        except (ValueError, TypeError) as e:  # a name outside the run dir's artefacts: nothing of it is written
            self.fail_cells(units, ValueError(f"a task handed back {e}"))
            return
        for path, data in files:
            atomic_write(path, data, root=self.store.path)
        for row in bundle.get("rows", []):
            if isinstance(row, dict) and row_key(row) in mine:
                self.store.append_row(row)
                if self.progress is not None:
                    self.progress.advance()
        self.notes.extend(n for n in bundle.get("notes", []) if n not in self.notes)


def safe_variant(model) -> str:
    try:
        return model.variant
    except Exception:  # noqa: BLE001
        return ""

