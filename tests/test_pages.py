"""The Sources and Model pages as a person meets them: errors that look like errors, short times,
"Poll now", "Reload", what each metric means, a training run's progress, "Train now", and plots
in the gallery's dark style."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from matplotlib.colors import to_rgb
from PIL import Image

from bot.daemon import Daemon
from bot.retrain import Retrainer
from bot.web import relative_time
from scorer.evaluate import dark_style, plot_evaluation, plot_figures
from scorer.progress import FILE, TrainProgress, read_progress
from scorer.registry import ensure_active_model
from storage import Store
from tests.helpers import make_config, seed, wait_for

SHOTS = Path(os.environ.get("TASTEFEED_SHOTS", "")) if os.environ.get("TASTEFEED_SHOTS") else None


def same_origin(client) -> dict:
    return {"Origin": f"http://127.0.0.1:{client.port}"}


# ---- Sources -----------------------------------------------------------------------------------
async def test_a_refused_add_is_an_error_that_keeps_what_was_typed_and_kind_defaults_to_folder(tmp_path, gallery):
    cfg = make_config(tmp_path)
    client = await gallery(cfg)
    html = await (await client.get("/sources")).text()
    assert "<option selected>folder</option>" in html and "<option selected>bluesky" not in html
    resp = await client.post("/sources/add", data={"name": "bad", "kind": "rss", "options": "interval=600"},
                             headers=same_origin(client))
    html = await resp.text()
    assert resp.status == 400
    assert re.search(r'<p class="message error" role="alert">not added: [^<]*url', html)
    assert 'name="name" required value="bad"' in html and "<option selected>rss</option>" in html
    assert 'value="interval=600"' in html
    assert Store.open(cfg.db_path).get_source("bad") is None
    # A success is a plain message, and the form is empty again.
    resp = await client.post("/sources/add", data={"name": "feed", "kind": "rss",
                                                   "options": "url=http://127.0.0.1:9/f.xml"},
                             headers=same_origin(client))
    html = await resp.text()
    assert '<p class="message" role="status">added source feed' in html and "message error" not in html
    assert 'name="name" required value=""' in html
    # Other refusals are errors too.
    html = await (await client.post("/sources/inbox/remove", headers=same_origin(client))).text()
    assert re.search(r'<p class="message error" role="alert">not removed: source &#39;inbox&#39; is defined', html)


def test_times_are_short_and_relative():
    now = datetime(2025, 5, 1, 12, 0, tzinfo=timezone.utc)
    at = lambda **kw: (now + timedelta(**kw)).isoformat()  # noqa: E731
    assert relative_time(at(minutes=2, seconds=5), now) == "in 2 min"
    assert relative_time(at(hours=-3, minutes=-10), now) == "3 h ago"
    assert relative_time(at(seconds=-40), now) == "40 s ago"
    assert relative_time(at(days=2), now) == "in 2 d"
    assert relative_time(at(seconds=1), now) == "now"
    assert relative_time(None, now) == relative_time("garbage", now) == "-"
    # a next poll already past is due, not "9 d ago"
    assert relative_time(at(days=-9), now, due=True) == relative_time(at(seconds=2), now, due=True) == "due now"
    assert relative_time(at(minutes=3), now, due=True) == "in 3 min"


async def test_a_paused_source_shows_paused_instead_of_a_next_poll_and_times_carry_their_iso(tmp_path, gallery):
    cfg = make_config(tmp_path)
    store = Store.open(cfg.db_path)
    sid = store.upsert_source("feed", "rss", {"interval": 600, "options": {"url": "http://127.0.0.1:9/"}},
                              origin="cli")
    later = (datetime.now(timezone.utc) + timedelta(minutes=10, seconds=30)).isoformat()
    store.source_polled(sid, error=None, next_poll_at=later)
    client = await gallery(cfg)
    html = await (await client.get("/sources")).text()
    row = re.search(r"<td>feed</td>.*?</tr>", html, re.S).group(0)
    assert f'<time datetime="{later}" title="{later}">in 10 min</time>' in row
    assert re.search(r'<time datetime="[^"]+" title="[^"]+">(now|\d+ s ago)</time>', row)  # last poll
    await client.post("/sources/feed/pause", headers=same_origin(client))
    row = re.search(r"<td>feed</td>.*?</tr>", await (await client.get("/sources")).text(), re.S).group(0)
    assert '<td class="when next">paused</td>' in row and later not in row


def test_sources_list_says_paused_instead_of_a_next_poll(tmp_path):
    from bot.manage import pause_source, source_lines
    cfg = make_config(tmp_path)
    with Store.open(cfg.db_path) as store:
        sid = store.upsert_source("feed", "rss", {"interval": 600, "options": {}}, origin="cli")
        store.source_polled(sid, error=None, next_poll_at="2099-01-01T00:00:00+00:00")
        assert "next 2099-01-01" in source_lines(store)[0]
        pause_source(store, "feed", True)
        [line] = source_lines(store)
    assert line.endswith("next paused") and "2099" not in line


async def booru(serve, state: dict) -> str:
    """A Danbooru /posts.json that fails with 503 while ``state["down"]``, else answers no posts."""
    async def posts(request):
        state["hits"] += 1
        return web.Response(status=503) if state["down"] else web.json_response([])
    app = web.Application()
    app.router.add_get("/posts.json", posts)
    base = await serve(app)
    return f'\n[[sources]]\nname = "down"\nkind = "booru"\nurl = "{base}"\ninterval = 0.5\n'


async def post(daemon: Daemon, path: str, **kw) -> tuple[int, dict | str]:
    """POST to the running daemon's gallery from its own origin; JSON when asked for."""
    origin = daemon.gallery_url.rstrip("/")
    async with aiohttp.ClientSession() as http:
        async with http.post(origin + path, headers={"Origin": origin, **kw.pop("headers", {})}, **kw) as resp:
            return resp.status, (await resp.json() if resp.content_type == "application/json" else await resp.text())


async def test_poll_now_resets_the_backoff_and_a_fixed_source_is_healthy_at_once(tmp_path, serve):
    state = {"down": True, "hits": 0}
    cfg = make_config(tmp_path, await booru(serve, state), unhealthy_after=1)
    daemon = Daemon(cfg)
    await daemon.start()
    json_only = {"Accept": "application/json"}
    try:
        async def unhealthy():
            row = await daemon.store.get_source("down")
            return not row["healthy"]
        await wait_for(unhealthy)
        with Store.open(cfg.db_path) as store, store.db.conn:   # as after a long run of failures
            store.db.execute("UPDATE sources SET failures = 6 WHERE name = 'down'")
        # Still broken: the failure is recorded, its backoff starts again from the first step.
        status, answer = await post(daemon, "/sources/down/poll", headers=json_only)
        assert status == 200 and answer["ok"] is False and "server error 503" in answer["message"]
        assert int(re.search(r"next try in (\d+)s", answer["message"]).group(1)) <= 12
        row = await daemon.store.get_source("down")
        assert row["failures"] == 1 and not row["healthy"]
        # Fixed: Poll now makes it healthy at once, though its backoff had not run out.
        state["down"] = False
        hits = state["hits"]
        status, answer = await post(daemon, "/sources/down/poll", headers=json_only)
        assert answer == {"ok": True, "message": "polled down: 0 new item(s)"}
        assert state["hits"] == hits + 1
        row = await daemon.store.get_source("down")
        assert row["healthy"] and row["failures"] == 0 and row["last_error"] is None
        next_at = datetime.fromisoformat(row["next_poll_at"]) - datetime.now(timezone.utc)
        assert next_at.total_seconds() < 2                      # one interval away, not the backoff
        # From the page (no script): the outcome is shown on the Sources page, in its style.
        state["down"] = True
        status, html = await post(daemon, "/sources/down/poll")
        assert '<p class="message error" role="alert">poll of down failed: server error 503' in html
        assert "/sources/down/poll" in html                     # the button is there
        await daemon.poller.refresh_sources()
        status, answer = await post(daemon, "/sources/down/pause", headers=json_only)
        status, answer = await post(daemon, "/sources/down/poll", headers=json_only)
        assert answer == {"ok": False, "message": "poll of down failed: source down is paused: resume it first"}
    finally:
        await daemon.stop()


def _edit_config(cfg, old: str, new: str) -> None:
    path = Path(cfg.path)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


async def test_reload_applies_sources_and_allow_private_and_names_what_needs_a_restart(tmp_path):
    cfg = make_config(tmp_path)
    daemon = Daemon(cfg)
    await daemon.start()
    json_only = {"Accept": "application/json"}
    try:
        assert not daemon.http.policy.ip_allowed("10.1.2.3")
        _edit_config(cfg, 'allow_private = ["127.0.0.1"]', 'allow_private = ["127.0.0.1", "10.0.0.0/8"]')
        _edit_config(cfg, "batch_size = 8", "batch_size = 16")
        Path(cfg.path).write_text(Path(cfg.path).read_text() + f'\n[[sources]]\nname = "more"\nkind = "folder"\n'
                                  f'path = "{tmp_path / "more"}"\n')
        async with aiohttp.ClientSession() as http:
            page = await (await http.get(daemon.gallery_url + "sources")).text()
        assert "The file changed since it was read." in page
        status, answer = await post(daemon, "/sources/reload", headers=json_only)
        assert answer["ok"] and answer["restart"] == ["scorer.batch_size"]
        assert "download.allow_private; sources added: more" in answer["message"]
        assert "a restart is needed to apply scorer.batch_size" in answer["message"]
        assert daemon.http.policy.ip_allowed("10.1.2.3") and cfg.download.allow_private[-1] == "10.0.0.0/8"
        assert (await daemon.store.get_source("more"))["origin"] == "config" and "more" in daemon.poller.sources
        assert cfg.scorer.batch_size == 8                       # read at start only
        async with aiohttp.ClientSession() as http:
            page = await (await http.get(daemon.gallery_url + "sources")).text()
        assert "A restart is needed to apply scorer.batch_size" in page and "changed since it was read" not in page
        # A mistake in the file changes nothing.
        _edit_config(cfg, "batch_size = 16", 'batch_size = "many"')
        status, answer = await post(daemon, "/sources/reload", headers=json_only)
        assert answer["ok"] is False and answer["message"].startswith("not reloaded: ")
        assert "scorer.batch_size" in answer["message"] and "more" in daemon.poller.sources
    finally:
        await daemon.stop()


async def test_a_narrower_allow_private_refuses_the_next_request_at_once(serve):
    from sources import SourceError
    from sources.http import Http
    async def hello(request):
        return web.Response(text="hi")
    app = web.Application()
    app.router.add_get("/", hello)
    port = (await serve(app)).rsplit(":", 1)[1]
    async with Http(allow_private=["localhost"], timeout=5) as http:
        assert (await http.get(f"http://localhost:{port}/")).body == b"hi"   # a kept-alive connection
        http.set_allow_private([])
        with pytest.raises(SourceError, match="refused address|private"):
            await http.get(f"http://localhost:{port}/")


async def test_sighup_reloads_the_config(tmp_path):
    cfg = make_config(tmp_path)
    daemon = Daemon(cfg)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.started.wait(), 60)
        Path(cfg.path).write_text(Path(cfg.path).read_text() + f'\n[[sources]]\nname = "hup"\nkind = "folder"\n'
                                  f'path = "{tmp_path / "hup"}"\n')
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: daemon.store.get_source("hup"))
        assert "hup" in daemon.poller.sources
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 30)


async def test_without_a_daemon_the_pages_say_how_config_changes_apply(tmp_path, gallery):
    cfg = make_config(tmp_path)
    html = await (await (await gallery(cfg)).get("/sources")).text()
    assert "/sources/inbox/poll" not in html and "/sources/reload" not in html   # no daemon to ask
    assert "other keys after a restart" in html


# ---- Model -------------------------------------------------------------------------------------
async def test_model_page_explains_each_metric_with_the_base_rate(tmp_path, gallery):
    cfg = make_config(tmp_path)
    store = Store.open(cfg.db_path)
    first = ensure_active_model(store, cfg.scorer, cfg.models_path)
    store.register_model("v2", first["arch"], first["path"], activate=True, metrics={"val": {
        "pearson": 0.61, "spearman": 0.58, "mae": 0.7, "rmse": 0.9, "topk_precision": 0.75, "topk": 4,
        "liked_share": 0.35, "n": 40}})
    html = await (await (await gallery(cfg)).get("/model")).text()
    for name in ("Pearson", "Spearman", "MAE", "RMSE", "top-10% precision", "validation pictures"):
        assert re.search(rf"<dt>{re.escape(name)}</dt><dd>[^<]{{20,}}</dd>", html), name
    assert "of the 4 picture(s) the model ranks highest, the share you rated 4 or 5" in html
    assert "a random pick gets the base rate, 0.35" in html
    assert re.search(r'<td class="when"><time datetime="[^"]+" title="[^"]+">(now|\d+ s ago)</time></td>', html)


async def test_evaluate_now_without_a_trained_model_says_what_to_do(tmp_path, gallery):
    cfg = make_config(tmp_path)
    with Store.open(cfg.db_path) as store:
        version = ensure_active_model(store, cfg.scorer, cfg.models_path)["version"]
    client = await gallery(cfg)
    html = await (await client.post("/model/evaluate", data={"version": version}, headers=same_origin(client))).text()
    assert (f'<p class="message error" role="alert">{version} is not trained, so there is nothing to evaluate: '
            "rate at least 50 pictures (you have 0), then press Train now") in html
    assert "0 validation picture" not in html
    assert "Not trained yet: 0 rating(s) of the 50 training needs" in re.sub(r"\s+", " ", html)


async def test_training_progress_shows_while_a_run_goes_and_how_the_last_one_ended(tmp_path, gallery):
    cfg = make_config(tmp_path)
    client = await gallery(cfg)
    run = TrainProgress(cfg.data_path, "full")
    html = await (await client.get("/model")).text()
    assert "Training (the network and the taste head) in progress:\n  starting" in html
    run.epoch(1, 12, 20.0)
    run.epoch(2, 12, 22.0)
    html = await (await client.get("/model")).text()
    assert re.search(r'<p class="message running" data-refresh="10">.*epoch 2 of 12, about 4 min left', html, re.S)
    run.finish(False, "only 3 labelled picture(s) with faces; training needs 50")
    html = await (await client.get("/model")).text()
    assert re.search(r'<p class="last-run failed">Last training run \(full\),\s+failed now: only 3 labelled', html)
    assert "data-refresh" not in html
    # A run that was killed part way: its process is gone.
    data = json.loads((cfg.data_path / FILE).read_text())
    (cfg.data_path / FILE).write_text(json.dumps(dict(data, state="running", pid=2 ** 22 + 12345)))
    assert read_progress(cfg.data_path)["state"] == "stopped"
    assert "stopped before it finished" in await (await client.get("/model")).text()


def test_a_training_run_writes_its_epochs_and_its_end(tmp_path):
    import torch

    from scorer.model import build_model
    from scorer.train import TrainError, fit, train_from_store
    cfg = make_config(tmp_path, "\n[train]\nepochs = 2\nbatch_size = 4\nema = 0\n")
    run = TrainProgress(cfg.data_path, "full")
    seen = []
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    y = rng.uniform(1, 5, 8).astype(np.float32)
    fit(build_model("resnet18"), x, y, x[:4], y[:4], cfg.train, torch.device("cpu"), progress=False,
        on_epoch=lambda *a: (seen.append(read_progress(cfg.data_path)["epoch"]), run.epoch(*a)))
    assert seen == [None, 1] and read_progress(cfg.data_path)["epoch"] == 2
    with Store.open(cfg.db_path) as store, pytest.raises(TrainError):
        train_from_store(store, cfg.paths, cfg.scorer, cfg.train, margin=0.1, max_pixels=10 ** 8)
    done = read_progress(cfg.data_path)
    assert done["state"] == "failed" and done["kind"] == "head" and "only 0 labelled picture" in done["message"]


async def test_train_now_is_refused_with_too_few_ratings_and_needs_the_daemon(tmp_path, gallery):
    cfg = make_config(tmp_path)
    asked = []

    async def train_now():
        asked.append(1)
        return True
    client = await gallery(cfg, train_now=train_now)
    html = await (await client.get("/model")).text()
    assert '<form method="post" action="/model/train"><button type="submit"' in html
    html = await (await client.post("/model/train", headers=same_origin(client))).text()
    assert "not started: rate at least 50 pictures first (you have 0)" in html and not asked
    alone = await gallery(cfg)
    assert 'action="/model/train"' not in await (await alone.get("/model")).text()
    answer = await (await alone.post("/model/train", headers={**same_origin(alone), "Accept": "application/json"})).json()
    assert answer == {"ok": False, "message": "training from the gallery needs the running daemon; "
                                              "run `python main.py train --full`"}


FAKE_TRAIN = """
import sys, time
from scorer.progress import TrainProgress
run = TrainProgress(sys.argv[1], "full")
run.epoch(1, 4, 30.0)
time.sleep(float(sys.argv[2]))
run.finish(True, "model fake: promoted: first trained model")
"""


async def test_train_now_starts_a_run_in_the_daemons_retrainer_and_its_progress_shows(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, "\n[train]\nmin_labels = 1\nrefit = false\n")
    [image_id] = seed(cfg, [{"popularity": 1}])
    with Store.open(cfg.db_path) as store:
        store.add_label(image_id, 4, origin="web", user="owner")
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setattr(Retrainer, "command", lambda self: [sys.executable, str(script), str(cfg.data_path), "4"])
    daemon = Daemon(cfg)
    await daemon.start()
    json_only = {"Accept": "application/json"}
    try:
        status, answer = await post(daemon, "/model/train", headers=json_only)
        assert answer["ok"] and answer["message"].startswith("training started (train --full")
        assert daemon.models.retrainer.running
        await wait_for(lambda: asyncio.sleep(0, (read_progress(cfg.data_path) or {}).get("epoch") == 1))
        async with aiohttp.ClientSession() as http:
            html = await (await http.get(daemon.gallery_url + "model")).text()
        assert "epoch 1 of 4, about 2 min left" in html and 'action="/model/train"' not in html
        status, answer = await post(daemon, "/model/train", headers=json_only)
        assert answer == {"ok": False, "message": "a training run is going already: its progress is shown here"}
        await wait_for(lambda: asyncio.sleep(0, not daemon.models.retrainer.running), timeout=30)
        async with aiohttp.ClientSession() as http:
            html = await (await http.get(daemon.gallery_url + "model")).text()
        assert "Last training run (full),\n  finished now: model fake: promoted" in html
        assert 'action="/model/train"' in html
    finally:
        await daemon.stop()


# ---- plots -------------------------------------------------------------------------------------
def _ratings(n=80):
    rng = np.random.default_rng(1)
    true = rng.integers(1, 6, n).astype(float)
    return np.clip(true * 0.6 + 1.2 + rng.normal(0, 0.6, n), 1, 5), true


HISTORY = [{"epoch": e, "train_loss": 1.5 / e + 0.3, "val_loss": 1.2 / e + 0.5, "val_pearson": min(0.7, 0.1 * e)}
           for e in range(1, 13)]


def test_plots_are_dark_with_titles_and_legends_inside_and_off_the_curves(tmp_path):
    pred, true = _ratings()
    title = "resnet18-20250101-120000-a-long-version-name"
    paths = plot_evaluation(pred, true, HISTORY, tmp_path, title=title)
    assert [p.name for p in paths] == ["by_rating.png", "pred_vs_true.png", "learning_curve.png"]
    for path in paths:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            for corner in [(0, 0), (rgb.width - 1, rgb.height - 1)]:
                assert sum(rgb.getpixel(corner)) < 3 * 60, (path.name, rgb.getpixel(corner))
    with dark_style():
        figs = plot_figures(pred, true, HISTORY, title)
        for name, fig in figs.items():
            assert sum(fig.get_facecolor()[:3]) < 0.5, name
            fig.canvas.draw()
            box, renderer = fig.bbox, fig.canvas.get_renderer()

            def inside(extent, box=box):
                return (extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1 and extent.y0 >= box.y0 - 1
                        and extent.y1 <= box.y1 + 1)
            titles = [ax.title for ax in fig.axes if ax.get_title()]
            assert titles and any(title in t.get_text() for t in titles), name
            for t in titles:
                assert inside(t.get_window_extent(renderer)), (name, t.get_text())
                assert sum(to_rgb(t.get_color())) > 2.4, (name, t.get_color())      # light text
            for ax in fig.axes:   # what is drawn of each axes: ticks, labels, title
                assert inside(ax.get_tightbbox(renderer)), name
            for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
                assert inside(legend.get_window_extent(renderer)), name
                for ax in fig.axes:
                    assert not legend.get_window_extent().overlaps(ax.get_window_extent()), name


# ---- in a browser: screenshots at phone and desktop widths --------------------------------------
@pytest.mark.slow
async def test_in_a_browser_sources_and_model_at_390_and_1366_px(tmp_path, browser, live_gallery):
    shots = SHOTS or tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    cfg = make_config(tmp_path)
    store = Store.open(cfg.db_path)
    first = ensure_active_model(store, cfg.scorer, cfg.models_path)
    pred, true = _ratings()
    store.register_model("resnet18-20250501-120000", first["arch"], first["path"], activate=True, metrics={
        "val": {"pearson": 0.61, "spearman": 0.58, "mae": 0.7, "rmse": 0.9, "topk_precision": 0.75, "topk": 8,
                "liked_share": 0.35, "n": 80}, "history": HISTORY})
    plot_evaluation(pred, true, HISTORY, cfg.eval_path / "resnet18-20250501-120000", title="resnet18-20250501-120000")
    sid = store.upsert_source("artist-feed", "rss", {"interval": 600, "options": {"url": "https://example.org/f.xml"}},
                              origin="cli")
    store.source_polled(sid, error="server error 503 from https://example.org/f.xml", unhealthy_after=1,
                        next_poll_at=(datetime.now(timezone.utc) + timedelta(minutes=4)).isoformat())
    store.upsert_source("paused-one", "bluesky", {"interval": 900, "options": {"actor": "a.bsky.social"}}, origin="cli")
    store.set_setting("sources.paused", ["paused-one"])
    run = TrainProgress(cfg.data_path, "full")
    run.epoch(3, 12, 25.0)

    async def poll_now(name):
        return True, "0 new item(s)"

    async def yes():
        return True
    url = await live_gallery(cfg, poll_now=poll_now, reload=yes, train_now=yes,
                             live={"restart_needed": [], "config_read_at": 0})
    for width in (390, 1366):
        page = await browser.new_page(viewport={"width": width, "height": 900})
        await page.goto(url + "sources")
        await page.fill("form.add input[name=name]", "x")
        await page.select_option("form.add select", "rss")
        await page.click("form.add button")
        await page.wait_for_selector("p.message.error")
        assert await page.input_value("form.add input[name=name]") == "x"
        await page.screenshot(path=str(shots / f"sources-{width}.png"), full_page=True)
        await page.goto(url + "model")
        await page.wait_for_selector("p.message.running")
        await page.screenshot(path=str(shots / f"model-{width}.png"), full_page=True)
        await page.close()
    assert all((shots / f"{n}-{w}.png").stat().st_size > 5000 for n in ("sources", "model") for w in (390, 1366))
