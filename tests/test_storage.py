import asyncio
import io
import sqlite3

import pytest
from PIL import Image

from storage import AsyncStore, Store, open_db
from storage.db import SCHEMA_VERSION, StorageError, migrations
from storage.media import BadImage, decode_image, inspect, media_relpath, store_media
from storage.records import Face
from storage.store import NewItem
from tests.helpers import make_read_only, open_folder, picture, unprivileged


def test_open_creates_schema_with_wal_and_foreign_keys(tmp_path):
    db = open_db(tmp_path / "a" / "t.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    for table in ("sources", "images", "faces", "predictions", "labels", "posts", "models", "settings"):
        assert db[table].exists(), table
    assert [m.name for m in migrations.applied(db)] == ["m001_initial", "m002_labels_by_time", "m003_discord",
                                                  "m004_characters", "m005_character_tags",
                                                  "m006_comparisons", "m007_features", "m008_media_pruned",
                                                  "m009_detector_boxes", "m010_kept_ranking", "m011_detector_version",
                                                  "m012_box_skips"]
    db.close()
    db = open_db(tmp_path / "a" / "t.db")  # reopening applies nothing twice
    assert len(migrations.applied(db)) == SCHEMA_VERSION == 12


def test_save_poll_is_idempotent_and_stores_cursor(tmp_path):
    store = Store.open(tmp_path / "t.db")
    sid = store.upsert_source("s", "rss", {"interval": 60})
    items = [NewItem(external_id="a", media_url="http://x/a.jpg", tags=["t1"], rating="general"),
             NewItem(external_id="b", media_url="http://x/b.jpg")]
    assert len(store.save_poll(sid, items, {"last": 2})) == 2
    assert store.save_poll(sid, items, {"last": 3}) == []
    row = store.get_source("s")
    assert row["cursor"] == {"last": 3} and row["items_fetched"] == 2
    assert store.get_image(1)["tags"] == ["t1"]
    # the same external id from another source is another item
    other = store.upsert_source("o", "rss", {})
    assert len(store.save_poll(other, items[:1], {})) == 1


def test_record_download_links_exact_and_near_duplicates(tmp_path):
    store = Store.open(tmp_path / "t.db")
    sid = store.upsert_source("s", "folder", {})
    ids = store.save_poll(sid, [NewItem(external_id=str(i)) for i in range(4)], {})
    data = picture(1, size=(200, 200))
    info, im = inspect(data)
    assert store.record_download(ids[0], info, "x.jpg") == ("downloaded", None)
    assert store.record_download(ids[1], info, "x.jpg") == ("duplicate", ids[0])
    # the same picture re-encoded: other bytes, same perceptual hash
    buf = io.BytesIO()
    im.save(buf, "PNG")
    near, _ = inspect(buf.getvalue())
    assert near.sha256 != info.sha256
    assert store.record_download(ids[2], near, "y.png") == ("near_duplicate", ids[0])
    different, _ = inspect(picture(99, size=(200, 200)))
    assert store.record_download(ids[3], different, "z.jpg", near_distance=4) == ("downloaded", None)


def test_record_analysis_replaces_faces_and_keeps_model_version(tmp_path):
    store = Store.open(tmp_path / "t.db")
    store.register_model("m1", "resnet18", "m1.pt", activate=True)
    sid = store.upsert_source("s", "folder", {})
    (iid,) = store.save_poll(sid, [NewItem(external_id="1")], {})
    faces = [Face(0, 0, 10, 10, 0.9, "animeface", 3.5, 0.1), Face(5, 5, 20, 20, 0.8, "animeface", 4.5, 0.2)]
    store.record_analysis(iid, faces, 4.5, 0.2, "m1")
    store.record_analysis(iid, faces, 4.5, 0.2, "m1")  # rescoring does not duplicate
    assert len(store.faces_of(iid)) == 2
    assert sorted(f["score"] for f in store.faces_of(iid)) == [3.5, 4.5]
    img = store.get_image(iid)
    assert img["status"] == "scored" and img["score"] == 4.5 and img["model_version"] == "m1"
    preds = store.execute("SELECT * FROM predictions WHERE image_id = ?", [iid])
    assert len(preds) == 3 and {p["model_version"] for p in preds} == {"m1"}


def test_mark_failed_retries_transient_errors_then_gives_up(tmp_path):
    store = Store.open(tmp_path / "t.db")
    sid = store.upsert_source("s", "rss", {})
    (iid,) = store.save_poll(sid, [NewItem(external_id="1", media_url="http://x")], {})
    assert store.mark_failed(iid, "timeout", retry=True) == "pending"
    assert store.mark_failed(iid, "timeout", retry=True) == "pending"
    assert store.mark_failed(iid, "timeout", retry=True) == "failed"
    assert store.get_image(iid)["error"] == "timeout"


def test_source_health_counts_failures(tmp_path):
    store = Store.open(tmp_path / "t.db")
    sid = store.upsert_source("s", "rss", {})
    assert store.source_polled(sid, error="boom", next_poll_at=None, unhealthy_after=2)["healthy"] == 1
    row = store.source_polled(sid, error="boom again", next_poll_at=None, unhealthy_after=2)
    assert row["healthy"] == 0 and row["failures"] == 2 and row["last_error"] == "boom again"
    row = store.source_polled(sid, error=None, next_poll_at=None)
    assert row["healthy"] == 1 and row["failures"] == 0 and row["last_error"] is None


async def test_async_store_serialises_concurrent_writes(tmp_path):
    store = await AsyncStore(tmp_path / "t.db").open()
    sid = await store.upsert_source("s", "rss", {})
    batches = [[NewItem(external_id=f"{b}-{i}") for i in range(20)] for b in range(10)]
    results = await asyncio.gather(*[store.save_poll(sid, batch, {"b": n}) for n, batch in enumerate(batches)])
    assert sum(len(r) for r in results) == 200
    assert (await store.execute("SELECT COUNT(*) AS n FROM images"))[0]["n"] == 200
    await store.close()


def test_read_only_database_gives_clear_error():
    def open_and_write():
        try:
            Store.open(path).upsert_source("s", "rss", {})
        except StorageError as e:
            return f"StorageError: {e}"
        return "opened and written"

    with open_folder() as folder:
        path = folder / "t.db"
        Store.open(path).close()
        make_read_only(folder)
        outcome = unprivileged(open_and_write)  # as root: in a child process that is not root
    assert outcome.startswith("StorageError: ") and "read-only" in outcome, outcome
    assert "attempt to write a readonly database" in outcome


def test_damaged_database_gives_clear_error(tmp_path):
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="not a tastefeed database or damaged"):
        Store.open(path)


def test_locked_database_write_fails_cleanly_and_keeps_data(tmp_path):
    path = tmp_path / "t.db"
    store = Store.open(path)
    sid = store.upsert_source("s", "rss", {})
    store.save_poll(sid, [NewItem(external_id="1")], {})
    store.db.execute("PRAGMA busy_timeout = 100")
    other = sqlite3.connect(path)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.save_poll(sid, [NewItem(external_id="2")], {})
    other.rollback()
    other.close()
    assert [r["external_id"] for r in store.execute("SELECT external_id FROM images")] == ["1"]
    assert len(store.save_poll(sid, [NewItem(external_id="2")], {})) == 1


# ---- media -------------------------------------------------------------------------------
def test_media_is_stored_once_by_hash(tmp_path):
    data = picture(3)
    info, _ = inspect(data)
    rel = store_media(tmp_path, data, info)
    assert rel == media_relpath(info.sha256, "jpeg") and rel.endswith(".jpg")
    assert store_media(tmp_path, data, info) == rel
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].read_bytes() == data


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (b"", "empty file"),
    (b"<!DOCTYPE html><html><body>Not found</body></html>", "HTML"),
    (b"just some text", "unknown format"),
    (picture(1)[:400], "corrupt or truncated jpeg"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "corrupt or truncated png"),
])
def test_bad_pictures_are_refused_with_a_reason(data, message):
    with pytest.raises(BadImage, match=message):
        decode_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(BadImage, match="too large"):
        decode_image(_bomb(), max_pixels=10_000_000)


def test_transparent_and_palette_pictures_become_rgb():
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(buf, "PNG")
    im = decode_image(buf.getvalue())
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)
    buf = io.BytesIO()
    Image.new("P", (20, 20)).save(buf, "GIF")
    assert decode_image(buf.getvalue()).mode == "RGB"


def test_a_picture_claimed_by_an_import_keeps_the_imports_analysis(tmp_path):
    """The daemon's scorer records only while the picture is still 'downloaded': once an import
    claimed it (the same bytes, fetched by the daemon first), the import's crop face stands."""
    from storage.records import CROP, DOWNLOADED, Face
    store = Store.open(tmp_path / "t.db")
    store.register_model("m1", "resnet18", "m1.pt", activate=True)
    sid = store.upsert_source("s", "folder", {})
    (image_id,) = store.save_poll(sid, [NewItem("a", local_path="/x.png")], {})
    store.db.execute("UPDATE images SET status = 'downloaded' WHERE id = ?", [image_id])
    assert store.claim_for_import(image_id)
    store.record_analysis(image_id, [Face.whole(10, 10, CROP).scored(3.0, 0.1)], 3.0, 0.1, "m1")
    detected = [Face(1, 1, 5, 5, 0.9, "animeface", 4.0, 0.2)]
    assert not store.record_analysis(image_id, detected, 4.0, 0.2, "m1", expect=DOWNLOADED)
    assert [f["detector"] for f in store.faces_of(image_id)] == [CROP]
    assert store.get_image(image_id)["status"] == "scored"
    assert not store.claim_for_import(image_id)   # analysed: nothing left to claim
    store.close()


def test_decode_on_device_gives_pillows_pixels_and_refuses_what_pillow_refuses():
    """The GPU path's decoding (run here on the CPU device): JPEGs decoded together, other
    formats through Pillow, each bad picture refused alone with Pillow's reason."""
    import io

    import numpy as np
    import torch

    from storage.media import BadImage, decode_image, decode_on_device

    def encoded(seed, size, fmt):
        buf = io.BytesIO()
        rnd = np.random.default_rng(seed)
        Image.fromarray(rnd.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, fmt)
        return buf.getvalue()

    good = [encoded(1, (120, 80), "JPEG"), encoded(2, (64, 96), "JPEG"), encoded(3, (50, 40), "PNG")]
    truncated = good[0][:len(good[0]) // 2]
    huge = encoded(4, (300, 300), "JPEG")
    out = decode_on_device([good[0], truncated, good[1], b"\xff\xd8\xffgarbage", good[2], huge],
                           torch.device("cpu"), max_pixels=200 * 200)
    for data, t in zip(good, (out[0], out[2], out[4])):
        assert t.dtype == torch.uint8 and t.device.type == "cpu"
        assert np.array_equal(t.permute(1, 2, 0).numpy(), np.asarray(decode_image(data)))
    assert isinstance(out[1], BadImage) and "truncated" in str(out[1])
    assert isinstance(out[3], BadImage)
    assert isinstance(out[5], BadImage) and "too large (300x300 pixels" in str(out[5])


def test_decode_on_device_refuses_a_jpeg_whose_header_is_a_decompression_bomb():
    """A stored JPEG whose header claims more pixels than Pillow's bomb guard allows (a corrupt
    or replaced file) is one BadImage, as decode_image says, not an error that fails the
    daemon's whole batch (and is met again at every retry)."""
    import io
    import struct

    import torch

    from storage.media import BadImage, decode_image, decode_on_device

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, "JPEG")
    good = buf.getvalue()
    bomb = bytearray(good)
    at = bomb.index(b"\xff\xc0")                               # SOF0: length, precision, height, width
    bomb[at + 5:at + 9] = struct.pack(">HH", 15000, 15000)     # 225 megapixels claimed
    bomb = bytes(bomb)
    with pytest.raises(BadImage, match="too large") as pillow:
        decode_image(bomb, max_pixels=10**9)
    out = decode_on_device([bomb, good], torch.device("cpu"), max_pixels=10**9)
    assert isinstance(out[0], BadImage) and str(out[0]) == str(pillow.value)
    assert out[1].shape == (3, 48, 64)


def test_fingerprinting_alone_decodes_a_jpeg_at_a_reduced_scale_with_the_same_checks():
    """The download stage only fingerprints a picture: a JPEG is decoded at a reduced scale (far
    less CPU), its size is still the picture's own, its perceptual hash stays within the
    near-duplicate distance of the full decode's, and a truncated file is refused all the same."""
    import numpy as np

    from storage.media import PHASH_DRAFT

    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((2000, 1500), Image.BICUBIC)
    buf = io.BytesIO()
    smooth.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    full, im = inspect(data)
    quick, none = inspect(data, picture=False)
    assert im.size == (2000, 1500) and none is None
    assert (quick.width, quick.height, quick.sha256, quick.format) == (full.width, full.height, full.sha256, "jpeg")
    assert bin(int(full.phash, 16) ^ int(quick.phash, 16)).count("1") <= 2
    assert max(decode_image(data, draft=PHASH_DRAFT).size) < 2000 // 2          # decoded smaller
    with pytest.raises(BadImage, match="truncated"):
        inspect(data[:len(data) * 9 // 10], picture=False)
    png = io.BytesIO()
    smooth.save(png, "PNG")
    assert inspect(png.getvalue(), picture=False)[0].phash == inspect(png.getvalue())[0].phash   # PNG: full
