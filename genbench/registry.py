"""Model discovery. Every model, built-in or not, is an entry point of the group
``genbench.models`` (name = "package.module:Class"); a plugin package adds its own and needs no
change to genbench. A plugin that fails to import is kept as a broken entry with its reason, so
``genbench list`` and runs of other models still work.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

from .api import Generator, UsageError

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


def discover() -> dict[str, Entry]:
    found: dict[str, Entry] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        source = "built-in" if dist == "genbench" else "plugin"
        entry = Entry(ep.name, source, ep.value, dist)
        if ep.name in found and found[ep.name].source == "built-in":
            continue  # a plugin cannot shadow a built-in
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Generator)):
                raise TypeError(f"{ep.value} is not a genbench.api.Generator subclass")
            entry.cls = cls
        except Exception as e:  # noqa: BLE001 - any import failure of a plugin is reported, not raised
            entry.source, entry.error = "broken", f"{type(e).__name__}: {e}".splitlines()[0]
        found[ep.name] = entry
    return found


def resolve(names: list[str], found: dict[str, Entry] | None = None) -> list[Entry]:
    """Expands aliases and returns the entries, in order, without duplicates; raises UsageError
    for an unknown or broken model."""
    found = discover() if found is None else found
    out: list[Entry] = []
    for name in names:
        for n in ALIASES.get(name, [name]):
            if n not in found:
                valid = sorted([k for k, e in found.items() if e.cls] + list(ALIASES))
                raise UsageError(f"unknown model {n!r}; valid: {', '.join(valid)}")
            e = found[n]
            if e.cls is None:
                raise UsageError(f"model {n!r} is broken ({e.error}); fix or uninstall {e.dist}")
            if e not in out:
                out.append(e)
    return out
