"""Configuration: TOML read with tomllib, validated into small dataclasses.

With no file, the embedded defaults below apply: database and media under ``./data``, a folder
source watching ``./inbox``, the ``animeface`` detector and an ``resnet18`` scorer.
Every key is documented in ``config.example.toml``; an unknown key, a wrong type or a bad value
raises :class:`ConfigError` with one line naming the file, the key and what was expected.

Each table's dataclass lives beside the code that uses it (``[download]`` in ``sources/http.py``,
``[detector]`` in ``scorer/detect.py``, ``[scorer]``, ``[train]`` and ``[characters]`` in ``scorer/settings.py``,
``[ranking]`` in ``scorer/ranking.py``, a source kind's keys in its ``Options``); the bot's own
tables are here. This module composes them into :class:`Config`, runs each one's ``check()``
and resolves secrets in one place: a field whose metadata names an environment variable
(``{"env": "DISCORD_TOKEN", "secret": True}``) is filled from it when empty, and secrets are
registered for masking in log lines (:func:`fill_from_env`).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bot.logs import register_secret
from scorer.detect import DetectorConfig
from scorer.ranking import RankingConfig
from scorer.settings import IdentityConfig, ScorerConfig, TrainConfig
from sources import SOURCE_KINDS, make_options
from sources.http import DownloadConfig
from storage.paths import DataPaths


class ConfigError(Exception):
    """A configuration problem, phrased as one line for the user."""


@dataclass
class LogConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: str = ""                        # also write the log here (rotated); "" = standard error only
    max_mb: float = 10.0                  # rotate the log file at this size
    keep: int = 5                         # rotated log files kept

    def check(self):
        return _positive(self, ("max_mb", "keep"))


@dataclass
class StorageConfig:
    max_media_gb: float = 0.0             # prune media beyond this size (0 = no limit)
    keep_days: float = 0.0                # prune media of pictures older than this (0 = keep forever)
    min_free_gb: float = 1.0              # pause downloads while the data folder's disk has less free
    max_thumbs_mb: float = 500.0          # the thumbnail cache is trimmed to this size

    def check(self):
        for key in ("max_media_gb", "keep_days", "min_free_gb"):
            if getattr(self, key) < 0:
                return key, f"expected 0 or more, got {getattr(self, key)!r}"
        return _positive(self, ("max_thumbs_mb",))


@dataclass
class BackupConfig:
    schedule: str = ""                    # cron "min hour day month weekday" for automatic backups; "" = off
    dest: str = ""                        # where scheduled backups go; "" = <data_dir>/backups
    keep: int = 7                         # scheduled backups kept (the oldest are removed)
    media: bool = False                   # scheduled backups include the media files

    def check(self):
        if self.schedule:
            problem = cron_problem(self.schedule)
            if problem:
                return "schedule", problem
        return _positive(self, ("keep",))

    def dest_path(self, data_path: Path) -> Path:
        """Where scheduled backups go: ``dest``, or ``<data_dir>/backups`` when it is empty."""
        return Path(self.dest) if self.dest else Path(data_path) / "backups"


def cron_problem(expression: str) -> str | None:
    """Why ``expression`` is not a crontab line APScheduler reads (None when it is one)."""
    from apscheduler.triggers.cron import CronTrigger
    try:
        CronTrigger.from_crontab(expression)
    except ValueError as e:
        return (f"expected a cron expression like '0 4 * * *' (minute hour day month weekday), "
                f"got {expression!r}: {e}")
    return None


def _positive(section, keys: tuple[str, ...]):
    for key in keys:
        value = getattr(section, key)
        if value <= 0:
            return key, f"expected a positive number, got {value!r}"
    return None


DEFAULT_REACTIONS = {"1\ufe0f\u20e3": 1, "2\ufe0f\u20e3": 2, "3\ufe0f\u20e3": 3, "4\ufe0f\u20e3": 4,
                     "5\ufe0f\u20e3": 5, "\u2764\ufe0f": 5, "\U0001f44e": 1}


@dataclass
class DiscordConfig:
    token: str = field(default="", metadata={"env": "DISCORD_TOKEN", "secret": True})  # none = Discord off
    channel_id: int = 0                   # the channel recommendations are posted to
    nsfw_channel_id: int = 0              # questionable/explicit pictures go here; 0 = never posted
    owner_ids: list[int] = field(default_factory=list)  # users whose reactions and commands count
    guild_id: int = 0                     # register slash commands in this server only; 0 = everywhere
    interval: float = 3600.0              # seconds between posting cycles
    posts_per_cycle: int = 3
    min_score: float = 0.0                # score-ranked pictures predicted below this are not posted
    near_duplicate_distance: int = 8      # skip pictures this close (phash bits) to one posted; -1 = off
    blocklist: list[str] = field(default_factory=list)  # pictures with any of these tags are not posted
    catch_up_hours: float = 72.0          # on start, read reactions on posts this recent
    max_upload_bytes: int = 10 * 1024 * 1024  # attachments are shrunk below this (and the server's limit)
    reactions: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_REACTIONS))
    compare_every: int = 0                # after every N posts, post two pictures to compare (🅰️/🅱️); 0 = off

    def check(self):
        problem = _positive(self, ("interval", "posts_per_cycle", "catch_up_hours", "max_upload_bytes"))
        if problem:
            return problem
        if self.compare_every < 0:
            return "compare_every", f"expected 0 (off) or a number of posts, got {self.compare_every!r}"
        for key, value in [("channel_id", self.channel_id), ("nsfw_channel_id", self.nsfw_channel_id),
                           ("guild_id", self.guild_id), *[("owner_ids", v) for v in self.owner_ids]]:
            if value < 0:
                return key, f"expected a Discord id (a positive number), got {value!r}"
        for emoji, value in self.reactions.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 5:
                return f"reactions.{emoji}", f"expected a rating from 1 to 5, got {value!r}"
        return None

    def off_reason(self) -> str | None:
        """Why Discord cannot run with these settings (None: it can)."""
        if not self.token:
            return "no token (set DISCORD_TOKEN or discord.token)"
        if not self.channel_id:
            return "discord.channel_id is not set (right-click the channel > Copy Channel ID)"
        if not self.owner_ids:
            return "discord.owner_ids is empty (only the owner's reactions and commands count)"
        return None


@dataclass
class WebConfig:
    enabled: Literal["auto", "on", "off"] = "auto"  # auto: on unless Discord is set up
    host: str = "127.0.0.1"
    port: int = 8080
    # or TASTEFEED_WEB_TOKEN; required unless host is loopback
    token: str = field(default="", metadata={"env": "TASTEFEED_WEB_TOKEN", "secret": True})
    page_size: int = 30                   # pictures per page
    thumb_size: int = 360                 # thumbnails (pixels, longest side), made once and cached

    def loopback(self) -> bool:
        return is_loopback(self.host)

    def check(self):
        problem = _positive(self, ("page_size", "thumb_size"))
        if problem:
            return problem
        if not 0 <= self.port <= 65535:
            return "port", f"expected a port number (0-65535), got {self.port!r}"
        if not self.loopback() and not self.token and self.enabled != "off":
            return "token", (f"the gallery listens on {self.host!r}, beyond this machine, so it needs a "
                             "secret token (web.token or TASTEFEED_WEB_TOKEN); open it once with ?token=...")
        return None


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class DaemonConfig:
    score_queue_size: int = 64
    stop_timeout: float = 15.0            # seconds to finish work in flight on SIGINT/SIGTERM
    max_items_per_poll: int = 50          # default cap of new items per poll, per source
    backoff_max: float = 3600.0           # longest wait between retries of a failing source
    unhealthy_after: int = 3              # consecutive failures before a source is unhealthy

    def check(self):
        return _positive(self, ("score_queue_size", "max_items_per_poll", "backoff_max", "unhealthy_after"))


@dataclass
class SourceConfig:
    name: str
    kind: str
    interval: float = 300.0               # seconds between polls
    enabled: bool = True
    max_items: int = 0                    # new items per poll; 0 = [daemon] max_items_per_poll
    options: dict[str, Any] = field(default_factory=dict)  # the kind's own keys, validated


@dataclass
class Config:
    data_dir: str = "data"
    log: LogConfig = field(default_factory=LogConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    characters: IdentityConfig = field(default_factory=IdentityConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    web: WebConfig = field(default_factory=WebConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    sources: list[SourceConfig] = field(default_factory=list)
    path: str | None = None               # the file this came from (not a key)
    default_sources: bool = False         # no sources key: the built-in inbox (not a key)

    @property
    def paths(self) -> DataPaths:
        """Where the database, media, models, ... live; what the scorer is handed."""
        return DataPaths(Path(self.data_dir))

    # Shorthands for the paths, as the bot uses them.
    @property
    def data_path(self) -> Path:
        return self.paths.root

    @property
    def db_path(self) -> Path:
        return self.paths.db

    @property
    def media_path(self) -> Path:
        return self.paths.media

    @property
    def models_path(self) -> Path:
        return self.paths.models

    @property
    def cache_path(self) -> Path:
        return self.paths.cache

    @property
    def eval_path(self) -> Path:
        return self.paths.eval

    @property
    def thumbs_path(self) -> Path:
        return self.paths.thumbs

    def web_on(self) -> bool:
        """The gallery runs when asked to, or by default when Discord is not set up."""
        return self.web.enabled == "on" or (self.web.enabled == "auto" and self.discord.off_reason() is not None)


DEFAULT_SOURCES = [{"name": "inbox", "kind": "folder", "interval": 2, "path": "inbox"}]
_SOURCE_KEYS = {"name", "kind", "interval", "enabled", "max_items"}
_NOT_KEYS = {"path", "options", "default_sources"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list,):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "nothing"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (numbers widened)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return parse_dataclass(tp, value, where)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is Any:
        return value
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")


def parse_dataclass(cls: type, data: dict[str, Any], where: str, *, extra_ok: bool = False):
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = set(fields) - _NOT_KEYS if cls is Config else set(fields)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            if extra_ok:
                continue
            choices = ", ".join(sorted(known))
            raise ConfigError(f"{where}.{key}: unknown key (known keys: {choices})".lstrip("."))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}".lstrip("."))
    missing = [name for name, f in fields.items()
               if name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: missing (expected {_describe(hints[missing[0]])})"
                          .lstrip("."))
    return cls(**kwargs)


def env_name(template: str, values: dict[str, Any]) -> str:
    """An environment variable's name from a field's ``env`` metadata: ``{field}`` stands for
    another field's value in capitals (a booru's ``{api}_API_KEY`` is ``DANBOORU_API_KEY``)."""
    return template.format(**{key: str(value).upper() for key, value in values.items()})


def fill_from_env(section):
    """``section`` (a settings dataclass or a source's Options) with every empty field that names an
    environment variable in its metadata (``{"env": "X_BEARER_TOKEN"}``) taken from that variable.
    The values of fields marked ``"secret": True`` are registered for masking in log lines. This is
    the one place where secrets are read from the environment; a copy is returned if anything was
    filled, the section itself otherwise."""
    fields = dataclasses.fields(section)
    values = {f.name: getattr(section, f.name) for f in fields}
    filled = {}
    for f in fields:
        template = f.metadata.get("env")
        if template is None:
            continue
        value = values[f.name] or os.environ.get(env_name(template, values), "")
        if value != values[f.name]:
            filled[f.name] = value
        if f.metadata.get("secret"):
            register_secret(value or None)
    return dataclasses.replace(section, **filled) if filled else section


def _check(section, where: str) -> None:
    """Raise the first problem the section's ``check()`` finds, as one line naming the key."""
    check = getattr(section, "check", None)
    problem = check() if check else None
    if problem:
        key, message = problem
        raise ConfigError(f"{where}.{key}: {message}")


def _check_values(cfg: Config) -> None:
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            _check(section, f.name)
    problem = cron_problem(cfg.train.schedule) if cfg.train.schedule else None
    if problem:
        raise ConfigError(f"train.schedule: {problem}")
    if not cfg.data_dir:
        raise ConfigError("data_dir: expected a folder path, got ''")


def parse_source(raw: dict[str, Any], where: str) -> SourceConfig:
    """Validate one ``[[sources]]`` table: the common keys here, the rest by the kind's Options.

    The kind's ``check()`` sees credentials from the environment too, but ``options`` keeps only
    what was written, so secrets from the environment never reach the sources table: they are
    filled again when the source is built (:func:`build_source`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {raw!r}")
    common = {k: v for k, v in raw.items() if k in _SOURCE_KEYS}
    options = {k: v for k, v in raw.items() if k not in _SOURCE_KEYS}
    if "options" in raw:
        raise ConfigError(f"{where}.options: put the source's keys directly in its table")
    for key in ("name", "kind"):
        if key not in common:
            raise ConfigError(f"{where}.{key}: missing (expected a string)")
    kind = common["kind"]
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(sorted(SOURCE_KINDS))}, got {kind!r}")
    src = parse_dataclass(SourceConfig, common, where)
    if src.interval <= 0:
        raise ConfigError(f"{where}.interval: expected a positive number of seconds, got {src.interval!r}")
    if src.max_items < 0:
        raise ConfigError(f"{where}.max_items: expected 0 or more, got {src.max_items!r}")
    opts = parse_dataclass(SOURCE_KINDS[kind].Options, options, where)
    _check(fill_from_env(opts), where)
    src.options = dataclasses.asdict(opts)
    return src


def build_source(name: str, kind: str, options: dict[str, Any], http=None):
    """A :class:`sources.base.Source` from its stored options, with the credentials left empty
    there filled from the environment (and registered for masking)."""
    return SOURCE_KINDS[kind](name, fill_from_env(make_options(kind, options)), http)


def load_config(path: str | os.PathLike | None = None, *, cwd: str | os.PathLike | None = None) -> Config:
    """Load ``path``, else ``config.toml`` in the working directory, else the embedded defaults."""
    base = Path(cwd or os.getcwd())
    if path is None and (base / "config.toml").exists():
        path = base / "config.toml"
    data: dict[str, Any] = {}
    label = "defaults"
    if path is not None:
        label = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{label}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{label}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{label}: not valid TOML: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"{label}: cannot read: {e.strerror}") from None
    try:
        default_sources = "sources" not in data
        raw_sources = data.pop("sources", DEFAULT_SOURCES)
        cfg = parse_dataclass(Config, data, "")
        for f in dataclasses.fields(cfg):
            if dataclasses.is_dataclass(getattr(cfg, f.name)):
                setattr(cfg, f.name, fill_from_env(getattr(cfg, f.name)))
        if not isinstance(raw_sources, list):
            raise ConfigError(f"sources: expected a list of tables ([[sources]]), got {raw_sources!r}")
        cfg.sources = [parse_source(dict(s) if isinstance(s, dict) else s, f"sources[{i}]")
                       for i, s in enumerate(raw_sources)]
        names = [s.name for s in cfg.sources]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"sources: the name {sorted(dupes)[0]!r} is used twice")
        _check_values(cfg)
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from None
    cfg.path = str(path) if path else None
    cfg.default_sources = default_sources
    # Relative paths in a config file are relative to the working directory, like the defaults.
    return cfg
