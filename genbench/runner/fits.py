"""The fit store: a fit unit's trained model, reused from the run dir's checkpoint where its
record and bytes check out, else fitted (after its teacher) and saved; and the units of one model
fitted side by side in groups, whose fitted models are handed over to be sampled (their checkpoints
are what a resumed run, or a worker process, reuses)."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import math
import queue
import threading
import time

from .. import __version__
from .. import datasets as ds_mod
from ..api import Generator, RunDirError
from ..store import RunDir, cell_name
from .plan import Resolved, Unit, make_model

#: a fit (or a group of fits side by side) saves a snapshot of its state this often (seconds of its
#: wall time): a run stopped in the middle of a fit continues it from there
SNAPSHOT_EVERY_S = 60.0
#: a group of fits side by side at the converged budget sheds its stopped members (the others go on
#: as a smaller group from the group's state: the same fits, to the stacked arithmetic's rounding)
#: once at least this share of them has stopped by the stopping rule ...
SHED_SHARE = 0.25
#: ... and at least this many steps are left to its cap (a smaller group's first steps and capture
#: cost a few seconds, which a few thousand cheaper steps pay back)
SHED_STEPS_LEFT = 5_000
#: where several runs of this process fit groups at the same time (a tune's models, each its own run
#: of its rungs): the ``Slots`` their groups train in, shared; None: each run's own groups_at_once
SLOTS: "Slots | None" = None


class Slots:
    """``n`` slots that the groups of several chains train in (a tune's models, each going from
    rung to rung in a thread of its own: ``chains``, their names). A freed slot goes to a group of
    the chain that holds the fewest slots, then to the longest group (its members' most steps;
    ties: the first to ask): no chain waits behind another's third group because its steps are
    fewer (a consistency model's rungs behind the VAE's). And a chain that has not asked yet (at the
    start, its plans being resolved) has a slot kept for it for ``keep_s`` seconds (of all the
    slots but one), so that the chain that asks first does not take them all. ``leave(chain)`` when a chain has ended. The chain
    of the calling thread: ``chain_of_thread`` (set by ``as_chain``)."""

    def __init__(self, n: int, chains: list[str] = (), keep_s: float = 60.0):
        self.n, self.free, self.cv, self.waiting, self.asked = n, n, threading.Condition(), [], itertools.count()
        self.held: dict[str, int] = {}
        self.unasked = set(chains)  # chains that have not asked yet: a slot kept for each
        self.keep_until = time.monotonic() + keep_s

    def _first(self):
        """The request to grant now (None: none may have a slot): the fewest held, then the longest."""
        kept = min(len(self.unasked), self.n - 1) if time.monotonic() < self.keep_until else 0  # (one slot never kept)
        if self.free <= kept or not self.waiting:
            return None
        return min(self.waiting, key=lambda w: (self.held.get(w[2], 0), w[0], w[1]))

    @contextlib.contextmanager
    def slot(self, steps: int, chain: str | None = None):
        with self.cv:
            me = (-steps, next(self.asked), chain)
            self.waiting.append(me)
            self.unasked.discard(chain)
            self.cv.notify_all()  # (a slot kept for this chain is free for the others now)
            while self._first() is not me:
                left = self.keep_until - time.monotonic()
                self.cv.wait(left if left > 0 else None)  # (woken at the kept slots' end)
            self.waiting.remove(me)
            self.held[chain] = self.held.get(chain, 0) + 1
            self.free -= 1
            self.cv.notify_all()  # the next in line, where another slot is free
        try:
            yield
        finally:
            with self.cv:
                self.free += 1
                self.held[chain] -= 1
                self.cv.notify_all()

    def leave(self, chain: str) -> None:
        """``chain`` has ended: no slot is kept for it any more."""
        with self.cv:
            self.unasked.discard(chain)
            self.cv.notify_all()


_THREAD = threading.local()


@contextlib.contextmanager
def as_chain(name: str):
    """The calling thread's groups belong to chain ``name`` (``Slots``) until the block ends."""
    _THREAD.chain = name
    try:
        yield
    finally:
        _THREAD.chain = None


def chain_of_thread() -> str | None:
    return getattr(_THREAD, "chain", None)


def by_batch(key: tuple, group: list, batch: dict) -> dict:
    """A side-by-side group (its key, its (unit, refit) pairs) split where ``batch`` is a member
    field of its model (``key[0]``) and the units' batches (``batch``) do not all divide the
    largest (``models.train.batch_groups``: the fewest groups that train on repeated draws)."""
    if "batch" not in getattr(key[0], "member_fields", ()):
        return {key: group}
    from ..models.train import batch_groups

    out: dict = {}
    for item, i in zip(group, batch_groups([batch[u] for u, _ in group])):
        out.setdefault((*key, i), []).append(item)
    return out


def _group_partial(units: list[Unit]) -> str:
    """The name of a side-by-side group's snapshot (partial/): its model, size and units."""
    return f"{units[0].model}__group{len(units)}__" + hashlib.sha256(repr(units).encode()).hexdigest()[:16]


def longest_first(chunks: list, steps, teaches, learns) -> list:
    """The order in which groups start when fewer train at once than there are: the groups of
    teachers first, their students' last (a student's group holds its thread until its teacher's
    ends), and between them the most training steps first, so that the groups left to end alone
    are short ones (longest processing time first; ties keep their order). ``steps(chunk)``: its
    members' most steps; ``teaches(chunk)``, ``learns(chunk)``: a teacher's, a student's group."""
    return sorted(chunks, key=lambda c: (not teaches(c), bool(learns(c)), -steps(c)))


class FitStore:
    def __init__(self, store: RunDir, r: Resolved, progress, notes: list[str]):
        self.store, self.r, self.progress, self.notes = store, r, progress, notes
        self._fitted = None  # fit_side_by_side's queue of the fits that ended (unit, model, record)
        self._validation: dict = {}  # (dataset, seed) -> (validation sample, its metric's floor)

    def reuse(self, unit: Unit, model: Generator) -> tuple[dict | None, str | None]:
        """(the unit's fit record, its checkpoint loaded into ``model``), or (None, why the unit must
        be fitted: None where it never was)."""
        name = cell_name(*unit)
        record = self.record(unit)
        if record is None and not self.store.has("fits", name):
            record = self.adopt(unit, model)
        if record is not None and record.get("checkpoint_sha256"):
            try:  # tensors and plain containers only: a checkpoint is data, never code
                state = self.store.load_checkpoint(name, record["checkpoint_sha256"], self.r.device)
                model.load_state_dict(state, device=self.r.device)
                return record, None
            except Exception as e:  # noqa: BLE001 - an unreadable, torn or unsafe checkpoint is retrained
                refit = f"checkpoint not reused ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
                self.progress.update(f"{name}: {refit}; training again")
                return None, refit
        if record is not None and "checkpoint_sha256" in record:
            return None, "the model saves no checkpoint"
        if self.store.has("fits", name):
            return None, "fit record unreadable, torn or altered (its checksum does not match)"
        return None, None

    def record(self, unit: Unit) -> dict | None:
        """The unit's fit record as saved (checksummed), without loading its checkpoint; None if there
        is none that checks out. Reused: the refit reason of the fit that made it is not this run's."""
        name = cell_name(*unit)
        record = self.store.load_json("fits", name)
        if not isinstance(record, dict):
            return None
        return {**record, "refit_reason": None, "fit_sha256": self.store.sha("fits", name, ".json")}

    def adopt(self, unit: Unit, model: Generator) -> dict | None:
        """The fit record of a previous rung's fit that is this unit's fit, saved as this unit's with
        its checkpoint (``continued_from`` names it), or None: where the unit's trial continues a
        trial of the previous rung (``Plan.continues``) whose fit on this dataset and seed converged
        before its cap (``eval_cap``), for a model whose path does not depend on its cap, the longer
        cap stops the fit at the same step with the same weights kept."""
        before, record = self._previous(unit, model)
        if (record is None or not str(record.get("stop_reason") or "").startswith("converged")
                or not record.get("checkpoint_sha256") or record.get("eval_cap") is None
                or not (record.get("stopped_step") or math.inf) < record["eval_cap"]):
            return None  # (a plateau found at the cap itself ends a fit that a longer cap anneals)
        name, was = cell_name(*unit), cell_name(*before)
        try:
            sha = self.store.copy_checkpoint(was, name, record["checkpoint_sha256"])
        except ValueError:  # its checkpoint is gone or altered: the unit is fitted
            return None
        self.store.save_json("fits", name, {k: v for k, v in record.items() if k != "fit_sha256"}
                             | {"checkpoint_sha256": sha, "continued_from": was})
        return self.record(unit)

    def continuation(self, unit: Unit, model: Generator) -> str | None:
        """The kept state (ends/) this unit's fit continues from, or None (it trains from step 0):
        its trial continues a trial of the previous rung (``Plan.continues``) whose fit on this
        dataset and seed kept its state at its cap and was neither diverged nor cut short in a
        decay (the longer fit's decay would be longer), for a model whose path does not depend on
        its cap."""
        before, record = self._previous(unit, model)
        if record is None or not self.store.has_end(cell_name(*before)):
            return None
        if str(record.get("stop_reason") or "").startswith(("cap reached while annealing", "diverged")):
            return None
        return cell_name(*before)

    def _previous(self, unit: Unit, model: Generator) -> tuple[Unit | None, dict | None]:
        """The unit of the previous rung's trial this unit's trial continues (``Plan.continues``), and
        its fit record; (None, None) where there is none, or the model's path depends on its cap."""
        prev = self.r.plan.continues.get(unit.model)
        if prev is None or not model.continues_to_longer_caps():
            return None, None
        before = Unit(prev, unit.dataset, unit.seed)
        return before, self.record(before)

    def monitor(self, unit: Unit, model: Generator):
        """The fit's evaluation during training (the converged budget, a model that offers it), or None."""
        if not (self.r.converged and model.monitored):
            return None
        from ..scoring import validation_sample
        from .monitor import ValidationMonitor, validation_floor

        ds = ds_mod.get(unit.dataset)
        key = (unit.dataset, unit.seed)
        if key not in self._validation:
            val = validation_sample(ds, unit.seed)
            self._validation[key] = (val, validation_floor(ds, unit.seed, val))
        val, floor = self._validation[key]
        c = model.config
        trial = unit.model in self.r.plan.trials
        return ValidationMonitor(ds, val, floor, cap=c.train_steps, log_every=getattr(c, "log_every", 50),
                                 seed=unit.seed, device=self.r.device if self.r.device.startswith("cuda") else "cpu",
                                 first_step=math.ceil(self.r.plan.evaluate_from * c.train_steps) if trial else 0)

    @staticmethod
    def _snapshot_key(units: list[Unit], models: list[Generator]) -> str:
        """What a snapshot belongs to: the units and configs of its fits (and genbench's version)."""
        return hashlib.sha256(repr([__version__, *((tuple(u), repr(m.config)) for u, m in zip(units, models))]).encode()
                              ).hexdigest()

    def snapshots(self, name: str, units: list[Unit], models: list[Generator], doing: str, start: dict | None = None,
                  stacked: bool = False):
        """The mid-fit snapshots of a fit (or of a group of fits side by side) of a model with the
        ``resumable`` capability, saved as partial/<name>.pt: a fit started with one continues from
        it, where it belongs to the same units and configs (a snapshot that cannot be read, or of
        other fits, is left and the fit starts over); each snapshot also tells the progress ``doing``
        and the step it is at (a long fit's only sign of life in a log); ``stacked``: a group's
        (side by side, however many members), whose members' states at their cap are kept where the
        plan keeps them (``Plan.keep_ends``). None for a model without the capability."""
        if not all(type(m).resumable for m in models):
            return None
        from ..models.train import Snapshots, member_states

        key = self._snapshot_key(units, models)
        saved = None
        try:
            saved = self.store.load_partial(name, self.r.device)
        except Exception as e:  # noqa: BLE001 - a torn or foreign snapshot: the fit starts over
            self.notes.append(f"{name}: its mid-fit snapshot could not be read ({type(e).__name__}); trained from step 0")
        if saved is not None and (not isinstance(saved, dict) or saved.get("key") != key):
            saved = None
        if saved is None and start is not None:  # the fits' states at a shorter cap (a tune's previous rung)
            saved = start
        if saved is not None:
            self.progress.update(f"{name}: continuing from step {saved.get('step')}")
        cap = max((getattr(m.config, "train_steps", 0) for m in models), default=0)

        def save(state: dict) -> None:
            self.store.save_partial(name, {"key": key} | state)
            self.progress.update(f"{doing}: step {state['step']:,}" + (f" of {cap:,}" if cap else ""))

        def at_cap(state: dict) -> None:  # each member's state, for the longer fit that continues it
            for unit, one in zip(units, member_states(state, len(units)), strict=True):
                self.store.save_end(cell_name(*unit), one)

        # a tune's trials' states (a teacher's goes no further), stacked: the next rung's group stacks them
        keep = self.r.plan.keep_ends and stacked and all(u.model in self.r.plan.trials for u in units)

        def shed(stopped: list[bool], step: int) -> bool:  # (``fit_group`` regroups the members that go on)
            return sum(stopped) >= max(1.0, SHED_SHARE * len(stopped)) and cap - step >= SHED_STEPS_LEFT

        return Snapshots(saved, save, SNAPSHOT_EVERY_S, at_cap=at_cap if keep else None,
                         shed=shed if stacked and self.r.plan.shed else None)

    @staticmethod
    def _resumed(snapshots, regrouped: int | None = None) -> dict:
        """The step a fit resumed from (a stopped run's snapshot); not the step its group shed its
        stopped members at (``regrouped``), where the members that went on continued at once."""
        at = snapshots.resumed_at if snapshots is not None else None
        return {"resumed_step": at} if at and at != regrouped else {}

    def _stopping(self, model: Generator, monitor) -> dict:
        """The fit record's stopping fields: the monitor's record, or, at the converged budget, the
        fixed budget a model without evaluation trained."""
        if monitor is not None:
            return monitor.record()
        if self.r.converged:
            return {"stop_reason": "fixed budget (the model offers no evaluation during training)"}
        return {}

    def save(self, unit: Unit, model: Generator, info, extras: dict, refit: str | None) -> dict:
        """The fit record (and the checkpoint, where the model saves one) of a fitted unit."""
        name = cell_name(*unit)
        record = {**dataclasses.asdict(info), **extras, "refit_reason": refit}
        record.update(record.pop("extras", {}))
        state = model.state_dict() if "checkpoint" in model.capabilities() else None
        record["checkpoint_sha256"] = None if state is None else self.store.save_checkpoint(name, state)
        record["fit_sha256"] = self.store.save_json("fits", name, record)
        return record

    def fit_or_load(self, unit: Unit, model: Generator, train) -> dict:
        """Fits the model on ``train`` (after its teacher), or loads it from this run dir's
        checkpoint; returns its fit record."""
        record, refit = self.reuse(unit, model)
        if record is not None:
            return record
        teacher, extras = None, {}
        teacher_entry = self.r.teacher(unit.model)
        if teacher_entry is not None:
            teacher = make_model(teacher_entry, self.r.plan, unit.dataset)
            self.progress.update(f"{teacher_entry.name} (teacher of {unit.model}) on {unit.dataset} seed {unit.seed}: "
                                 "training")
            extras["teacher_train_s"] = self.fit_or_load(Unit(teacher_entry.name, *unit[1:]), teacher, train)["train_s"]
        self.progress.update(f"{unit.model} on {unit.dataset} seed {unit.seed}: training")
        monitor = self.monitor(unit, model)
        name = cell_name(*unit)
        snapshots = self.snapshots(name, [unit], [model], f"{unit.model} on {unit.dataset} seed {unit.seed}: training")
        info = model.fit(train, device=self.r.device, seed=unit.seed, **({"teacher": teacher} if teacher else {}),
                         **({"monitor": monitor} if monitor is not None else {}),
                         **({"snapshots": snapshots} if snapshots is not None else {}))
        record = self.save(unit, model, info, extras | self._stopping(model, monitor) | self._resumed(snapshots), refit)
        self.store.drop_partial(name)
        return record

    # -- side by side -----------------------------------------------------------------------------
    def fit_side_by_side(self, units: list[Unit], done: set, on_ended=None) -> None:
        """The units that fit side by side and must be fitted, in groups of one model (a student's
        group after its teachers', each member given its own teacher), as one stacked network
        each, their checkpoints and fit records saved. A member that diverged, or a group that
        failed, is left to the unit-by-unit pass (fitted alone, its failure recorded as a solo
        fit's). ``on_ended(fitted)``: called in this thread with the fits that ended, each as
        (unit, its fitted model, its fit record), once its checkpoint and record are saved: a
        group's as the group ends, a member that its group shed as it is shed, while other groups
        may still train; the model is the one fitted (its weights the checkpoint's), not a copy
        read back from the checkpoint. A unit fitted before (its checkpoint read back here, to
        know it need not be fitted) is handed over with that model."""
        fitted: queue.SimpleQueue = queue.SimpleQueue()

        def hand_over() -> None:
            ready = []
            while not fitted.empty():
                ready.append(fitted.get())
            if ready and on_ended is not None:
                on_ended(ready)

        self._fitted = fitted if on_ended is not None else None
        try:
            self._fit_side_by_side(units, done, hand_over)
        finally:
            self._fitted = None

    def _fit_side_by_side(self, units: list[Unit], done: set, hand_over) -> None:
        todo: dict[str, list] = {}
        steps: dict[Unit, int] = {}  # each unit's training steps (its cap): how long its group trains, at most
        batch: dict[Unit, int | None] = {}  # ... and its batch (a member field: groups split by batch_groups)
        for unit in units:  # teachers' units come first: their groups are fitted first
            entry = self.r.entry(unit.model)
            if "side by side" not in entry.cls.capabilities():
                continue
            if all(c in done for c in self.r.cells([unit])):
                continue
            model = self.r.model(unit.model, unit.dataset)
            record, refit = self.reuse(unit, model)
            if record is not None and self._fitted is not None:  # fitted before: handed over as it was read back
                self._fitted.put((unit, model, record))
            if record is None:  # one group per family and config but for its member fields (a tuned
                # config is per dataset; tuning trials differing in a learning rate share a group),
                # and per step it starts at (fits continued from a previous rung's with each other)
                fields = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in type(model).member_fields}
                start = self.continuation(unit, model)
                key = (type(model), repr(sorted(fields.items())), start is not None)
                todo.setdefault(key, []).append((unit, refit))
                steps[unit] = getattr(model.config, "train_steps", 0)
                batch[unit] = getattr(model.config, "batch", None)
        todo = {k: g for key, group in todo.items() for k, g in by_batch(key, group, batch).items()}
        size = self.r.plan.max_members
        chunks = [group[at:at + size] for group in todo.values() for at in range(0, len(group), size)]
        if self.r.plan.groups_at_once > 1 and len(chunks) > self.r.plan.groups_at_once:
            teacher = {c[0][0].model: self.r.entry(c[0][0].model).cls.teacher for c in chunks}
            chunks = longest_first(chunks, lambda c: max(steps[u] for u, _ in c),
                                   lambda c: c[0][0].model in teacher.values(), lambda c: teacher[c[0][0].model])
        if self.r.plan.groups_at_once > 1 and (len(chunks) > 1 or (chunks and SLOTS is not None)):
            self.fit_groups_at_once(chunks, self.r.plan.groups_at_once, hand_over,
                                    lengths=[max(steps[u] for u, _ in c) for c in chunks])
        else:
            for chunk in chunks:
                self.fit_group(chunk)
                hand_over()
        hand_over()  # (the fits read back where no group was fitted)

    def fit_groups_at_once(self, chunks: list[list], at_once: int, hand_over=None, lengths: list | None = None) -> None:
        """``fit_group`` of each chunk, ``at_once`` of them at a time in threads of this process,
        each on a CUDA stream of its own (the GPU runs one group's kernels between another's); a
        student's group starts once its teacher's groups have ended, and a teacher's group trains
        on a high-priority stream (the GPU schedules its kernels before the others'). Where other runs of this
        process fit groups too (``SLOTS``), each group trains in one of their shared slots, as
        ``Slots`` grants them (``lengths``: each chunk's most steps; the chain: ``chain_of_thread``). The threads are daemons and
        joined with a timeout, so an interrupt is not held up by a group still training; the first
        error a group raises (a run dir that cannot be written) is raised here once all have ended.
        ``hand_over()`` is called here, in the calling thread, while the groups train (every 0.2 s)
        and once after them, until a group has raised."""
        import torch

        from ..models.graphs import own_stream

        teachers = [self.r.entry(chunk[0][0].model).cls.teacher for chunk in chunks]
        # a chunk waits for the chunks that hold its teacher's units; chunks come teachers' first,
        # so those were taken from the queue before it
        needs = [[j for j in range(i) if any(u.model == teachers[i] for u, _ in chunks[j])] for i in range(len(chunks))]
        taught = {j for n in needs for j in n}  # chunks that others wait for: on high-priority streams
        ended = [threading.Event() for _ in chunks]
        errors: list[BaseException] = []
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(len(chunks)):
            todo.put(i)
        cuda = self.r.device.startswith("cuda")
        chain = chain_of_thread()  # (the workers are threads of their own)

        def worker() -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    for j in needs[i]:
                        ended[j].wait()
                    with SLOTS.slot(lengths[i] if lengths else 0, chain) if SLOTS else contextlib.nullcontext():
                        if not errors and cuda:  # a stream no other group's thread has (graphs.own_stream)
                            with own_stream(self.r.device, high=i in taught) as stream, torch.cuda.stream(stream):
                                self.fit_group(chunks[i])
                                torch.cuda.current_stream().synchronize()
                        elif not errors:
                            self.fit_group(chunks[i])
                except BaseException as e:  # noqa: BLE001 - raised in the run's thread below
                    errors.append(e)
                finally:
                    ended[i].set()

        threads = [threading.Thread(target=worker, daemon=True, name=f"genbench-group-{n}")
                   for n in range(min(at_once, len(chunks)))]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
                try:
                    if hand_over is not None and not errors:
                        hand_over()
                except BaseException as e:  # noqa: BLE001 - the run stops once the groups have ended
                    errors.append(e)
        if hand_over is not None and not errors:
            hand_over()
        if errors:
            raise errors[0]

    def fit_group(self, chunk: list[tuple[Unit, str | None]]) -> None:
        """One group fitted side by side (from its fits' states at a previous rung's cap, where they
        continue one: ``continuation``); a group the GPU's memory cannot hold is split in halves.
        Where the group sheds its stopped members (``Plan.shed``: ``SHED_SHARE``), their fits are
        saved and the others go on as a group of their own from the group's state, whose snapshot
        is saved at once: a stopped run continues it."""
        regrouped = None
        while chunk:  # (each smaller group once the one before it, and what it held, is gone)
            chunk, regrouped = self._fit_group(chunk, regrouped) or ([], None)

    def _fit_group(self, chunk: list[tuple[Unit, str | None]], regrouped: dict | None) -> tuple | None:
        """``fit_group``'s one group (``regrouped``: the state it goes on from, where it is what a
        group that shed its stopped members left); the members that go on and their state, or None."""
        import torch

        from ..models.train import join_states

        p, trial = self.r.plan, chunk[0][0].model
        if len(chunk) < 2 and regrouped is None and not (trial in p.trials and (p.keep_ends or p.continues.get(trial))):
            return  # a fit alone is the unit-by-unit pass's; but not a tune's trial whose fit continues a
            # previous rung's, or keeps its state for the next rung (a group of one: a stacked state)
        name = chunk[0][0].model
        entry = self.r.entry(name)
        self.progress.update(f"{name}: {len(chunk)} fits side by side")
        models = [self.r.model(u.model, u.dataset) for u, _ in chunk]  # trials of a tune: models of their own
        datas = [self.r.data(u.dataset, u.seed)[1] for u, _ in chunk]
        kw, extras = {}, [{} for _ in chunk]
        infos = snapshots = partial = None
        try:
            teacher_entry = self.r.teacher(name)
            if teacher_entry is not None:  # each member's teacher, fitted or loaded (its group came first)
                kw["teachers"] = []
                for (u, _), data, ex in zip(chunk, datas, extras):
                    teacher = make_model(teacher_entry, self.r.plan, u.dataset)
                    ex["teacher_train_s"] = self.fit_or_load(Unit(teacher_entry.name, *u[1:]), teacher, data)["train_s"]
                    kw["teachers"].append(teacher)
            monitors = [self.monitor(u, m) for (u, _), m in zip(chunk, models)]
            if any(m is not None for m in monitors):
                kw["monitors"] = monitors
            units = [u for u, _ in chunk]
            partial = _group_partial(units)
            starts = [None] * len(units) if regrouped is not None else [self.continuation(u, m) for u, m in zip(units, models)]
            start = regrouped
            if all(starts):  # (a group is of continued fits or of fresh ones: the grouping's key)
                states = [self.store.load_end(n, "cpu") for n in starts]
                try:  # (states that cannot be stacked: the fits start from step 0)
                    start = join_states(states) if all(isinstance(st, dict) for st in states) else None
                except (KeyError, IndexError, TypeError, ValueError, RuntimeError):
                    start = None
            snapshots = self.snapshots(partial, units, models, f"{name}: {len(chunk)} fits side by side", start=start,
                                       stacked=True)
            if snapshots is not None:
                kw["snapshots"] = snapshots
            infos = entry.cls.fit_side_by_side(models, datas, device=self.r.device, seeds=[u.seed for u, _ in chunk],
                                               **kw)
            if regrouped is None and start is not None and snapshots is not None and snapshots.resumed_at == start["step"]:
                for ex, n in zip(extras, starts):  # (not where the group's own snapshot was later)
                    ex["continued_from"] = n
        except torch.cuda.OutOfMemoryError:
            pass  # split below, once the exception (and the memory its frames hold) is gone
        except RunDirError:
            raise
        except Exception as e:  # noqa: BLE001 - the units are fitted one by one instead
            self.notes.append(f"{name}: fitting {len(chunk)} units side by side failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                              "they were fitted one by one")
            return
        if infos is None:
            models = datas = None
            if partial is not None:  # the halves are other groups
                self.store.drop_partial(partial)
            torch.cuda.empty_cache()
            self.fit_group(chunk[:len(chunk) // 2])
            self.fit_group(chunk[len(chunk) // 2:])
            return
        going_on = set(snapshots.shed_active or ()) if snapshots is not None else set()
        resumed = self._resumed(snapshots, None if regrouped is None else regrouped["step"])
        if not resumed and regrouped is not None and "resumed_step" in regrouped:  # (the group it came from was)
            resumed = {"resumed_step": regrouped["resumed_step"]}
        for j, ((u, refit), model, info, ex, monitor) in enumerate(zip(chunk, models, infos, extras, monitors)):
            if not isinstance(info, BaseException) and j not in going_on:
                self.save(u, model, info, ex | self._stopping(model, monitor) | resumed, refit)
                record = self.record(u) if self._fitted is not None else None  # (as read back: a resumed run's rows')
                if record is not None:
                    self._fitted.put((u, model, record | {"refit_reason": refit}))
        if going_on:
            return self._regroup(chunk, models, snapshots.shed_state | resumed, sorted(going_on), partial)
        self.store.drop_partial(partial)
        return None

    def _regroup(self, chunk: list, models: list, state: dict, going_on: list[int], partial: str) -> tuple:
        """The members ``going_on`` of a group that shed its stopped ones, as a group of their own
        from ``state`` (the group's, at the step it shed them): each member's slice of it, its
        training seconds so far its share of the group's (its fit's ``train_s`` adds the smaller
        group's share to it), saved as the new group's snapshot before the old one is dropped."""
        from ..models.train import join_states, member_states

        parts = member_states(state, len(chunk))
        for j in going_on:
            log = parts[j]["loop"]["log"]
            log["train_s"] = log["paused"] + (log["train_s"] - log["paused"]) * len(going_on) / len(chunk)
        rest = [chunk[j] for j in going_on]
        units = [u for u, _ in rest]
        start = join_states([parts[j] for j in going_on])  # (a "resumed_step" of the state's goes along)
        self.store.save_partial(_group_partial(units), {"key": self._snapshot_key(units, [models[j] for j in going_on])}
                                | start)
        self.store.drop_partial(partial)
        self.progress.update(f"{units[0].model}: {len(chunk) - len(rest)} of {len(chunk)} fits stopped at step "
                             f"{start['step']:,}; {len(rest)} go on side by side")
        return rest, start

