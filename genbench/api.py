"""The one interface every generator implements, and its small value types.

A generator is trained by ``fit`` and then asked for samples by ``sample``; ``nfe`` declares how
many network evaluations one ``sample`` call makes, and ``nfe_module`` names the module whose
forward calls are those evaluations, so that the runner and the tests can count them with a hook
instead of trusting the declaration.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

BUDGETS = ("quick", "default", "full")
#: the budget that trains to convergence: a model with the ``stopping`` capability fits up to its
#: preset's cap and stops on its validation curve; a model without it, or without such a preset,
#: trains its ``full`` budget (a fixed one, and its rows say so)
CONVERGED = "converged"
#: the largest whole number a config field may hold: the largest size torch indexes (2^31 - 1)
MAX_INT = 2**31 - 1


def debug_enabled() -> bool:
    """Whether GENBENCH_DEBUG asks for tracebacks (1, true, yes or on; anything else: no)."""
    import os

    return os.environ.get("GENBENCH_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


class UsageError(ValueError):
    """Bad input from the user: the CLI prints it as one line and exits with code 2."""


class RunDirError(OSError):
    """The run dir cannot be written (a full disk, permissions, ...): the CLI prints it as one line
    and exits with code 1. Never recorded as a cell's error: the run stops, what is written stays."""


@dataclass
class FitInfo:
    steps: int
    final_loss: float
    train_s: float
    losses: list[float] = field(default_factory=list)  # loss curve, one value per logged step
    log_every: int = 1
    extras: dict[str, float] = field(default_factory=dict)  # e.g. teacher_train_s


class Diverged(RuntimeError):
    """Training produced a non-finite loss (or sampling non-finite samples): the runner records the
    cell as ``diverged`` rather than ``error``."""


@dataclass(frozen=True)
class Verdict:
    """A monitor's answer to one evaluation during training: ``best``, the weights just evaluated
    are the best so far (keep them); ``stop``, end the fit; ``anneal`` > 0, the validation score has
    stopped improving: decay the learning rate to its floor over the next ``anneal`` steps (a model
    that cannot goes on as it was; the monitor ends the fit after them either way)."""

    best: bool
    stop: bool
    anneal: int = 0


class Monitor:
    """Evaluation during training, given by the runner to ``fit(..., monitor=)`` (and to
    ``fit_side_by_side(..., monitors=)``, one per member) of a model with the ``stopping``
    capability. At the end of each logged window the model asks ``due(step)``; where it is due it
    calls ``evaluate(step, sample)``, ``sample(n, seed)`` drawing n points in data units from its
    current weights (those sampling uses: EMA where the family keeps one), and acts on the
    ``Verdict``: keeps a copy of the weights when best, ends the fit when told to stop. When the fit
    ends it restores the last best weights. The monitor records the curve and the stop reason."""

    def due(self, step: int) -> bool:
        raise NotImplementedError

    def evaluate(self, step: int, sample, train_s: float | None = None) -> Verdict:
        """``train_s``: the fit's training seconds so far, evaluations left out (a stacked fit's
        member: its share of the group's); None: the monitor times the fit itself (from its
        creation, less its own evaluations)."""
        raise NotImplementedError

    @classmethod
    def evaluate_many(cls, monitors: list["Monitor"], step: int, samples: list, train_s: float | None = None) -> list[Verdict]:
        """The evaluations of several fits at one step (the members of a stacked fit, whose samples
        were drawn at once: each the tensor that monitor's ``sample`` would have given it), as
        ``evaluate`` of each; a monitor class may score them at once. Default: one after another."""
        return [m.evaluate(step, lambda n, seed, x=x: x, train_s) for m, x in zip(monitors, samples)]

    def diverged(self, step: int) -> None:
        """The fit's loss stopped being finite at ``step`` after a best evaluation: the fit ends
        there with the weights kept (the monitor records why). Default: nothing to record."""

    def state(self) -> dict:
        """What a fit stopped in its middle needs to continue this monitor (plain containers): its
        curve, its best so far, its next evaluation. ``load_state`` takes it back."""
        raise NotImplementedError

    def load_state(self, state: dict) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class PFODEDenoiser:
    """What a model with a probability-flow ODE offers a student (``Generator.pf_ode_denoiser``):
    consistency distillation takes its teacher's ODE steps through it, whatever the teacher's class.

    The ODE is the variance-exploding one of Karras et al. (2022), in the teacher's standardised
    units ``y = (x - mean) * scale`` (x in data units): ``y_t = y + t z`` and
    ``dy/dt = (y - D(y; t)) / t`` for t in [sigma_min, sigma_max], with prior N(0, sigma_max^2 I).
    """

    #: D(y; t): y float32 [n, 2], t [n, 1] (one level per row) or [1, 1]; returns the denoised [n, 2]
    denoise: Callable[[Any, Any], Any]
    sigma_min: float
    sigma_max: float
    sigma_data: float  #: the std the data were standardised to
    mean: Any  #: tensor [2], data units
    scale: float
    #: where D = c_skip(t) y + c_out(t) F(c_in y, ln(t) / 4) with EDM's c_in = 1/sqrt(t^2 + sigma_data^2):
    #: F, a ``genbench.models.nets.TimeMLP`` whose weights a student may start from (None: no such F)
    net: Any = None


class Generator:
    """Base class of every model (built-in or plugin).

    Subclasses set ``name``, a ``Config`` dataclass (documented defaults) and ``budgets``, a map
    from budget name to the config fields it overrides (usually the number of training steps).
    """

    name: ClassVar[str] = "generator"
    Config: ClassVar[type] = object
    budgets: ClassVar[dict[str, dict[str, Any]]] = {b: {} for b in BUDGETS}
    #: the name of a model that must be fitted first and is passed to ``fit`` as ``teacher``
    teacher: ClassVar[str | None] = None
    #: the capabilities (as ``capabilities()`` names them) the teacher must have, checked before a run
    teacher_needs: ClassVar[tuple[str, ...]] = ()
    #: True where ``sample(steps=k)`` gives a different sampler per k (diffusion, CM multistep)
    multistep: ClassVar[bool] = False
    #: why the model reports no likelihood, where it cannot (shown under the report's tables);
    #: None where ``evaluate`` reports ``nll`` (exact) or ``nll_bound`` (an upper bound)
    no_likelihood: ClassVar[str | None] = None
    #: the model's colour in every figure (any matplotlib colour); None: one picked from its name
    colour: ClassVar[str | None] = None
    #: True where ``fit`` takes ``monitor=`` (evaluation during training, stopping, the best weights
    #: kept: the ``stopping`` capability, which the ``converged`` budget needs)
    monitored: ClassVar[bool] = False
    #: True where ``fit`` (and ``fit_side_by_side``) take ``snapshots=`` (a fit stopped in its middle
    #: continues from its last snapshot: the ``resumable`` capability; ``train.Snapshots``)
    resumable: ClassVar[bool] = False
    #: the search space ``genbench tune`` draws trials from: config field -> ``LogUniform``,
    #: ``Uniform``, ``IntRange`` or ``Choice`` (the ``tuning`` capability; part of the published
    #: protocol, printed by ``genbench list``); empty: the model is not tuned
    search_space: ClassVar[dict[str, "Space"]] = {}

    def __init__(self, budget: str = "default", params: dict[str, str] | None = None, config: Any = None):
        """``config`` is taken as given; otherwise the budget's preset, then ``params`` (strings
        from ``--param``, parsed to each field's type), are applied to the defaults."""
        if budget not in self.budgets and budget != CONVERGED:
            raise UsageError(f"unknown budget {budget!r}; valid: {', '.join(dict.fromkeys([*self.budgets, CONVERGED]))}")
        preset = self.budgets.get(budget, self.budgets.get("full", {}))
        if config is None:
            config = apply_params(dataclasses.replace(self.Config(), **preset), params or {})
        self.config = config
        self.budget = budget

    # -- the interface ------------------------------------------------------------------------
    def fit(self, data, *, device: str = "cpu", seed: int = 0, teacher: "Generator | None" = None) -> FitInfo:
        raise NotImplementedError

    def sample(self, n: int, *, steps: int | None = None, seed: int | None = None):
        raise NotImplementedError

    def nfe(self, steps: int | None = None) -> int:
        raise NotImplementedError

    @property
    def nfe_module(self):
        """The torch module one forward call of which is one network evaluation. The runner counts
        its calls during ``sample`` and checks the declaration: every outermost module call made
        meanwhile (one not inside another module's forward) must be a call of this module or call
        it inside (a wrapper, e.g. preconditioning around the network). A network that runs
        beside it fails the cell ("NFE declaration is false"), as does a count other than
        ``nfe(steps)``. A model whose one pass runs several networks (a flow's couplings) names a
        module whose forward is that whole pass."""
        raise NotImplementedError

    @property
    def variant(self) -> str:
        """A short label of the sampler / architecture in use (shown in tables)."""
        return ""

    def default_steps(self) -> int | None:
        return None

    # -- optional figures (the runner saves them beside the samples where a model defines them) --
    def trajectory_sample(self, n: int, *, steps: int | None = None, seed: int | None = None):
        """[steps + 1, n, 2]: the paths of n samples through the sampler, in data units, the start
        first (drawn by ``genbench plot`` as the trajectories figure)."""
        raise NotImplementedError

    def one_step_map(self, n: int, *, steps: int | None = None, seed: int | None = None):
        """[n, 2, 2]: pairs (z, G(z)) of unit noise and its image in data units in one network call
        (drawn by ``genbench plot`` as the one-step map figure)."""
        raise NotImplementedError

    # -- optional: a probability-flow ODE that a student (consistency distillation) can learn from --
    def pf_ode_denoiser(self) -> PFODEDenoiser:
        """The fitted model's PF-ODE denoiser (see ``PFODEDenoiser``); models with a teacher whose
        ``teacher_needs`` names "pf-ode denoiser" receive a model that defines it."""
        raise NotImplementedError

    # -- optional: fits trained side by side (the runner uses it on a GPU) -----------------------
    @classmethod
    def fit_side_by_side(cls, models: list["Generator"], datas: list, *, device: str, seeds: list[int],
                         teachers: list | None = None) -> list:
        """Fits ``models`` (instances of this class with one config) at once on ``device``, each on
        its own data (as ``fit`` receives it), seed and (for a model with a ``teacher``) fitted
        teacher, exactly as its own ``fit`` would (its data draws, seed streams and schedule), e.g.
        as one stacked network.
        Returns one FitInfo per model, in order, or an exception in place of a member that failed
        (it is then fitted alone). The runner groups a GPU run's units of such a model; without
        it, units are fitted one at a time."""
        raise NotImplementedError

    @classmethod
    def capabilities(cls) -> list[str]:
        """What this model offers beyond sampling, read off the class (``genbench list`` shows it)."""
        def has(method: str) -> bool:  # defined below Generator in the class's MRO
            owner = next(c for c in cls.__mro__ if method in vars(c))
            return owner is not Generator

        caps = [name for name, ok in (
            ("multistep", cls.multistep), ("trajectory", has("trajectory_sample")),
            ("one-step map", has("one_step_map")), ("checkpoint", has("state_dict") and has("load_state_dict")),
            ("evaluation", has("evaluate")), ("likelihood", cls.no_likelihood is None and has("evaluate")),
            ("pf-ode denoiser", has("pf_ode_denoiser")), ("side by side", has("fit_side_by_side")),
            ("stopping", cls.monitored), ("resumable", cls.resumable), ("tuning", bool(cls.search_space))) if ok]
        return caps + ([f"teacher: {cls.teacher}"] if cls.teacher else [])

    def continues_to_longer_caps(self) -> bool:
        """True where this model's fit does not depend on its step cap (its first k steps, draws and
        evaluations are those of any longer fit of its config, for k a multiple of ``cap_grain``) and
        its ``fit_side_by_side`` hands ``Snapshots.at_cap`` its state at the cap: a tune's trial
        promoted to a longer rung then continues from its fit at the previous rung instead of
        training from step 0. Default: False."""
        return False

    def cap_grain(self) -> int:
        """The steps a cap that a longer fit continues from is a multiple of: the length of the fit's
        logged windows (a window ends where the loss curve gets a point and an evaluation may fall;
        a fit cut inside one would log and evaluate where the longer fit does not). A tune's rungs
        before the last end on a multiple of it. Default: 1."""
        return 1

    # -- checkpoints (optional; the runner uses them to resume and to reuse teachers) ---------
    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict, device: str = "cpu") -> None:
        raise NotImplementedError

    # -- extras a family can report (e.g. the flow's test NLL, the VAE's ELBO) ------------------
    def evaluate(self, test_data) -> dict[str, float]:
        """Figures of the fitted model on held-out true data (float32 [N, 2], data units), written
        into each of its rows. ``nll`` (exact negative log-likelihood, nats per point) and
        ``nll_bound`` (an upper bound on it) are shown by the report. A run with scoring processes
        (a GPU run's default) calls it there, on a copy of the model restored on the CPU from
        ``state_dict`` by ``load_state_dict(state, device="cpu")``, so it must depend on nothing
        else; without a checkpoint it is called on the fitted model itself."""
        return {}


def check_generator_class(cls: Any, target: str = "") -> None:
    """Raises TypeError naming what is wrong when ``cls`` is not a usable Generator subclass: the
    required methods overridden, ``Config`` a dataclass whose defaults validate, ``budgets``
    naming every budget with fields of ``Config``, the class attributes of the right types, and
    ``default_steps`` given by a multistep model."""
    where = target or getattr(cls, "__qualname__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, Generator)):
        raise TypeError(f"{where} is not a genbench.api.Generator subclass")
    missing = [m for m in ("fit", "sample", "nfe", "nfe_module") if getattr(cls, m) is getattr(Generator, m)]
    if missing:
        raise TypeError(f"{where} does not implement {', '.join(missing)}")
    if not (isinstance(cls.Config, type) and dataclasses.is_dataclass(cls.Config)):
        raise TypeError(f"{where}.Config must be a dataclass (the model's knobs with their defaults)")
    cfg = cls.Config()  # its own validation runs here
    fields = {f.name for f in dataclasses.fields(cfg)}
    if not isinstance(cls.budgets, dict) or set(BUDGETS) - set(cls.budgets):
        raise TypeError(f"{where}.budgets must map each of {', '.join(BUDGETS)} to the Config fields it sets")
    for b, changes in cls.budgets.items():
        unknown = set(changes) - fields if isinstance(changes, dict) else {"<not a dict>"}
        if unknown:
            raise TypeError(f"{where}.budgets[{b!r}] sets {', '.join(sorted(unknown))}, not fields of Config")
    for attr, ok in (("multistep", lambda v: isinstance(v, bool)), ("teacher", lambda v: v is None or isinstance(v, str)),
                     ("teacher_needs", lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v)),
                     ("no_likelihood", lambda v: v is None or isinstance(v, str))):
        if not ok(getattr(cls, attr)):
            raise TypeError(f"{where}.{attr} = {getattr(cls, attr)!r} has the wrong type (see genbench.api.Generator)")
    if cls.multistep and cls.default_steps is Generator.default_steps:
        raise TypeError(f"{where} is multistep but does not define default_steps() (the step count of a plain run)")


def check_config(cfg: Any, *, positive: tuple[str, ...] = (), nonnegative: tuple[str, ...] = (),
                 fraction: tuple[str, ...] = (), choices: dict[str, tuple] | None = None) -> None:
    """Validates a config dataclass (call it from ``__post_init__``): every float field finite,
    ``positive`` fields > 0, ``nonnegative`` >= 0, ``fraction`` in [0, 1), ``choices`` one of the
    listed values. Raises UsageError naming the field, its value and what is valid."""
    def bad(name, why):
        raise UsageError(f"{type(cfg).__name__}.{name} = {getattr(cfg, name)!r}: {why}")

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            bad(f.name, "must be a finite number")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
            bad(f.name, f"must be at most {MAX_INT} (2^31 - 1, the largest size torch indexes)")
    for name in positive:
        if not getattr(cfg, name) > 0:
            bad(name, "must be > 0")
    for name in nonnegative:
        if not getattr(cfg, name) >= 0:
            bad(name, "must be >= 0")
    for name in fraction:
        if not 0 <= getattr(cfg, name) < 1:
            bad(name, "must lie in [0, 1)")
    for name, valid in (choices or {}).items():
        if getattr(cfg, name) not in valid:
            bad(name, f"valid: {', '.join(map(str, valid))}")


def _coerce(value: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        typ = args[0]
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if typ is int:
        return int(value)
    if typ is float:
        v = float(value)
        if not math.isfinite(v):
            raise ValueError("expected a finite number")
        return v
    if typ is str:
        return value
    if origin is tuple:
        inner = typing.get_args(typ)[0]
        return tuple(_coerce(v, inner) for v in value.split(":") if v)
    raise ValueError(f"cannot parse {typ}")


# -- search spaces (genbench tune) ---------------------------------------------------------------
class Space:
    """One config field's range for ``genbench tune``: ``value(u)`` maps u in [0, 1) to a value."""

    def value(self, u: float) -> Any:
        raise NotImplementedError

    def check(self) -> str | None:
        """What is wrong with the range (None: nothing)."""
        return None


@dataclass(frozen=True)
class LogUniform(Space):
    """A positive number, uniform in its logarithm over [low, high] (learning rates)."""
    low: float
    high: float

    def value(self, u: float) -> float:
        return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))

    def check(self) -> str | None:
        if not (self.low > 0 and self.high > 0):
            return f"log-uniform bounds must be > 0, got [{self.low}, {self.high}]"
        return None if self.low < self.high else f"empty range [{self.low}, {self.high}]"

    def __str__(self) -> str:
        return f"log-uniform [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Uniform(Space):
    """A number, uniform over [low, high]."""
    low: float
    high: float

    def value(self, u: float) -> float:
        return float(self.low + u * (self.high - self.low))

    def check(self) -> str | None:
        return None if self.low < self.high else f"empty range [{self.low}, {self.high}]"

    def __str__(self) -> str:
        return f"uniform [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class IntRange(Space):
    """A whole number in [low, high], both included, each equally likely."""
    low: int
    high: int

    def value(self, u: float) -> int:
        return int(min(self.high, self.low + math.floor(u * (self.high - self.low + 1))))

    def check(self) -> str | None:
        if not (isinstance(self.low, int) and isinstance(self.high, int)):
            return f"integer range bounds must be whole numbers, got [{self.low}, {self.high}]"
        return None if self.low < self.high else f"empty range [{self.low}, {self.high}]"

    def __str__(self) -> str:
        return f"integers [{self.low}, {self.high}]"


@dataclass(frozen=True)
class Choice(Space):
    """One of a few values, each equally likely."""
    values: tuple

    def value(self, u: float) -> Any:
        return self.values[min(len(self.values) - 1, int(u * len(self.values)))]

    def check(self) -> str | None:
        if len(self.values) < 2:
            return f"a choice needs at least 2 values, got {list(self.values)}"
        return None if len(set(self.values)) == len(self.values) else f"repeated values in {list(self.values)}"

    def __str__(self) -> str:
        return "one of " + ", ".join(map(str, self.values))


def check_space(cls) -> None:
    """A model class's ``search_space``: each key a field of its Config, each range valid, and the
    Config's defaults inside it (the default is always a trial). Raises UsageError naming the model,
    the field and what is wrong."""
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    defaults = cls.Config()
    for name, space in cls.search_space.items():
        where = f"{cls.name}: search space field {name!r}"
        if name not in fields:
            raise UsageError(f"{where}: not a field of {cls.Config.__qualname__}; valid: {', '.join(sorted(fields))}")
        if not isinstance(space, Space):
            raise UsageError(f"{where}: {space!r} is not a LogUniform, Uniform, IntRange or Choice")
        why = space.check()
        if why:
            raise UsageError(f"{where}: {why}")
        d = getattr(defaults, name)
        inside = (d in space.values if isinstance(space, Choice) else space.low <= d <= space.high)
        if not inside:
            raise UsageError(f"{where}: the default {d!r} lies outside {space} (the default is always a trial)")


def apply_params(config: Any, params: dict[str, str]) -> Any:
    """Returns ``config`` with string overrides applied, each parsed to the field's type."""
    if not params:
        return config
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for key, raw in params.items():
        if key not in fields:
            raise UsageError(
                f"unknown parameter {key!r} for {type(config).__qualname__}; valid: {', '.join(sorted(fields))}"
            )
        try:
            changes[key] = _coerce(raw, hints[key])
        except ValueError as e:
            raise UsageError(f"bad value {raw!r} for parameter {key!r}: {e}") from None
    return dataclasses.replace(config, **changes)
