"""Reloading the config file into a running daemon (SIGHUP, or the gallery's "Reload" button).

What a reload applies at once: the ``[[sources]]`` (added, changed and removed sources are polled,
re-polled or dropped within seconds, as with ``sources add``) and ``download.allow_private``
(the next request is judged by the new list). Every other key is read only at start: a reload
that finds one changed names it, and the Sources page keeps saying that a restart is needed
until the daemon restarts. A config file with a mistake is not applied at all (the running
config stays) and the reload says why in one line.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from bot.config import Config

log = logging.getLogger("tastefeed.daemon")

LIVE_KEYS = ("download.allow_private",)   # applied by a reload; sources are applied too


@dataclass
class Reloaded:
    ok: bool
    message: str                                        # one line: what was applied, what was not
    restart: list[str] = field(default_factory=list)    # changed keys that need a restart


def flat_settings(cfg: Config) -> dict[str, object]:
    """Every setting but the sources as ``section.key`` -> value."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(cfg):
        if f.name in ("sources", "path"):
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out[f"{f.name}.{g.name}"] = getattr(value, g.name)
        else:
            out[f.name] = value
    return out


def changed_settings(old: Config, new: Config) -> list[str]:
    """The ``section.key`` names whose values differ (never the values: some are secrets)."""
    a, b = flat_settings(old), flat_settings(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def source_changes(old: Config, new: Config) -> tuple[list[str], list[str], list[str]]:
    """(added, changed, removed) config sources, by name."""
    before = {s.name: s for s in old.sources}
    after = {s.name: s for s in new.sources}
    return (sorted(after.keys() - before.keys()),
            sorted(n for n in after.keys() & before.keys() if after[n] != before[n]),
            sorted(before.keys() - after.keys()))


def apply_live(cfg: Config, new: Config, http) -> tuple[list[str], list[str]]:
    """Put ``new``'s sources and live keys into the running ``cfg`` (and the daemon's ``http``
    client); returns (what was applied, keys left that need a restart)."""
    changed = changed_settings(cfg, new)
    applied = []
    if "download.allow_private" in changed:
        cfg.download.allow_private = list(new.download.allow_private)
        if http is not None:
            http.set_allow_private(cfg.download.allow_private)
        applied.append("download.allow_private")
    added, altered, removed = source_changes(cfg, new)
    cfg.sources = new.sources
    for word, names in (("added", added), ("changed", altered), ("removed", removed)):
        if names:
            applied.append(f"sources {word}: {', '.join(names)}")
    return applied, [k for k in changed if k not in LIVE_KEYS]


def summary(path: str, applied: list[str], restart: list[str]) -> str:
    """The one line a reload answers with."""
    line = f"reloaded {path}: " + ("; ".join(applied) if applied else "no source or live setting changed")
    if restart:
        line += f"; a restart is needed to apply {', '.join(restart)}"
    return line
