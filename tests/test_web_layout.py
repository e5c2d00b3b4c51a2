"""The gallery at phone and desktop width, in headless Chromium: every page fits the window (no
horizontal scroll), the Picture page opens with the picture in view, and the arrow keys scroll
the page wherever they have no other meaning (and never inside a text field)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from bot.manage import PAUSED_SOURCES
from storage import Store
from storage.boxes import Box
from tests.helpers import seed
from tests.test_web import web_config

WIDTHS = [(390, 844), (1366, 768)]           # a phone (iPhone 12-15) and a common laptop
LONG_SOURCE = "danbooru-hatsune_miku-solo-highres-absurdres-from-the-very-long-tag-query"
LONG_NAME = "Hatsune Miku (Project DIVA Future Tone, Sakura no Ame outfit)"
LONG_ERROR = ("HTTP 503 Service Unavailable from https://danbooru.donmai.us/posts.json?tags=hatsune_miku+solo"
              "+rating%3Ageneral+order%3Aid_desc&limit=200&page=b1234567890: the server is down for maintenance,"
              "retrying_after_backoff_with_a_token_that_has_no_spaces_at_all_0123456789abcdef0123456789abcdef")
LONG_TIME = "2026-11-23T16:04:00.123456+00:00"


def plot(width: int, height: int) -> bytes:
    """A wide PNG like the evaluation plots."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (250, 250, 250)).save(buf, "PNG")
    return buf.getvalue()


def realistic_gallery(tmp_path):
    """A config and database with what stretches a layout: long source, character and model
    names, long errors and times, many faces, many labels, plots, a paused and an unhealthy source."""
    cfg = web_config(tmp_path)
    specs = [{"popularity": 10 - i, "faces": 6 if i == 0 else 1 + i % 3,
              "tags": ["a_very_long_booru_tag_name_without_any_spaces_in_it_at_all", "1girl", "solo"]}
             for i in range(12)]
    specs[1]["size"], specs[2]["size"] = (400, 900), (1500, 500)     # a portrait and a panorama
    ids = seed(cfg, specs, source=LONG_SOURCE)
    with Store.open(cfg.db_path) as store:
        miku = store.character_id(LONG_NAME, create=True)
        for image_id in ids[:4]:
            for face in store.faces_of(image_id):
                store.name_face(face["id"], miku, origin="gallery")
        for k, image_id in enumerate(ids[:8]):    # four rated, four rated then taken back
            store.add_label(image_id, 1 + k % 5, origin="web")
            store.add_label(image_id, 5 - k % 5, origin="discord", ref=f"message-{k}-{'x' * 60}")
        store.add_label(ids[0], 3, origin="import")
        for image_id in ids[4:8]:
            store.remove_label(image_id, origin="web", user="owner")
            store.remove_label(image_id, origin="discord", user="owner", ref=f"message-{ids.index(image_id)}-{'x' * 60}")
        store.add_comparison(ids[8], ids[9], origin="gallery")
        store.propose_boxes(ids[1], [Box(40, 60, 200, 260, origin="animeface,lbp,own:" + "v" * 40, sure=True),
                                     Box(300, 700, 400, 900, origin="haar", confidence=0.2)],
                            proposed_by="animeface+lbp+haar+own:" + "v" * 40, certainty=0.2)  # a portrait's boxes
        for name, kind, url in [(LONG_SOURCE + "-2", "rss", "https://example.org/" + "feed/" * 20 + "rss.xml"),
                                ("inbox-on-the-nas", "folder", None), ("x", "bluesky", None)]:
            sid = store.upsert_source(name, kind, {"enabled": True, "interval": 900,
                                                   "options": {"url": url} if url else {}}, origin="cli")
            for _ in range(4 if name != "x" else 0):
                store.source_polled(sid, error=LONG_ERROR, next_poll_at=LONG_TIME)
        store.set_setting(PAUSED_SOURCES, ["inbox-on-the-nas"])
        first = store.active_model()
        for n in range(4):
            version = f"resnet18-20261123-16040{n}-with-a-long-suffix-{n}"
            store.register_model(version, first["arch"], first["path"], data_size=977 + n, activate=n == 3,
                                 metrics={"val": {"pearson": 0.61, "spearman": 0.58, "mae": 0.71, "rmse": 0.93,
                                                  "topk_precision": 0.4, "n": 196},
                                          "head": {"used": True, "blocks": ["layer3", "layer4", "pooled-features"],
                                                   "faces_train": 1234, "pairs": 56, "blend": 0.5},
                                          "network_version": first["version"]})
            (cfg.eval_path / version).mkdir(parents=True)
            for name, size in [("by_rating.png", (1400, 500)), ("calibration.png", (900, 900))]:
                (cfg.eval_path / version / name).write_bytes(plot(*size))
        for n in range(2):
            version = f"identity-resnet18-20261123-16040{n}"
            store.register_identity_model(
                version, "resnet18", f"{version}.pt", data_size=321, threshold=0.52, activate=n == 1,
                metrics={"val_top1": 0.93, "val": {"top1": 0.93, "threshold": 0.52, "n": 40},
                         "open_set": {"precision": 0.87, "recall": 0.51, "f1": 0.643},
                         "per_character": {LONG_NAME: 1.0, "Kagamine Rin": 0.5}})
    return cfg, ids


OVERFLOW = """() => {
  const w = window.innerWidth, out = [];
  for (const el of document.body.querySelectorAll("*")) {
    if (el.closest("svg, datalist, script")) continue;
    const r = el.getBoundingClientRect();
    if (r.width && r.height && (r.right > w + 1 || r.left < -1))
      out.push(`${el.tagName.toLowerCase()}.${el.className} ${Math.round(r.left)}..${Math.round(r.right)}`);
  }
  return {scrollWidth: document.documentElement.scrollWidth, innerWidth: w, outside: out.slice(0, 5)};
}"""

# keydown's default prevented, as the window (after every page handler) sees it
WATCH_KEYS = "() => window.addEventListener('keydown', (e) => { window.prevented = e.defaultPrevented; })"


async def arrow_down_scrolls(page) -> bool:
    """ArrowDown with the focus on the page scrolls it down (and no handler prevents that)."""
    await page.evaluate("() => { document.activeElement.blur(); window.scrollTo(0, 0); }")
    await page.evaluate(WATCH_KEYS)
    await page.keyboard.press("ArrowDown")
    await page.wait_for_function("() => window.scrollY > 0", timeout=3000)
    return not await page.evaluate("window.prevented")


@pytest.mark.slow
async def test_every_page_fits_a_phone_and_a_desktop_and_the_keys_scroll_it(tmp_path, browser, live_gallery):
    cfg, ids = realistic_gallery(tmp_path)
    pages = {"for-you": "", "rated": "rated", "picture": f"picture/{ids[0]}", "picture-portrait": f"picture/{ids[1]}",
             "picture-panorama": f"picture/{ids[2]}", "picture-rated": f"picture/{ids[4]}",
             "compare": "compare", "boxes": "boxes", "sources": "sources", "model": "model", "sources-message":
             "sources?message=" + "not+added:+" + LONG_ERROR.replace(" ", "+"), "not-found": "picture/999999",
             "no-route": "characters"}
    shots = Path(os.environ.get("SHOTS_DIR") or tmp_path / "shots")    # every page at both widths
    shots.mkdir(parents=True, exist_ok=True)
    url = await live_gallery(cfg)
    problems = []
    for width, height in WIDTHS:
        page = await browser.new_page(viewport={"width": width, "height": height})
        for name, path in pages.items():
            await page.goto(url + path)
            await page.wait_for_load_state("networkidle")
            await page.screenshot(path=str(shots / f"{name}-{width}.png"), full_page=True)
            fit = await page.evaluate(OVERFLOW)
            if fit["scrollWidth"] > fit["innerWidth"] or fit["outside"]:
                problems.append(f"{name} at {width} px: {fit}")
            if name.startswith("picture"):   # opened with the picture in view, top to bottom
                await page.screenshot(path=str(shots / f"{name}-{width}-opened.png"))
                box = await page.locator("#full").bounding_box()
                scroll = await page.evaluate("window.scrollY")
                if scroll or box["y"] < 0 or box["y"] + box["height"] > height + 1:
                    problems.append(f"{name} at {width} px: picture {box} not in view (scrollY {scroll})")
        await page.close()
    assert not problems, "\n".join(problems)
    # The arrow keys scroll every page but Compare (where ↓ skips); the focus in a text
    # field keeps them (and 1-5) for the field.
    page = await browser.new_page(viewport={"width": 390, "height": 844})
    for path in ["", "rated", f"picture/{ids[0]}", "sources", "model", "boxes"]:
        await page.goto(url + path)
        assert await arrow_down_scrolls(page), f"/{path}: ArrowDown was prevented"
    await page.goto(url + f"picture/{ids[0]}")       # the picture's keys: 1-5 rate it
    await page.keyboard.press("5")
    await page.wait_for_selector("strong.current:has-text('5')")
    await page.goto(url)
    cards = page.locator("article.card")
    assert await cards.nth(0).evaluate("c => c.classList.contains('focused')")
    assert await page.evaluate("window.scrollY") == 0      # the first card is focused in place
    await page.keyboard.press("ArrowRight")
    assert await cards.nth(1).evaluate("c => c.classList.contains('focused')")
    field = page.locator("form.filters input[name=character]")
    await field.click()
    await page.evaluate(WATCH_KEYS)
    for key in ["ArrowDown", "ArrowRight", "ArrowLeft", "3"]:
        await page.keyboard.press(key)
        assert not await page.evaluate("window.prevented"), key
    assert await field.input_value() == "3"
    assert await cards.nth(1).evaluate("c => c.classList.contains('focused') && !c.classList.contains('rated')")
    await page.goto(url + "sources")
    await page.locator("form.add input[name=options]").click()
    await page.evaluate(WATCH_KEYS)
    await page.keyboard.press("ArrowDown")
    assert not await page.evaluate("window.prevented")
