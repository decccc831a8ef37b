"""Model discovery. Every model, built-in or not, is an entry point of the group
``genbench.models`` (name = "package.module:Class"); a plugin package adds its own and needs no
change to genbench.

A plugin is imported only when it is listed or run (``Entry.load``), so a slow or broken plugin
costs nothing to runs that do not name it. Whatever goes wrong is kept as a broken entry with its
reason, never raised: an import error, a class that is not a well-formed ``Generator``
(``api.check_generator_class``), or a name that two plugin distributions both claim. A plugin
cannot shadow a built-in: the built-in is kept and the list names the plugin it ignores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from .api import UsageError, check_generator_class

GROUP = "genbench.models"
#: names that expand to several models
ALIASES: dict[str, list[str]] = {"cm": ["cm-cd", "cm-ct"]}


@dataclass
class Entry:
    name: str
    source: str  # built-in | plugin | broken
    target: str  # "module:attr"
    dist: str
    cls: type | None = None
    error: str | None = None
    ignored: list[str] = field(default_factory=list)  # plugins claiming a built-in's name
    ep: EntryPoint | None = field(default=None, repr=False, compare=False)

    def load(self) -> "Entry":
        """Imports and checks the class once; a failure makes the entry broken with its reason."""
        if self.cls is not None or self.error is not None or self.ep is None:
            return self
        try:
            cls = self.ep.load()
            check_generator_class(cls, self.target)
            self.cls = cls
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - any failure of a plugin (a SystemExit too) is reported, not raised
            self.source, self.error = "broken", (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0]
        return self


def _dist(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "?"


def discover(load: bool = True) -> dict[str, Entry]:
    """Every registered name; ``load`` imports each (``genbench list``), otherwise they are imported
    when ``resolve`` names them."""
    groups: dict[str, dict[tuple, EntryPoint]] = {}
    for ep in entry_points(group=GROUP):
        groups.setdefault(ep.name, {})[(_dist(ep), ep.value)] = ep  # one dist seen twice on the path: once
    found: dict[str, Entry] = {}
    for name in sorted(groups):
        eps = sorted(groups[name].values(), key=lambda e: (_dist(e) != "genbench", _dist(e), e.value))
        first, rest = eps[0], eps[1:]
        if _dist(first) == "genbench":
            entry = Entry(name, "built-in", first.value, "genbench", ep=first,
                          ignored=[f"{_dist(e)} ({e.value})" for e in rest])
        elif rest:
            claims = " and ".join(f"{_dist(e)} ({e.value})" for e in eps)
            entry = Entry(name, "broken", ", ".join(e.value for e in eps), ", ".join(_dist(e) for e in eps),
                          error=f"name clash: {name!r} is claimed by {claims}; uninstall one or rename its entry point")
        else:
            entry = Entry(name, "plugin", first.value, _dist(first), ep=first)
        found[name] = entry.load() if load else entry
    return found


def resolve(names: list[str], found: dict[str, Entry] | None = None) -> list[Entry]:
    """Expands aliases and returns the entries, in order, without duplicates, importing only these;
    raises UsageError for an unknown or broken model."""
    found = discover(load=False) if found is None else found
    out: list[Entry] = []
    for name in names:
        for n in ALIASES.get(name, [name]):
            if n not in found and not any(e.dist == "genbench" for e in found.values()):
                raise UsageError(f"unknown model {n!r}: genbench's own models are not registered, for the package is "
                                 "not installed (its models are its entry points); pip install -e . in its source tree")
            if n not in found:
                valid = sorted([k for k, e in found.items() if e.source != "broken"] + list(ALIASES))
                raise UsageError(f"unknown model {n!r}; valid: {', '.join(valid)}")
            e = found[n].load()
            if e.cls is None:
                raise UsageError(f"model {n!r} is broken ({e.error}); fix or uninstall {e.dist}")
            if e not in out:
                out.append(e)
    return out
