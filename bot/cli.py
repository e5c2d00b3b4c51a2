"""tastefeed command line (``python main.py ...`` and the ``tastefeed`` console script).

    python main.py run                      start the daemon (no config needed)
    python main.py score PICTURE|DIR...     faces and scores of pictures (--json, --crops)
    python main.py sources list|add|remove|test
    python main.py doctor                   check config, database, detector, model, device
    python main.py status                   health of the running (or stopped) daemon (--json)
    python main.py import-labels DIR|CSV    import existing ratings or winner,loser comparisons (--crops for face crops)
    python main.py train                    train on all labels; promote if better
    python main.py eval                     metrics and plots of the active (or --model) model
    python main.py models list|use VERSION  the model registry; use = switch / roll back
    python main.py rescore                  rescore unposted pictures with the active model
    python main.py backup DEST [--media]    a consistent copy while the daemon runs
    python main.py restore SRC [--yes]      put a backup back (no daemon may run)
    python main.py export-labels FILE.csv   ratings as path,rating rows import-labels reads back
    python main.py prune [--dry-run]        apply the [storage] rules now: prune old media, trim thumbnails
    python main.py characters import|add|identify|train|eval|list|models|use|recognize   who is in the faces
    python main.py service install|uninstall|status   run the daemon as a systemd service (--system, --dry-run)

Each command is a ``cmd_*`` function. Errors meant for the user (each package's base error:
``ConfigError``, ``StorageError``, ``BadImage``, ``DetectorError``, ``ModelError``,
``TrainError``, ``SourceError``, ``ManageError``, ``ServiceError``) are caught in one place, :func:`main`, and
printed as one line, ``error: <message>``, on stderr. Exit codes:

    0    done
    1    the command failed (the message says why), ``doctor`` found a failing check, or
         ``status`` found the daemon failing or not running
    2    bad configuration or bad command-line arguments
    130  interrupted (Ctrl-C)
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from bot.config import ConfigError, load_config
from bot.logs import setup_logging
from scorer import threads


EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130  # see the module docstring


# Each package's base error (module, class name): its message is written for the user.
USER_ERRORS = {"storage.db": "StorageError", "storage.media": "BadImage", "sources": "SourceError",
               "scorer.detect": "DetectorError", "scorer.model": "ModelError", "scorer.train": "TrainError",
               "bot.manage": "ManageError", "bot.service": "ServiceError",
               "scorer.detector_train": "DetectorTrainError"}


def user_errors() -> tuple[type[Exception], ...]:
    """The user errors of the modules loaded: an error can only come from a loaded module, and
    importing the others first would cost seconds (torch) before a command that needs none."""
    classes = (getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS.items())
    return tuple(c for c in classes if isinstance(c, type))


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


@contextlib.contextmanager
def reading(cfg):
    """The store for a command that only looks: the database when there is one, else an empty
    one in memory, so that a look creates no data folder (the daemon's first run does)."""
    from storage import Store

    with Store.open(cfg.db_path if cfg.db_path.exists() else ":memory:") as store:
        yield store


# ---- run -------------------------------------------------------------------------------------
def cmd_run(cfg, args) -> int:
    from bot.daemon import Daemon
    from bot.memory import limit_arenas
    from storage.lock import DaemonRunning, daemon_pid

    limit_arenas()   # before the daemon's threads start (bot/memory.py)

    if (pid := daemon_pid(cfg.data_path)) is not None:   # say so before anything else is printed
        return _fail(f"{DaemonRunning(cfg.data_path, pid)}; stop it first (two daemons on one data folder "
                     "would post and score twice)")

    if cfg.log.file:  # the daemon's log also goes to a rotating file
        try:
            setup_logging(args.log_level or cfg.log.level, file=cfg.log.file, max_mb=cfg.log.max_mb,
                          keep=cfg.log.keep)
        except OSError as e:
            return _fail(f"log.file: cannot write {cfg.log.file}: {e.strerror or e}")

    async def main():
        daemon = Daemon(cfg)
        folders = [s.options["path"] for s in cfg.sources if s.kind == "folder" and s.enabled]
        print(f"tastefeed: data in {Path(cfg.data_dir).resolve()}", flush=True)
        for folder in folders:
            print(f"tastefeed: drop pictures into {Path(folder).resolve()}", flush=True)

        def announce(d):
            if d.gallery_url:
                print(f"tastefeed: gallery at {d.gallery_url}", flush=True)
            if d.discord is not None:
                print(f"tastefeed: posting to Discord channel {cfg.discord.channel_id}", flush=True)
            print("tastefeed: Ctrl-C to stop", flush=True)

        await daemon.run(announce)

    try:
        asyncio.run(main())
    except DaemonRunning as e:
        print(f"error: {e}; stop it first (two daemons on one data folder would post and score twice)",
              file=sys.stderr)
        return 1
    return 0


# ---- score ---------------------------------------------------------------------------------
def cmd_score(cfg, args) -> int:
    try:
        paths = picture_paths(args.paths)      # first: a missing file is said at once, before torch loads
    except ValueError as e:
        return _fail(str(e))
    from scorer.analyze import build_analyzer
    from scorer.ranking import is_trained
    from storage import Store

    if not cfg.db_path.exists():    # a look writes nothing: no data folder, no model file
        analyzer = build_analyzer(None, cfg.detector, cfg.scorer, cfg.paths)
        print(f"note: no database at {cfg.db_path} yet, so no model of your taste: scored by the untrained "
              f"{analyzer.scorer.version}, kept in memory (nothing is written)", file=sys.stderr)
        return _score(cfg, args, paths, analyzer, untrained_note(0, cfg.train.min_labels))
    with Store.open(cfg.db_path) as store:
        analyzer = build_analyzer(store, cfg.detector, cfg.scorer, cfg.paths)
        untrained = None if is_trained(store) else untrained_note(store.label_count(), cfg.train.min_labels)
        return _score(cfg, args, paths, analyzer, untrained)


def untrained_note(labels: int, min_labels: int) -> str:
    """What to do while no trained model is active, for ``labels`` ratings so far."""
    if labels < min_labels:
        return (f"rate at least {min_labels} pictures (you have {labels}), then run `python main.py train` "
                "(a running daemon trains by itself)")
    return f"{labels} pictures are rated: run `python main.py train`"


def picture_paths(args: list[str]) -> list[Path]:
    """The files named, a folder standing for the pictures in it and its subfolders (hidden ones
    left out); ValueError naming the first path that does not exist or a folder without pictures."""
    from sources.folder import PICTURE_SUFFIXES

    paths = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ValueError(f"{arg}: no pictures in this folder ({', '.join(sorted(PICTURE_SUFFIXES))})")
            paths += found
        elif path.exists():
            paths.append(path)
        else:
            raise ValueError(f"{arg}: no such file or folder")
    return paths


def _score(cfg, args, paths: list[Path], analyzer, untrained: str | None = None) -> int:
    """Score the pictures. With ``untrained`` (what to do, while the model is untrained) its
    scores mean nothing, so the text says "not trained yet" instead (``--json`` keeps them,
    with ``"trained": false``). The detector in use is named (bot/health.py ``detector_in_use``:
    the configured one's name or ``own:VERSION``): a line after the pictures, ``"detector"`` in
    each JSON entry; with ``--crops`` nothing is detected (``"detector": null``)."""
    from tqdm import tqdm

    from bot.health import detector_in_use
    from scorer.own_detector import PREFIX
    from storage.media import BadImage, decode_image
    from storage.records import CROP, Face

    trained = untrained is None
    detector = None if args.crops else detector_in_use(cfg)
    results, failures = [], 0
    bar = tqdm(paths, desc="scoring", unit="img", disable=len(paths) < 2 or not sys.stderr.isatty(),
               file=sys.stderr)
    for path in bar:
        try:
            im = decode_image(path.read_bytes(), max_pixels=cfg.download.max_pixels)
        except (OSError, BadImage) as e:
            failures += 1
            message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            results.append({"path": str(path), "error": message})
            if not args.json:
                tqdm.write(f"{path}: error: {message}", file=sys.stdout)
            continue
        # --crops: the picture is a face crop (as import-labels --crops takes it), not run through detection
        found = [[Face.whole(im.width, im.height, CROP)]] if args.crops else None
        res = analyzer.analyze([im], found)[0]
        entry = {"path": str(path), "model": analyzer.scorer.version, "detector": detector, "trained": trained,
                 **res.as_dict()}
        results.append(entry)
        if not args.json:
            kind = ("face crop" if args.crops else "no face" if res.whole or res.skipped
                    else f"{len(res.faces)} face(s)")
            lines = [f"{path}: {kind}, "
                     + ("skipped" if res.skipped else f"score {res.score:.2f}" if trained else "not trained yet")
                     + (" (whole picture)" if res.whole and not args.crops else "")]
            if not res.whole:
                for i, f in enumerate(res.faces, 1):
                    b = f
                    lines.append(f"  face {i}: box ({b.x1}, {b.y1}, {b.x2}, {b.y2}) confidence {b.confidence:.2f}"
                                 + (f" score {f.score:.2f}" if trained else ""))
            tqdm.write("\n".join(lines), file=sys.stdout)
    if args.json:
        print(json.dumps(results, indent=2))
        return 1 if failures and failures == len(paths) else 0
    if detector is not None and failures < len(paths):
        print(f"faces found by the detector {detector}"
              + (" (your own, `detector use`)" if detector.startswith(PREFIX) else " (configured in [detector])"))
    if not trained and failures < len(paths):
        print(f'The model is not trained yet, so its scores mean nothing (--json shows them, marked "trained": '
              f"false): {untrained}.")
    return 1 if failures and failures == len(paths) else 0


# ---- sources ---------------------------------------------------------------------------------
def cmd_sources(cfg, args) -> int:
    from bot.manage import add_source, parse_pairs, remove_source, source_lines, sync_config_sources
    from storage import Store

    # only add needs the database: until it exists, list, test and remove (of a source that cannot
    # be there yet) use a store in memory, so that they create no data folder
    with (Store.open(cfg.db_path) if args.action == "add" else reading(cfg)) as store:
        if args.action == "list":
            sync_config_sources(store, cfg)  # config sources are visible before the first run
            print("\n".join(source_lines(store)) or "no sources")
            return 0
        if args.action == "test":
            return asyncio.run(_test_source(cfg, store, args.name, args.limit))
        if args.action == "add":
            src = add_source(store, cfg, args.name, args.kind, parse_pairs(args.options))
            print(f"added source {src.name} ({src.kind}); a running daemon picks it up within 15s")
        else:
            remove_source(store, cfg, args.name)
            print(f"removed source {args.name} (pictures already fetched are kept)")
        return 0


async def _test_source(cfg, store, name, limit) -> int:
    from bot.config import build_source
    from sources.http import Http

    conf = next((s for s in cfg.sources if s.name == name), None)
    if conf is not None:
        kind, options, cursor = conf.kind, conf.options, {}
    else:
        row = store.get_source(name)
        if row is None:
            return _fail(f"no source named {name!r}")
        kind, options, cursor = row["kind"], row["config"].get("options", {}), {}
    async with Http.from_config(cfg.download) as http:
        source = build_source(name, kind, options, http)
        try:
            poll = await source.poll(cursor, limit)
        except Exception as e:  # noqa: BLE001
            return _fail(f"source {name}: {e}")
    print(f"source {name} ({source.describe()}): {len(poll.items)} item(s)" + (", more available" if poll.more else "")
          + (f"; this test used {poll.cursor['reads']} billed read(s)" if "reads" in poll.cursor else ""))
    for item in poll.items:
        print(f"  {item.external_id}: {item.media_url or item.local_path}"
              + (f"  by {item.author}" if item.author else "") + (f"  [{item.rating}]" if item.rating else "")
              + (f"  (not scored: {item.skip})" if item.skip else ""))
    return 0


# ---- doctor ----------------------------------------------------------------------------------
def cmd_doctor(cfg, args) -> int:
    with contextlib.ExitStack() as opened:
        checks = _doctor_checks(cfg, opened)
    width = max(len(name) for name, _, _ in checks)
    for name, ok, detail in checks:
        print(f"{name.ljust(width)}  {'OK  ' if ok else 'FAIL'}  {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def _schema_check(cfg) -> tuple[str, bool, str]:
    """The database's schema version and the migrations this release will apply to it (read
    before the database is opened, which applies them)."""
    from storage.db import SCHEMA_VERSION, open_db, schema_state

    if not cfg.db_path.exists():
        return "schema", True, f"no database yet: created at version {SCHEMA_VERSION} on first use"
    try:
        db = open_db(cfg.db_path, migrate=False)
        try:
            version, pending = schema_state(db)
        finally:
            db.conn.close()
    except Exception as e:  # noqa: BLE001
        return "schema", False, str(e)
    if not pending:
        return "schema", True, f"version {version}, up to date"
    return "schema", True, (f"version {version} of {SCHEMA_VERSION}; applying now, each in its own "
                            f"transaction: {', '.join(pending)}")


def _doctor_checks(cfg, opened: contextlib.ExitStack) -> list[tuple[str, bool, str]]:
    """(part, ok, detail) for each part; the database, once open, stays open in ``opened``."""
    from PIL import Image

    checks: list[tuple[str, bool, str]] = [("config", True, cfg.path or "embedded defaults")]
    store = None
    checks.append(_schema_check(cfg))
    fresh = not cfg.db_path.exists()    # nothing is created: the daemon's first run does that
    try:
        if fresh:
            store = opened.enter_context(reading(cfg))
            checks.append(("database", *_creatable(cfg.db_path, "the first run creates it")))
        else:
            from storage import Store
            store = opened.enter_context(Store.open(cfg.db_path))
            store.db.execute("CREATE TABLE IF NOT EXISTS _doctor (x)")
            store.db.execute("DROP TABLE _doctor")
            counts = store.status_counts()
            checks.append(("database", True, f"{cfg.db_path} ({sum(counts.values())} pictures)"))
    except Exception as e:  # noqa: BLE001
        checks.append(("database", False, str(e)))
    if cfg.media_path.is_dir():
        try:
            probe = cfg.media_path / ".doctor"
            probe.write_bytes(b"ok")
            probe.unlink()
            checks.append(("media folder", True, str(cfg.media_path)))
        except OSError as e:
            checks.append(("media folder", False, f"{cfg.media_path}: {e.strerror}"))
    else:
        checks.append(("media folder", *_creatable(cfg.media_path, "created on first use")))
    try:
        from scorer.detect import make_detector
        from scorer.own_detector import effective_detector, tag
        det = make_detector(effective_detector(cfg.detector, cfg.paths),
                            Path(tempfile.gettempdir()) / "tastefeed" if fresh else cfg.data_path)
        det.detect(Image.new("RGB", (64, 64), "white"))
        in_use = tag(cfg.paths, cfg.detector)
        checks.append(("detector", True, cfg.detector.name if not in_use.startswith("own:") else f"{in_use} (yolo; "
                       f"configured: {cfg.detector.name})"))
    except Exception as e:  # noqa: BLE001
        checks.append(("detector", False, str(e)))
    try:
        from scorer.model import pick_device
        checks.append(("device", True, str(pick_device(cfg.scorer.device))))
    except Exception as e:  # noqa: BLE001
        checks.append(("device", False, str(e)))
    if store is not None:
        try:
            from scorer.registry import ensure_active_model, load_scorer, untrained_scorer
            if fresh:
                scorer = untrained_scorer(cfg.scorer, margin=cfg.detector.margin)
                detail = f"no model yet: the first run creates the untrained {scorer.version}"
            else:
                row = ensure_active_model(store, cfg.scorer, cfg.models_path)
                scorer = load_scorer(row, cfg.scorer, cfg.models_path, margin=cfg.detector.margin)
                detail = f"{row['version']}{'' if row['metrics'] else ' (untrained)'}"
            scorer.predict([Image.new("RGB", (64, 64), "gray")])
            checks.append(("model", True, detail))
        except Exception as e:  # noqa: BLE001
            checks.append(("model", False, str(e)))
        for r in store.list_sources():
            if not r["healthy"]:
                checks.append((f"source {r['name']}", False, r["last_error"] or "unhealthy"))
    return checks


def _creatable(path: Path, when: str) -> tuple[bool, str]:
    """(ok, detail) for a file or folder not there yet: whether its nearest existing folder lets
    it be created."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return True, f"{path}: not there yet ({when})"
    return False, f"{path}: cannot be created ({parent} is not a writable folder)"


# ---- status ----------------------------------------------------------------------------------
def cmd_status(cfg, args) -> int:
    """The daemon's health (``bot.health``): 0 when it runs and is ok or degraded, else 1."""
    from bot.health import format_report, status_report

    report = status_report(cfg)
    print(json.dumps(report, indent=2) if args.json else "\n".join(format_report(report)))
    return 0 if report["running"] and report["status"] in ("ok", "degraded") else 1


# ---- learning loop ---------------------------------------------------------------------------
def cmd_import_labels(cfg, args) -> int:
    from scorer.analyze import build_analyzer
    from storage import Store
    from scorer.import_labels import (import_comparisons, import_labels, is_comparison_csv, read_comparison_rows,
                                      read_rating_rows)

    comparisons = is_comparison_csv(args.path)
    try:
        rows, problems = read_comparison_rows(args.path) if comparisons else read_rating_rows(args.path)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    if not rows:
        for problem in problems:
            print(problem, file=sys.stderr)
        return _fail(f"{args.path}: no {'comparisons' if comparisons else 'ratings'} to import")
    with Store.open(cfg.db_path) as store:
        try:
            store.import_source_id()
        except ValueError as e:
            return _fail(str(e))
        analyzer = build_analyzer(store, cfg.detector, cfg.scorer, cfg.paths)
        run = import_comparisons if comparisons else import_labels
        report = run(store, analyzer, rows, cfg.media_path, crops=args.crops,
                     max_pixels=cfg.download.max_pixels, batch_size=cfg.scorer.batch_size)
        report.add_read_problems(problems)
        for problem in report.lines():      # in line order: "skipped: FILE:LINE: why", "warning: ..."
            print(problem, file=sys.stderr)
        print(f"imported {args.path}: {report.summary()}")
        print(f"{store.label_count()} labelled picture(s) and {store.comparison_count()} comparison(s) in total; "
              "next: python main.py train")
    done = (report.comparisons_added + report.comparisons_unchanged if comparisons
            else report.labels_added + report.labels_unchanged)
    return 0 if done else 1


def cmd_train(cfg, args) -> int:
    from scorer.evaluate import format_metrics
    from scorer.registry import ensure_active_model
    from scorer.train import train_from_store, train_lock
    from storage import Store

    if args.epochs is not None and args.epochs <= 0:
        return _fail("--epochs: expected a positive number")
    if args.epochs is not None and not args.full:
        return _fail("--epochs applies to the network: use it with --full")
    threads.apply(cfg.scorer.threads)
    with Store.open(cfg.db_path) as store, train_lock(cfg.data_path):
        active = ensure_active_model(store, cfg.scorer, cfg.models_path)["version"]
        try:
            out = train_from_store(store, cfg.paths, cfg.scorer, cfg.train, margin=cfg.detector.margin,
                                   max_pixels=cfg.download.max_pixels, epochs=args.epochs,
                                   promote=not args.no_promote, icfg=cfg.characters, full=args.full)
        except KeyboardInterrupt:   # Ctrl-C: a model is registered and promoted in one transaction, at the end
            now = (store.active_model() or {}).get("version")
            print("interrupted; the active model is unchanged" if now == active else
                  f"interrupted; training had finished: {now} is the active model", file=sys.stderr)
            return EXIT_INTERRUPTED
    print(f"model {out.version}: {out.n_train} training and {out.n_val} validation pictures, "
          f"{out.seconds:.0f}s")
    print(f"  validation: {format_metrics(out.metrics)}")
    head = out.head or {}
    if head.get("used"):
        ident = head.get("identity") or {}
        blocks = ", ".join(head.get("blocks", []))
        print(f"  taste head on {blocks} (blend {head['blend']} with the network, {head.get('pairs', 0)} comparisons"
              + (f", identity embedder {ident['embedder']}" if ident.get("used") else "") + ")")
        print(f"  the network alone: {format_metrics(out.network)}")
    else:
        print(f"  no taste head: {head.get('reason', 'off')}")
    if out.baseline is not None:
        print(f"  active model {out.baseline_version}: {format_metrics(out.baseline)}")
    print(f"  {out.reason}")
    if out.promoted:
        print("  unposted pictures are rescored by a running daemon, or now with: python main.py rescore")
    return 0


def cmd_eval(cfg, args) -> int:
    from scorer.evaluate import evaluate_version, format_metrics
    from storage import Store

    if not cfg.db_path.exists():
        return _fail(f"no database at {cfg.db_path}: no model to evaluate yet (import ratings and train first: "
                     "python main.py import-labels DIR, then python main.py train)")
    with Store.open(cfg.db_path) as store:
        m, paths, row = evaluate_version(store, cfg.paths, cfg.scorer, cfg.train, args.model, args.out,
                                         margin=cfg.detector.margin, max_pixels=cfg.download.max_pixels)
    if not m["n"]:
        return _fail("no labelled validation pictures to evaluate on: import ratings first")
    print(f"model {row['version']}{' (active)' if row['active'] else ''} on the validation split:")
    print(f"  {format_metrics(m)}")
    for path in paths:
        print(f"  plot: {path}")
    if args.json:
        print(json.dumps({"version": row["version"], "metrics": m, "plots": [str(p) for p in paths]}))
    return 0


def cmd_models(cfg, args) -> int:
    from scorer.registry import use_model
    from storage import Store

    with (reading(cfg) if args.action == "list" else Store.open(cfg.db_path)) as store:
        if args.action == "list":
            rows = store.list_models()
            if not rows:
                print("no models yet: `python main.py run`, `import-labels` or `train` creates the first")
            for r in rows:
                m = json.loads(r["metrics"]) if r["metrics"] else {}
                val = m.get("val") or {}
                quality = ("untrained" if not m else
                           f"Pearson {val.get('pearson')}  MAE {val.get('mae')}  top-k {val.get('topk_precision')}")
                head = m.get("head") or {}
                if head.get("used"):
                    quality += f"  head on {'+'.join(head.get('blocks', []))} (blend {head['blend']})"
                if m.get("kind") == "head":
                    quality += f"  network of {m.get('network_version')}"
                print(f"{'*' if r['active'] else ' '} {r['version']}  {r['arch']}  {r['created_at'][:19]}  "
                      f"{r['data_size']} labels  {quality}")
                if r["notes"]:
                    print(f"    {r['notes']}")
            return 0
        row = use_model(store, cfg.scorer, cfg.models_path, args.version, margin=cfg.detector.margin)
        print(f"active model: {row['version']}; a running daemon switches within a minute and rescores "
              "unposted pictures (or run: python main.py rescore)")
        return 0


def cmd_rescore(cfg, args) -> int:
    from scorer.registry import ensure_active_model, load_scorer
    from scorer.rescore import rescore_all
    from storage import AsyncStore

    async def run():
        store = AsyncStore(cfg.db_path)
        try:
            await store.open()
            row = await store.call(ensure_active_model, cfg.scorer, cfg.models_path)
            scorer = await asyncio.to_thread(load_scorer, row, cfg.scorer, cfg.models_path, margin=cfg.detector.margin)
            n = await rescore_all(store, scorer, media_root=cfg.media_path, margin=cfg.detector.margin,
                                  how=cfg.scorer.aggregate, max_pixels=cfg.download.max_pixels,
                                  batch_size=cfg.scorer.batch_size, progress=None)
        finally:
            await store.close()
        return n, scorer

    n, scorer = asyncio.run(run())
    print(f"rescored {n} picture(s) with {scorer.version}")
    return 0


# ---- backups ---------------------------------------------------------------------------------
def cmd_backup(cfg, args) -> int:
    import time

    from storage.backup import backup

    started = time.monotonic()
    manifest = backup(cfg.paths, args.dest, media=args.media)
    print(f"backed up {Path(cfg.data_dir).resolve()} to {Path(args.dest).resolve()} "
          f"in {time.monotonic() - started:.1f}s: {manifest.summary()}")
    print("  the copy of the database passed PRAGMA integrity_check")
    return 0


def cmd_restore(cfg, args) -> int:
    import sqlite3

    from storage.backup import check_backup, counts, restore
    from storage.lock import daemon_pid

    pid = daemon_pid(cfg.data_path)
    if pid is not None:
        return _fail(f"a tastefeed daemon (pid {pid}) is running on {cfg.data_path.resolve()}: "
                     "stop it before restoring")
    manifest = check_backup(args.src)
    print(f"backup of {manifest.created_at[:19]} (tastefeed {manifest.tastefeed_version}): {manifest.summary()}")
    if cfg.db_path.exists() and not args.yes:
        try:
            images, labels, _ = counts(cfg.db_path)
            held = f"{images} picture(s), {labels} labelled"
        except sqlite3.Error as e:
            held = f"unreadable: {e}"
        current = f"the database in {cfg.data_path.resolve()} ({held})"
        if not sys.stdin.isatty():
            return _fail(f"replacing {current} needs --yes (it is kept as tastefeed.db.before-restore-<time>)")
        if input(f"replace {current}? it is kept as tastefeed.db.before-restore-<time> [y/N] "
                 ).strip().lower() not in ("y", "yes"):
            print("nothing restored")
            return 1
    report = restore(cfg.paths, args.src, manifest=manifest)
    print(f"restored {Path(args.src).resolve()} into {cfg.data_path.resolve()}: the database, "
          f"{report.models.count} model file(s), {report.media.count} media file(s) copied")
    if report.kept_as is not None:
        print(f"  the previous database is kept as {report.kept_as}")
    return 0


def cmd_export_labels(cfg, args) -> int:
    from storage import Store
    from storage.export import export_labels

    if not cfg.db_path.exists():
        return _fail(f"no database at {cfg.db_path}: nothing to export")
    with Store.open(cfg.db_path) as store:
        report = export_labels(store, cfg.media_path, args.path, all_labels=args.all, copy=args.copy,
                               comparisons_path=args.comparisons)
    for message in report.problems:
        print(f"left out: {message}", file=sys.stderr)
    print(f"exported {report.summary()} to {args.path}" + (f" and {args.comparisons}" if args.comparisons else "")
          + f"; import with: python main.py import-labels {args.path}")
    return 0


# ---- disk ------------------------------------------------------------------------------------
def cmd_prune(cfg, args) -> int:
    """Apply the ``[storage]`` rules by hand (``storage/prune.py``); beside a running daemon too."""
    from bot.disk import run_prune

    report = run_prune(cfg, dry_run=args.dry_run) if cfg.db_path.exists() else None   # none: nothing is created
    rules = []
    if cfg.storage.max_media_gb > 0:
        rules.append(f"storage.max_media_gb {cfg.storage.max_media_gb:g}")
    if cfg.storage.keep_days > 0:
        rules.append(f"storage.keep_days {cfg.storage.keep_days:g}")
    print(report.summary() if report else f"nothing to prune: no database at {cfg.db_path} yet")
    if not rules:
        print("media is never pruned: set storage.max_media_gb or storage.keep_days "
              f"(thumbnails are kept within storage.max_thumbs_mb {cfg.storage.max_thumbs_mb:g})")
    elif report and report.over_limit:
        print(f"still over storage.max_media_gb {cfg.storage.max_media_gb:g}: the rest is rated, compared, "
              "posted, named, box-verified or not scored yet, and is never pruned")
    return 0


# ---- characters ------------------------------------------------------------------------------
def cmd_characters(cfg, args) -> int:
    from storage import Store
    from storage.characters import CharacterNameError

    with (reading(cfg) if args.action in ("list", "models") else Store.open(cfg.db_path)) as store:
        try:
            return _CHARACTER_ACTIONS[args.action](cfg, args, store)
        except CharacterNameError as e:
            return _fail(str(e))


def _embedder(cfg, store):
    """The active identity embedder (the untrained one is created, and said so, if none)."""
    from scorer.characters import ensure_active_embedder, load_embedder, untrained

    row = ensure_active_embedder(store, cfg.characters, cfg.models_path)
    if untrained(row):
        print(f"note: no trained identity embedder yet, using the untrained {row['version']}; "
              "run `python main.py characters train` once faces are named", file=sys.stderr)
    return row, load_embedder(row, cfg.characters, cfg.models_path)


def _name_pictures(cfg, args, store, rows, origin) -> int:
    from scorer.analyze import build_analyzer
    from scorer.characters import name_pictures

    try:
        store.import_source_id()
    except ValueError as e:
        return _fail(str(e))
    analyzer = build_analyzer(store, cfg.detector, cfg.scorer, cfg.paths)
    _, embedder = _embedder(cfg, store)
    report = name_pictures(store, analyzer, embedder, rows, cfg.media_path, origin=origin, crops=args.crops,
                           max_pixels=cfg.download.max_pixels, batch_size=cfg.scorer.batch_size)
    for message in report.problems:
        print(f"skipped: {message}", file=sys.stderr)
    print(report.summary())
    if not report.named:
        return _fail("no face was named" + (": " + report.problems[0] if len(report.problems) == 1 else ""))
    return 0


def _characters_import(cfg, args, store) -> int:
    from scorer.characters import read_character_folder

    try:
        rows = read_character_folder(args.path)
    except ValueError as e:
        return _fail(str(e))
    return _name_pictures(cfg, args, store, rows, "import")


def _characters_add(cfg, args, store) -> int:
    from storage.characters import check_name

    name = check_name(args.name)
    return _name_pictures(cfg, args, store, [(name, Path(p)) for p in args.pictures], "enrol")


def _characters_identify(cfg, args, store) -> int:
    from scorer.characters import build_recognizer, identify_pictures
    from scorer.detect import make_detector

    row, embedder = _embedder(cfg, store)
    recognizer = build_recognizer(store, row, cfg.characters)
    if not len(recognizer):
        print("note: no character is enrolled yet: every face is unknown "
              "(python main.py characters import DIR, or characters add NAME PICTURE...)", file=sys.stderr)
    from scorer.own_detector import effective_detector
    detector = None if args.crops else make_detector(effective_detector(cfg.detector, cfg.paths), cfg.data_path)
    results = identify_pictures([Path(p) for p in args.pictures], detector, embedder, recognizer,
                                store.character_names(), margin=cfg.detector.margin, crops=args.crops,
                                max_pixels=cfg.download.max_pixels)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: error: {r['error']}")
            elif not r["faces"]:
                print(f"{r['path']}: no face found (use --crops if the picture is a face crop)")
            for i, f in enumerate(r.get("faces", []), 1):
                who = f["character"] if f["character"] is not None else "unknown"
                print(f"{r['path']}: face {i} {tuple(f['box'])}: {who} (similarity {f['similarity']:.2f})")
    failed = sum(1 for r in results if "error" in r)
    return 1 if failed and failed == len(results) else 0


def _characters_list(cfg, args, store) -> int:
    rows = store.list_characters()
    if not rows:
        print("no characters yet: python main.py characters import DIR, or characters add NAME PICTURE...")
        return 0
    active = store.active_identity_model()
    per = (json.loads(active["metrics"]) if active and active["metrics"] else {}).get("per_character") or {}
    for r in rows:
        weak = f" ({r['weak']} weak)" if r["weak"] else ""
        acc = per.get(r["name"])
        accuracy = f"{acc['accuracy']:.2f} of {acc['n']}" if acc else "-"
        print(f"{r['name']}  {r['examples']} example(s){weak}  validation accuracy {accuracy}")
    return 0


def _characters_eval(cfg, args, store) -> int:
    from scorer.identity_eval import EvalError, evaluate_identity

    try:
        ev = evaluate_identity(store, cfg.paths, cfg.characters, margin=cfg.detector.margin,
                               max_pixels=cfg.download.max_pixels, version=args.model, out_dir=args.out)
    except EvalError as e:
        return _fail(str(e))
    m, closed, op = ev.metrics, ev.metrics["closed_set"], ev.metrics["open_set"]
    print(f"identity embedder {ev.version}: {m['n_val']} validation faces of {m['characters']} characters, "
          f"{m['n_enrolled']} enrolled")
    print(f"  closed set: top-1 {closed['top1']:.3f} (n={closed['n']})")
    rejected = "n/a" if op["unknown_rejected"] is None else f"{op['unknown_rejected']:.3f}"
    print(f"  open set, characters held out as unknown in {op['folds']} folds (threshold {op['threshold']:.3f} "
          f"from the {op['threshold_from']}):")
    print(f"    precision {op['precision']:.3f}  recall {op['recall']:.3f}  F1 {op['f1']:.3f}  "
          f"unknown rejected {rejected}")
    width = max(len("character"), *(len(n) for n in m["per_character"]))
    print(f"  {'character'.ljust(width)}  faces  accuracy")
    for name, v in sorted(m["per_character"].items(), key=lambda kv: (-kv[1]["n"], kv[0])):
        print(f"  {name.ljust(width)}  {v['n']:5d}  {v['accuracy']:.3f}")
    for path in ev.plots:
        print(f"  plot: {path}")
    print(f"  metrics: {ev.metrics_path}")
    if not ev.stored:
        print("note: the untrained embedder's figures are not stored (train one: python main.py characters train)",
              file=sys.stderr)
    return 0


def _characters_train(cfg, args, store) -> int:
    from scorer.characters import ensure_active_embedder
    from scorer.identity_train import train_identity
    from scorer.train import train_lock

    if args.epochs is not None and args.epochs <= 0:
        return _fail("--epochs: expected a positive number")
    threads.apply(cfg.scorer.threads)
    with train_lock(cfg.data_path):
        ensure_active_embedder(store, cfg.characters, cfg.models_path)
        out = train_identity(store, cfg.paths, cfg.characters, margin=cfg.detector.margin,
                             max_pixels=cfg.download.max_pixels, epochs=args.epochs, promote=not args.no_promote)
    print(f"identity model {out.version}: {out.n_train} training and {out.n_val} validation faces of "
          f"{out.n_characters} character(s), {out.seconds:.0f}s")
    print(f"  validation top-1 {out.metrics['val_top1']:.3f}; unknown below similarity {out.threshold:.3f}")
    print(f"  {out.reason}")
    return 0


def _characters_models(cfg, args, store) -> int:
    rows = store.list_identity_models()
    if not rows:
        print("no identity embedders yet: `characters import`, `add` or `identify` creates the first")
    for r in rows:
        m = json.loads(r["metrics"]) if r["metrics"] else {}
        quality = (f"validation top-1 {m.get('val_top1')}  threshold {r['threshold']}  {m.get('characters')} characters"
                   if m else "untrained")
        print(f"{'*' if r['active'] else ' '} {r['version']}  {r['arch']}  {r['created_at'][:19]}  "
              f"{r['data_size']} faces  {quality}")
    return 0


def _characters_use(cfg, args, store) -> int:
    from scorer.characters import use_embedder
    from scorer.model import ModelError

    try:
        use_embedder(store, cfg.characters, cfg.models_path, cfg.media_path, args.version,
                     margin=cfg.detector.margin, max_pixels=cfg.download.max_pixels)
    except ModelError as e:
        return _fail(str(e))
    print(f"active identity embedder: {args.version}; a running daemon identifies the stored faces with it "
          "in the background (or run: python main.py characters recognize)")
    return 0


def _characters_recognize(cfg, args, store) -> int:
    from bot.recognition import Recognition
    from storage import AsyncStore

    if not store.enrolment_stamp()[0]:
        return _fail("no face is named yet, so there is no one to recognise "
                     "(python main.py characters import DIR, or characters add NAME PICTURE...)")

    async def run():
        astore = AsyncStore(cfg.db_path)
        try:
            await astore.open()
            recognition = Recognition(cfg, astore, asyncio.Event(), {"identified": 0})
            await recognition.current()        # as the daemon: named faces first, then the rest
            for task in recognition.running():
                await task
            return recognition.stats["identified"], recognition.embedder.version
        finally:
            await astore.close()

    n, version = asyncio.run(run())
    print(f"identified {n} stored face(s) with {version}")
    return 0


# ---- service ---------------------------------------------------------------------------------
def cmd_service(cfg, args) -> int:
    from bot import service

    if args.action == "status":
        return service.status(cfg, system=args.system)
    action = service.install if args.action == "install" else service.uninstall
    return action(cfg, system=args.system, dry_run=args.dry_run)


# ---- detector: the owner's own YOLO face detector ----------------------------------------------
def cmd_detector(cfg, args) -> int:
    if args.action == "bootstrap":
        from scorer.bootstrap import cli_bootstrap
        return cli_bootstrap(cfg, args)
    from scorer import detector_train
    return {"train": detector_train.cli_train, "eval": detector_train.cli_eval, "use": detector_train.cli_use,
            "list": detector_train.cli_list}[args.action](cfg, args)


_CHARACTER_ACTIONS = {"import": _characters_import, "add": _characters_add, "identify": _characters_identify,
                      "list": _characters_list, "train": _characters_train, "models": _characters_models,
                      "use": _characters_use, "recognize": _characters_recognize,
                      "eval": _characters_eval}


# ---- entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tastefeed", description="Personal image recommendation bot.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the daemon: poll sources, download, detect, score")
    sc = sub.add_parser("score", help="print faces and scores of pictures (a folder: the pictures in it)")
    sc.add_argument("paths", nargs="+", metavar="PICTURE_OR_DIR")
    sc.add_argument("--json", action="store_true", help="print JSON")
    sc.add_argument("--crops", action="store_true",
                    help="the pictures are face crops: skip detection, the whole picture is the face")
    so = sub.add_parser("sources", help="list, add, remove or test sources")
    so_sub = so.add_subparsers(dest="action", required=True)
    so_sub.add_parser("list", help="sources with health, last/next poll and last error")
    add = so_sub.add_parser("add", help="add a source: NAME KIND key=value ...")
    add.add_argument("name")
    add.add_argument("kind")
    add.add_argument("options", nargs="*", metavar="key=value")
    rm = so_sub.add_parser("remove", help="remove a source added with 'sources add'")
    rm.add_argument("name")
    te = so_sub.add_parser("test", help="poll a source once and print what it would fetch")
    te.add_argument("name")
    te.add_argument("--limit", type=int, default=20)
    sub.add_parser("doctor", help="check config, database, detector, model and device")
    st = sub.add_parser("status", help="health of the daemon: running or not, queues, sources, disk "
                        "(its /healthz, or the database when it is stopped)")
    st.add_argument("--json", action="store_true", help="print JSON")
    il = sub.add_parser("import-labels", help="import ratings: a folder with subfolders 1..5, or a path,rating CSV; "
                        "or comparisons: a CSV whose header is winner,loser")
    il.add_argument("path", metavar="DIR_OR_CSV")
    il.add_argument("--crops", action="store_true",
                    help="the pictures are face crops: skip detection, the whole picture is the face")
    tr = sub.add_parser("train", help="fit the taste head on all labels (seconds; --full: train the network "
                        "too, minutes); the new model is used only if it is better")
    tr.add_argument("--full", action="store_true", help="also train the network on the labelled crops (slow; "
                    "what train.schedule runs)")
    tr.add_argument("--epochs", type=int, help="override train.epochs (with --full)")
    tr.add_argument("--no-promote", action="store_true", help="register the model but do not use it")
    ev = sub.add_parser("eval", help="metrics and plots of a model on the validation split")
    ev.add_argument("--model", metavar="VERSION", help="default: the active model")
    ev.add_argument("--out", metavar="DIR", help="plot folder (default: <data>/eval/<version>)")
    ev.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    mo = sub.add_parser("models", help="list models, or switch to one (rollback)")
    mo_sub = mo.add_subparsers(dest="action", required=True)
    mo_sub.add_parser("list", help="every model with its metrics; * marks the active one")
    use = mo_sub.add_parser("use", help="make VERSION the active model")
    use.add_argument("version")
    sub.add_parser("rescore", help="rescore unposted pictures with the active model")
    bk = sub.add_parser("backup", help="copy the database and model files (--media: the pictures too) into DEST, "
                        "while the daemon runs")
    bk.add_argument("dest", metavar="DEST", help="a new folder (or an empty one)")
    bk.add_argument("--media", action="store_true", help="also copy the media files (data/media)")
    rs = sub.add_parser("restore", help="put a backup back (refused while a daemon runs on the data folder)")
    rs.add_argument("src", metavar="SRC", help="a folder written by backup")
    rs.add_argument("--yes", action="store_true", help="replace the current database without asking "
                    "(it is kept as tastefeed.db.before-restore-<time>)")
    ex = sub.add_parser("export-labels", help="write the ratings as a path,rating CSV that import-labels reads back")
    ex.add_argument("path", metavar="FILE.csv")
    ex.add_argument("--all", action="store_true", help="every rating not taken back, oldest first "
                    "(default: each picture's current rating)")
    ex.add_argument("--copy", action="store_true", help="copy the pictures into FILE-pictures/ beside the CSV "
                    "and name them relative to it (default: the media files' absolute paths)")
    ex.add_argument("--comparisons", metavar="PAIRS.csv", help="also write the comparisons as winner,loser rows")

    pr = sub.add_parser("prune", help="prune the media of old, unrated, unposted pictures and trim the thumbnail "
                        "cache, as [storage] says")
    pr.add_argument("--dry-run", action="store_true", help="change nothing; say what would be freed")
    ch = sub.add_parser("characters", help="name characters, train the identity embedder, identify faces")
    ch_sub = ch.add_subparsers(dest="action", required=True)
    ci = ch_sub.add_parser("import", help="name faces from DIR/<character name>/<pictures>")
    ci.add_argument("path", metavar="DIR")
    ca = ch_sub.add_parser("add", help="enrol examples of a character (no retraining needed)")
    ca.add_argument("name")
    ca.add_argument("pictures", nargs="+", metavar="PICTURE")
    cid = ch_sub.add_parser("identify", help="who is in each face of the pictures")
    cid.add_argument("pictures", nargs="+", metavar="PICTURE")
    cid.add_argument("--json", action="store_true", help="print JSON")
    for action in (ci, ca, cid):
        action.add_argument("--crops", action="store_true",
                            help="the pictures are face crops: skip detection, the whole picture is the face")
    ct = ch_sub.add_parser("train", help="train the identity embedder on the named faces; promote if better")
    ct.add_argument("--epochs", type=int, help="override characters.epochs")
    ct.add_argument("--no-promote", action="store_true", help="register the embedder but do not use it")
    ch_sub.add_parser("list", help="characters, their example counts and validation accuracy")
    ce = ch_sub.add_parser("eval", help="closed- and open-set metrics and plots of the identity embedder")
    ce.add_argument("--model", metavar="VERSION", help="default: the active identity embedder")
    ce.add_argument("--out", metavar="DIR", help="plot folder (default: <data>/eval/<version>)")
    ch_sub.add_parser("models", help="the identity embedders with their metrics; * marks the active one")
    cu = ch_sub.add_parser("use", help="make VERSION the active identity embedder (rollback)")
    cu.add_argument("version")
    ch_sub.add_parser("recognize", help="identify every stored face now (a running daemon does it in the background)")
    de = sub.add_parser("detector", help="grow a YOLO face detector of your own: propose boxes, train, evaluate, use")
    de_sub = de.add_subparsers(dest="action", required=True)
    db_ = de_sub.add_parser("bootstrap", help="propose face boxes on stored pictures with the detectors at hand, "
                                              "for checking in the gallery's Boxes page")
    db_.add_argument("--limit", type=int, default=200, help="pictures to propose boxes for (default 200)")
    dt = de_sub.add_parser("train", help="train a YOLO detector on the verified boxes (no download)")
    dt.add_argument("--epochs", type=int, default=None, help="training epochs (default: 50)")
    dt.add_argument("--model", default="yolov8n.yaml", help="ultralytics model yaml: yolov8n.yaml (the default), "
                                                            "yolo11n.yaml")
    dt.add_argument("--imgsz", type=int, default=640, help="training picture size in pixels (default: 640)")
    de_sub.add_parser("eval", help="compare the trained detector with the bootstrap detectors on held-out "
                                   "verified pictures; writes a precision-recall plot")
    du = de_sub.add_parser("use", help="switch the detector in use to VERSION ('config': the configured one)")
    du.add_argument("version")
    du.add_argument("--force", action="store_true", help="use a version even though it found almost no face right "
                                                         "on the held-out pictures")
    de_sub.add_parser("list", help="trained detectors with their metrics; * marks the one in use")
    sv = sub.add_parser("service", help="run the daemon as a systemd service: install, uninstall, status")
    sv_sub = sv.add_subparsers(dest="action", required=True)
    for name, text in (("install", "write the unit and start the service (a user service unless --system)"),
                       ("uninstall", "stop the service and remove its unit (the secrets file is kept)"),
                       ("status", "systemctl status and the last log lines of the service")):
        action = sv_sub.add_parser(name, help=text)
        action.add_argument("--system", action="store_true",
                            help="a system service (/etc/systemd/system, needs root) running as you")
        if name != "status":
            action.add_argument("--dry-run", action="store_true", help="print what would be written and run")
    _add_global_options(p)
    return p


def _add_global_options(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--config`` and ``--log-level`` on ``parser`` and every command under it, so that they
    work before the command and after it (``score --config c.toml x.jpg``). Below the top they
    default to nothing set, so that a value given before the command stands."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--config", default=default,
                        help="config file (default: ./config.toml if present, else built-in defaults)")
    parser.add_argument("--log-level", default=default, help="override log.level (DEBUG, INFO, WARNING, ERROR)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _add_global_options(command, top=False)


COMMANDS = {"run": cmd_run, "score": cmd_score, "sources": cmd_sources, "doctor": cmd_doctor, "status": cmd_status,
            "import-labels": cmd_import_labels, "train": cmd_train, "eval": cmd_eval, "models": cmd_models,
            "rescore": cmd_rescore, "prune": cmd_prune, "characters": cmd_characters, "service": cmd_service,
            "detector": cmd_detector,
            "backup": cmd_backup, "restore": cmd_restore, "export-labels": cmd_export_labels}


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (see the module docstring). Bad arguments exit 2."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        setup_logging(args.log_level or cfg.log.level)
        threads.prepare(cfg.scorer.threads)   # before torch is imported; children inherit it
        return COMMANDS[args.command](cfg, args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`... | head`): nothing more to say, and nothing to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)
    except Exception as e:
        if isinstance(e, user_errors()):
            return _fail(str(e), EXIT_FAILED)
        raise


if __name__ == "__main__":
    sys.exit(main())
