"""Administration shared by the command line, the Discord commands and the web gallery:
adding, listing and removing sources, and the status summary (``/stats``, with the daemon's
event-loop lag when it is given).

Every function takes a sync :class:`storage.Store` (the daemon runs them on its writer thread)
and raises :class:`ManageError` with a message meant for the user.
"""
from __future__ import annotations

import json
import tomllib
from urllib.parse import urlsplit

from bot.config import Config, ConfigError, SourceConfig, parse_source


PAUSED_SOURCES = "sources.paused"   # settings key: names of sources not polled for now


class ManageError(Exception):
    """The request cannot be done; the message says why."""


def source_runtime_config(src: SourceConfig) -> dict:
    return {"interval": src.interval, "enabled": src.enabled, "max_items": src.max_items,
            "options": src.options}


def parse_value(text: str):
    """A ``key=value`` value as TOML (numbers, true/false, lists), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_pairs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ManageError(f"expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def add_source(store, cfg: Config, name: str, kind: str, options: dict) -> SourceConfig:
    """Validate and add (or replace) a run-time source; a running daemon polls it within 15 s."""
    if any(s.name == name for s in cfg.sources):
        raise ManageError(f"source {name!r} is defined in {cfg.path or 'the defaults'}; change it there")
    existing = store.get_source(name)
    if existing is not None and existing["origin"] not in ("cli",):
        raise ManageError(f"source {name!r} exists already ({existing['origin']})")
    try:
        src = parse_source({"name": name, "kind": kind, **options}, f"source {name}")
    except ConfigError as e:
        raise ManageError(str(e)) from None
    store.upsert_source(src.name, src.kind, source_runtime_config(src), origin="cli")
    return src


def remove_source(store, cfg: Config, name: str) -> None:
    if any(s.name == name for s in cfg.sources):
        if cfg.default_sources:   # the built-in inbox: a config with a sources key replaces it
            where = f"{cfg.path} names no sources" if cfg.path else "there is no config file"
            raise ManageError(f"source {name!r} is the built-in default, used while {where}: to drop it, put "
                              f"`sources = []` at the top of {cfg.path or 'a config.toml'} (or [[sources]] tables "
                              "of your own, which replace it)")
        raise ManageError(f"source {name!r} is defined in {cfg.path or 'the config'}: remove its [[sources]] "
                          "table there")
    row = store.get_source(name)
    if row is None or row["origin"] != "cli":
        raise ManageError(f"no source named {name!r}" if row is None else
                          f"source {name!r} is not a run-time source and cannot be removed")
    store.remove_source(name)


def pause_source(store, name: str, paused: bool) -> None:
    """Stop (or restart) polling a source without removing it; kept across restarts."""
    if store.get_source(name) is None:
        raise ManageError(f"no source named {name!r}")
    names = set(store.get_setting(PAUSED_SOURCES, []))
    names = names | {name} if paused else names - {name}
    store.set_setting(PAUSED_SOURCES, sorted(names))


def sync_config_sources(store, cfg: Config) -> list[str]:
    """Make the sources table hold the config's sources (run-time ones stay); returns the names
    of sources removed because they left the config."""
    for src in cfg.sources:
        store.upsert_source(src.name, src.kind, source_runtime_config(src))
    names = {s.name for s in cfg.sources}
    gone = [r["name"] for r in store.list_sources() if r["origin"] == "config" and r["name"] not in names]
    for name in gone:
        store.remove_source(name)
    return gone


def source_lines(store) -> list[str]:
    """One line per source (two when it has an error), as `sources list` prints them."""
    lines = []
    paused = set(store.get_setting(PAUSED_SOURCES, []))
    for r in store.list_sources():
        conf = r["config"]
        if r["kind"] == "import":
            n = store.execute("SELECT COUNT(*) AS n FROM images WHERE source_id = ?", [r["id"]])[0]["n"]
            lines.append(f"{r['name']}  [pictures from import-labels, never polled]  {n} picture(s)")
            continue
        state = source_state(r, paused)
        lines.append(f"{r['name']}  [{r['kind']}, {r['origin']}]  {state}  every {conf.get('interval')}s  "
                     f"items {r['items_fetched']}  last poll {r['last_poll_at'] or '-'}  "
                     f"next {state if state in ('paused', 'disabled') else r['next_poll_at'] or '-'}"
                     + reads_today(r))
        if r["last_error"]:
            lines.append(f"    last error ({r['failures']} failure(s) in a row): {r['last_error']}")
    return lines


def reads_today(row: dict) -> str:
    """For sources billed per read (X): the reads used today against the daily cap."""
    cap = row["config"].get("options", {}).get("max_reads_per_day")
    if row["kind"] != "x" or cap is None:
        return ""
    from sources.x import today
    used = row["cursor"].get("reads", 0) if row["cursor"].get("reads_day") == today() else 0
    return f"  reads today {used}/{cap}"


def source_state(row: dict, paused: set[str]) -> str:
    if not row["config"].get("enabled", True):
        return "disabled"
    if row["name"] in paused:
        return "paused"
    return "ok" if row["healthy"] else "UNHEALTHY"


def web_link(url) -> str | None:
    """A page address from a source, when it may be shown as a link: http and https only (a
    feed's ``javascript:`` or ``data:`` link is stored as given but never becomes a link)."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    return url.strip() if parts.scheme.lower() in ("http", "https") and parts.hostname else None


def picture_data(store, image_id: int) -> dict | None:
    """A picture with its faces (and scores), every label, the current rating and its source name."""
    image = store.get_image(image_id)
    if image is None:
        return None
    source = store.source_name(image["source_id"]) if image.get("source_id") else None
    faces = store.faces_of(image_id)
    return {"image": image, "faces": faces, "labels": store.labels_of(image_id),
            "current": store.current_label(image_id), "source": source,
            "characters": store.face_characters([f["id"] for f in faces])}


def name_picture_face(store, image_id: int, name: str, number: int | None, *, origin: str) -> tuple[dict, bool]:
    """Name face ``number`` of a picture (numbered as ``/why`` numbers them, best score first;
    None: the picture's only face) as the character ``name``, created if new. Returns (the face,
    whether the character is new); :class:`ManageError` (or ``CharacterNameError``) says why not."""
    from bot.posting import numbered_faces
    from storage.characters import check_name
    from storage.records import WHOLE_PICTURE

    name = check_name(name)
    faces = numbered_faces(store.faces_of(image_id))
    if not faces or all(f["detector"] == WHOLE_PICTURE for f in faces):
        raise ManageError(f"picture #{image_id} has no face (no face was found in it), nothing to name")
    if number is None:
        if len(faces) > 1:
            raise ManageError(f"picture #{image_id} has {len(faces)} faces: say which with face "
                              f"(1-{len(faces)}, numbered as /why numbers them)")
        number = 1
    if not 1 <= number <= len(faces):
        raise ManageError(f"picture #{image_id} has {len(faces)} face(s): face {number} does not exist")
    face = faces[number - 1]
    created = store.character_id(name) is None
    store.name_face(face["id"], store.character_id(name, create=True), origin=origin)
    return face, created


def stats(store, channel: str | None = None, live: dict | None = None) -> dict:
    """Labels and comparisons, the active model and its validation metrics, queue sizes and
    source health; with ``live`` (the daemon's ``stats``), its event-loop lag."""
    model = store.active_model() or {}
    metrics = json.loads(model["metrics"]) if model.get("metrics") else {}
    counts = store.status_counts()
    sources = [r for r in store.list_sources() if r["kind"] != "import"]
    out = {
        "labelled_pictures": store.label_count(),
        "label_rows": store.execute("SELECT COUNT(*) AS n FROM labels WHERE removed_at IS NULL")[0]["n"],
        "comparisons": store.comparison_count(),
        "model": model.get("version"),
        "model_trained": bool(metrics),
        "val": metrics.get("val") or {},
        "head": metrics.get("head") or {},
        "model_kind": metrics.get("kind"),
        "network": metrics.get("network_version"),
        "queues": {"to download": counts.get("pending", 0), "to score": counts.get("downloaded", 0),
                   "scored": counts.get("scored", 0), "failed": counts.get("failed", 0)},
        "sources": {"total": len(sources), "unhealthy": sorted(r["name"] for r in sources if not r["healthy"])},
    }
    out["characters"] = character_stats(store)
    if live is not None:
        out["loop_lag_ms"] = live.get("loop_lag_ms")
    if channel is not None:
        out["unposted"] = store.count_candidates(channel)
        out["posts"] = store.post_counts(channel)
    return out


def character_stats(store) -> dict:
    """The named characters and the active identity embedder with its metrics (top-1 on held-out
    faces, and the open-set F1 where its metrics hold one)."""
    chars = store.list_characters()
    row = store.active_identity_model() or {}
    metrics = json.loads(row["metrics"]) if row.get("metrics") else {}
    open_set = metrics.get("open_set") or {}
    return {"characters": len(chars), "examples": sum(c["examples"] for c in chars),
            "weak": sum(c["weak"] or 0 for c in chars), "embedder": row.get("version"),
            "trained": bool(metrics), "top1": metrics.get("val_top1"),
            "f1": open_set.get("f1", metrics.get("open_set_f1")), "threshold": row.get("threshold")}


def format_characters(c: dict) -> str:
    if c["embedder"] is None:
        return f"characters: {c['characters']} named, no identity embedder yet"
    if not c["trained"]:
        quality = "untrained (python main.py characters train)"
    else:
        quality = ", ".join(part for part in (
            f"validation top-1 {c['top1']:.3f}" if c["top1"] is not None else "",
            f"open-set F1 {c['f1']:.3f}" if c["f1"] is not None else "",
            f"unknown below {c['threshold']:.3f}" if c["threshold"] is not None else "") if part)
    weak = f", {c['weak']} weak" if c["weak"] else ""
    return (f"characters: {c['characters']} ({c['examples']} example(s){weak}); "
            f"identity embedder {c['embedder']} — {quality}")


def format_stats(s: dict) -> list[str]:
    val = s["val"]
    quality = (f"validation Pearson {val.get('pearson', float('nan')):.3f}, MAE {val.get('mae', float('nan')):.3f}, "
               f"top-10% precision {val.get('topk_precision', float('nan')):.3f} (n={val.get('n', 0)})"
               if s["model_trained"] else "untrained (ranking by popularity until trained)")
    q = s["queues"]
    lines = [f"labels: {s['labelled_pictures']} picture(s) rated ({s['label_rows']} label(s)), "
             f"{s.get('comparisons', 0)} comparison(s)",
             f"model: {s['model'] or 'none'} — {quality}"
             + (f"; taste head on {'+'.join(s['head'].get('blocks', []))} (blend {s['head'].get('blend')})"
                if s.get("head", {}).get("used") else ""),
             "queues: " + ", ".join(f"{k} {v}" for k, v in q.items())]
    if "characters" in s:
        lines.append(format_characters(s["characters"]))
    if "unposted" in s:
        lines.append(f"unposted candidates: {s['unposted']}; posts: "
                     + (", ".join(f"{k} {v}" for k, v in sorted(s["posts"].items())) or "none"))
    src = s["sources"]
    lines.append(f"sources: {src['total']}, " + (f"UNHEALTHY: {', '.join(src['unhealthy'])}"
                                                 if src["unhealthy"] else "all healthy"))
    if s.get("loop_lag_ms"):
        lines.append(format_lag(s["loop_lag_ms"]))
    return lines


def format_lag(lag: dict) -> str:
    """The event-loop lag figures (``bot.health.LoopMonitor.figures``) as one line."""
    return (f"event loop lag: p50 {lag['p50']:g} ms, p99 {lag['p99']:g} ms, max {lag['max']:g} ms "
            f"(last {lag['window_s']:g} s, {lag['samples']} samples)")
