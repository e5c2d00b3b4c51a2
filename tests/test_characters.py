"""Characters: names and examples in storage, the identity embedder and recognizer, and the
``characters`` commands (import, add, identify, list)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from storage import Store
from storage.characters import CharacterNameError, check_name
from storage.media import inspect, store_media
from storage.records import CROP, Face
from tests.helpers import picture


def _face(store, media, seed: int) -> int:
    """A stored picture with one crop face; its face id."""
    data = picture(seed)
    info, _ = inspect(data)
    image_id = store.add_imported_image(store.import_source_id(), f"p{seed}.jpg", info,
                                        store_media(media, data, info))
    store.record_analysis(image_id, [Face.whole(info.width, info.height, CROP).scored(3.0, None)], 3.0, None, "m")
    return store.faces_of(image_id)[0]["id"]


# ---- storage ---------------------------------------------------------------------------------
def test_names_are_validated_with_one_line():
    assert check_name("  Hatsune Miku ") == "Hatsune Miku"
    assert check_name("ミク 🎤") == "ミク 🎤"
    for bad, why in [("", "empty"), ("   ", "empty"), ("a/b", "slashes"), ("a\\b", "slashes"),
                     ("a\nb", "control"), ("x" * 101, "too long")]:
        with pytest.raises(CharacterNameError, match=why) as e:
            check_name(bad)
        assert "\n" not in str(e.value)
        assert isinstance(e.value, ValueError)


def test_characters_names_embeddings_identities_round_trip(tmp_path):
    with Store.open(tmp_path / "t.db") as store:
        store.register_model("m", "resnet18", "m.pt", activate=True)
        f1, f2, f3 = (_face(store, tmp_path / "media", s) for s in (1, 2, 3))
        miku = store.character_id("Miku", create=True)
        assert store.character_id("Miku") == miku and store.character_id("Rin") is None
        rin = store.character_id("Rin 🍊", create=True)
        store.name_face(f1, miku, origin="import")
        store.name_face(f2, miku, origin="booru", weak=True)
        store.name_face(f3, rin, origin="enrol")
        store.name_face(f3, rin, origin="gallery")       # renaming replaces
        with pytest.raises(ValueError, match="origin"):
            store.name_face(f1, miku, origin="guess")
        assert store.face_name(f3)["origin"] == "gallery"
        listed = {r["name"]: (r["examples"], r["weak"]) for r in store.list_characters()}
        assert listed == {"Miku": (2, 1), "Rin 🍊": (1, 0)}
        assert len(store.named_faces()) == 3 and len(store.named_faces(include_weak=False)) == 2

        v = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
        store.save_embeddings("e1", {f1: v[0], f2: v[1], f3: v[2]})
        got = store.embeddings("e1")
        assert set(got) == {f1, f2, f3} and got[f1].dtype == np.float32
        assert np.allclose(got[f1], v[0], atol=1e-2)
        assert store.embeddings("e1", [f2]).keys() == {f2} and store.embeddings("e2") == {}
        assert sorted((fid, cid) for fid, cid, _ in store.enrolled("e1")) == [(f1, miku), (f2, miku), (f3, rin)]

        store.save_identities("e1", {f1: (miku, 0.91), f2: (None, 0.2)})
        assert store.identities("e1", [f1, f2, f3]) == {f1: ("Miku", pytest.approx(0.91)),
                                                         f2: (None, pytest.approx(0.2))}

        store.register_identity_model("e0", "resnet18", "e0.pt", activate=True)
        store.register_identity_model("e1", "resnet18", "e1.pt", metrics={"top1": 0.9}, threshold=0.5,
                                      activate=True)
        assert store.active_identity_model()["version"] == "e1"
        assert store.activate_identity_model("e0") and not store.activate_identity_model("nope")
        assert store.active_identity_model()["version"] == "e0"
        assert [r["version"] for r in store.list_identity_models()] == ["e0", "e1"]
        # the taste models are a separate registry
        assert store.active_model()["version"] == "m"


# ---- recognition -------------------------------------------------------------------------------
def _clusters(rng, centres: np.ndarray, n: int, noise: float = 0.15) -> np.ndarray:
    v = np.repeat(centres, n, axis=0) + rng.normal(scale=noise, size=(len(centres) * n, centres.shape[1]))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_the_character_of_a_face_is_its_name_else_the_active_embedders_recognition(tmp_path):
    with Store.open(tmp_path / "t.db") as store:
        store.register_model("m", "resnet18", "m.pt", activate=True)
        f1, f2, f3, f4 = (_face(store, tmp_path / "media", s) for s in (1, 2, 3, 4))
        image_of = {f: store.execute("SELECT image_id FROM faces WHERE id = ?", [f])[0]["image_id"]
                    for f in (f1, f2, f3, f4)}
        miku, rin = (store.character_id(n, create=True) for n in ("Miku", "Rin"))
        store.register_identity_model("e1", "resnet18", "e1.pt", activate=True)
        store.register_identity_model("e2", "resnet18", "e2.pt")
        store.save_identities("e1", {f1: (rin, 0.7), f2: (miku, 0.8), f3: (None, 0.2)})
        store.save_identities("e2", {f2: (rin, 0.9), f4: (rin, 0.9)})
        store.name_face(f1, miku, origin="gallery")       # a given name beats recognition
        got = store.face_characters([f1, f2, f3, f4])
        assert got[f1] == {"character": "Miku", "similarity": 1.0, "named_by": "gallery", "weak": False}
        assert got[f2]["character"] == "Miku" and got[f2]["named_by"] is None and got[f2]["similarity"] == 0.8
        assert got[f3]["character"] is None                # recognised as unknown
        assert f4 not in got                               # only the inactive embedder saw it
        assert store.picture_characters(image_of.values()) == {
            image_of[f1]: ["Miku"], image_of[f2]: ["Miku"], image_of[f3]: [], image_of[f4]: []}
        store.activate_identity_model("e2")               # the active embedder's results count
        assert store.face_characters([f2, f4])[f2]["character"] == "Rin"
        assert store.picture_characters([image_of[f4]]) == {image_of[f4]: ["Rin"]}


def test_one_character_whatever_the_case_underscores_or_spacing_and_no_invisible_characters(tmp_path):
    from storage.characters import name_key

    assert name_key("Hatsune Miku") == name_key("hatsune_miku") == name_key(" HATSUNE   miku ") == "hatsune miku"
    assert check_name("👩‍🎤 Miku") == "👩‍🎤 Miku"          # the joiner inside an emoji sequence
    for invisible in ("Mi​ku", "‮ukiM", "Miku⁠"):
        with pytest.raises(CharacterNameError, match="invisible"):
            check_name(invisible)
    with Store.open(tmp_path / "t.db") as store:
        miku = store.character_id("Hatsune Miku", create=True)
        assert store.character_id("hatsune_miku", create=True) == miku       # a booru tag: the same one
        assert store.character_id("HATSUNE MIKU") == miku and [r["name"] for r in store.list_characters()] == [
            "Hatsune Miku"]


def test_taking_a_name_back_makes_recognition_results_stale(tmp_path):
    with Store.open(tmp_path / "t.db") as store:
        store.register_model("m", "resnet18", "m.pt", activate=True)
        f1, f2 = (_face(store, tmp_path / "media", s) for s in (1, 2))
        store.name_face(f1, store.character_id("Rin", create=True), origin="gallery")
        n, named_at = store.enrolment_stamp()
        assert n == 1 and named_at
        time.sleep(0.01)
        assert store.unname_face(f1) and not store.unname_face(f1)
        n, changed_at = store.enrolment_stamp()
        assert n == 0 and changed_at > named_at      # results made before this are stale now


def test_blocked_characters_by_recognition_or_source_tags_and_unidentified_faces_wait(tmp_path):
    from bot.posting import block_reason

    with Store.open(tmp_path / "t.db") as store:
        store.register_model("m", "resnet18", "m.pt", activate=True)
        store.register_identity_model("e1", "resnet18", "e1.pt", activate=True)
        f1, f2, f3 = (_face(store, tmp_path / "media", s) for s in (1, 2, 3))
        img = {f: store.get_image(store.execute("SELECT image_id FROM faces WHERE id = ?", [f])[0]["image_id"])
               for f in (f1, f2, f3)}
        assert block_reason(store, img[f2], ["Rin"]) is None          # nobody named yet: nothing to wait for
        img[f3]["characters"] = ["kagamine_rin"]                      # the booru's own character tag
        assert block_reason(store, img[f3], ["Kagamine Rin"]) == "Kagamine Rin is blocked (characters.block)"
        rin = store.character_id("Kagamine Rin", create=True)
        store.name_face(f1, rin, origin="gallery")
        assert "blocked" in block_reason(store, img[f1], ["kagamine rin"])
        assert "not identified yet" in block_reason(store, img[f2], ["Kagamine Rin"])  # recognition is on
        store.save_identities("e1", {f2: (None, 0.3)})
        assert block_reason(store, img[f2], ["Kagamine Rin"]) is None  # identified: nobody blocked
        assert block_reason(store, img[f1], []) is None                 # no block list: no check


def test_calibrate_threshold_reaches_the_target_precision():
    from scorer.identity import calibrate_threshold

    sims = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5]
    correct = [True, True, True, True, False, True, False]
    assert calibrate_threshold(sims, correct, 1.0) == pytest.approx(0.75)   # halfway below 0.8
    assert calibrate_threshold(sims, correct, 0.8) == pytest.approx(0.55)   # 5 of 6 right at 0.6
    assert calibrate_threshold([0.9, 0.8], [False, False], 0.9) > 0.9   # nothing reaches it: reject all
    assert calibrate_threshold([], [], 0.9) == 0.5


def test_recognizer_knows_enrolled_characters_and_rejects_unknown_ones():
    from scorer.identity import Recognizer

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    enrolled = _clusters(rng, centres[:3], 5)
    rec = Recognizer(enrolled, np.repeat([10, 20, 30], 5), k=3)
    threshold = rec.calibrate_self(0.9)
    assert 0 < threshold < 1
    queries = _clusters(rng, centres, 4)
    got = rec.identify(queries)
    assert [c for c, _ in got[:12]] == [10] * 4 + [20] * 4 + [30] * 4
    assert [c for c, _ in got[12:]] == [None] * 4                   # never enrolled: unknown
    assert all(s < threshold for _, s in got[12:])
    assert Recognizer(np.zeros((0, 32)), []).identify(queries[:2]) == [(None, 0.0), (None, 0.0)]
    # with nearest examples counted, an enrolled example itself scores 1
    near = Recognizer(enrolled, np.repeat([10, 20, 30], 5), nearest=True)
    assert near.identify(enrolled[:1])[0] == (10, pytest.approx(1.0, abs=1e-5))


def test_embedder_saves_loads_and_normalises(tmp_path):
    import torch

    from scorer.identity import Embedder, build_embedder, save_embedder
    from scorer.model import ModelError

    torch.manual_seed(0)
    net = build_embedder("resnet18", embedding_dim=16)
    save_embedder(net, tmp_path / "e.pt", arch="resnet18", image_size=32, version="e")
    emb = Embedder.load(tmp_path / "e.pt", device="cpu")
    assert (emb.version, emb.image_size, emb.dim) == ("e", 32, 16)
    from PIL import Image
    import io
    crops = [Image.open(io.BytesIO(picture(s))) for s in range(3)]
    v = emb.embed(crops)
    assert v.shape == (3, 16) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(ModelError, match="cannot load identity model"):
        Embedder.load(tmp_path / "bad.pt")


def test_characters_config_section(tmp_path):
    from bot.config import ConfigError, load_config
    from tests.helpers import write_config

    assert load_config("config.example.toml").characters == load_config(cwd="/nonexistent").characters
    with pytest.raises(ConfigError, match="characters.threshold_precision: expected a number above 0"):
        load_config(write_config(tmp_path, "[characters]\nthreshold_precision = 1.5\n"))
    with pytest.raises(ConfigError, match="characters.margin: expected 0 or more"):
        load_config(write_config(tmp_path, "[characters]\nmargin = -0.1\n"))


# ---- the command line --------------------------------------------------------------------------
FAST = "[scorer]\nimage_size = 32\nbatch_size = 8\nbackbone_size = 64\n[characters]\nimage_size = 32\nembedding_dim = 32\n"


def _folder(root, name: str, seeds) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    for s in seeds:
        (root / name / f"{s}.jpg").write_bytes(picture(s))


def test_import_add_identify_list(tmp_path):
    from tests.helpers import cli

    (tmp_path / "config.toml").write_text(FAST)
    faces = tmp_path / "faces"
    _folder(faces, "Alice", [1, 2, 3])
    _folder(faces, "Bob 🎩", [11, 12, 13])
    out = cli(tmp_path, "characters", "import", faces, "--crops")
    assert out.returncode == 0, out.stderr
    assert "6 face(s) named as 2 character(s)" in out.stdout
    assert "untrained" in out.stderr
    listed = cli(tmp_path, "characters", "list")
    assert listed.stdout.splitlines() == ["Alice  3 example(s)  validation accuracy -",
                                          "Bob 🎩  3 example(s)  validation accuracy -"]

    # a new character is recognised right after `add`, without training
    for s in (21, 22):
        (tmp_path / f"new{s}.jpg").write_bytes(picture(s))
    added = cli(tmp_path, "characters", "add", "Carol", "new21.jpg", "new22.jpg", "--crops")
    assert added.returncode == 0, added.stderr
    found = cli(tmp_path, "characters", "identify", "new21.jpg", "--crops", "--json")
    assert found.returncode == 0, found.stderr
    [result] = json.loads(found.stdout)
    assert result["path"] == "new21.jpg"
    [face] = result["faces"]
    assert face["character"] == "Carol" and face["similarity"] > 0.9 and len(face["box"]) == 4
    text = cli(tmp_path, "characters", "identify", faces / "Alice" / "1.jpg", "--crops")
    assert ": face 1 (0, 0, 160, 120): Alice (similarity " in text.stdout
    assert "Carol  2 example(s)  validation accuracy -" in cli(tmp_path, "characters", "list").stdout


def test_bad_input_gives_one_clear_line(tmp_path):
    from tests.helpers import cli

    (tmp_path / "config.toml").write_text(FAST)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.jpg").write_bytes(picture(5))
    cases = [
        (("import", tmp_path / "empty"), "no pictures found"),
        (("import", tmp_path / "missing"), "no such folder"),
        (("add", "a/b", "a.jpg"), "no slashes allowed"),
        (("add", "", "a.jpg"), "cannot be empty"),
        (("add", "Dora", "a.jpg"), "no face found"),           # a generated picture has no face
        (("add", "Dora", "nothing.jpg", "--crops"), "cannot read"),
    ]
    for args, message in cases:
        out = cli(tmp_path, "characters", *args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, out.stderr)
    ok = cli(tmp_path, "characters", "add", "ミク 🎤", "a.jpg", "--crops")
    assert ok.returncode == 0, ok.stderr
    assert "ミク 🎤  1 example(s)" in cli(tmp_path, "characters", "list").stdout
    nothing = cli(tmp_path, "characters", "identify", "a.jpg")
    assert nothing.returncode == 0 and "a.jpg: no face found" in nothing.stdout


@pytest.mark.slow
def test_train_registers_promotes_and_reembeds(tmp_path):
    from storage import Store
    from tests.helpers import cli

    (tmp_path / "config.toml").write_text(FAST + "epochs = 3\nbatch_size = 16\nval_share = 0.3\n")
    faces = tmp_path / "faces"
    for c, name in enumerate(["Alice", "Bob", "Carol"]):
        _folder(faces, name, range(100 * c, 100 * c + 8))
    assert cli(tmp_path, "characters", "import", faces, "--crops").returncode == 0
    out = cli(tmp_path, "characters", "train")
    assert out.returncode == 0, out.stderr
    assert "promoted: first trained identity embedder" in out.stdout and "validation top-1" in out.stdout
    with Store.open(tmp_path / "data" / "tastefeed.db") as store:
        row = store.active_identity_model()
        assert row["metrics"] and row["threshold"] is not None and row["version"].startswith("identity-resnet18-")
        assert len(store.enrolled(row["version"])) == 24          # named faces embedded by the new version
        assert len(store.list_identity_models()) == 2             # the untrained one stays, for rollback
    found = cli(tmp_path, "characters", "identify", faces / "Bob" / "101.jpg", "--crops", "--json")
    assert found.returncode == 0 and "untrained" not in found.stderr
    assert json.loads(found.stdout)[0]["faces"][0]["character"] in ("Bob", None)
    models = cli(tmp_path, "characters", "models").stdout.splitlines()
    assert len(models) == 2 and models[0].startswith("  identity-resnet18-random-init") and "untrained" in models[0]
    assert models[1].startswith(f"* {row['version']}") and "validation top-1" in models[1]
    # training records per-character validation accuracy; `list` shows it
    per = json.loads(row["metrics"])["per_character"]
    assert set(per) <= {"Alice", "Bob", "Carol"} and sum(v["n"] for v in per.values()) == row_val(row)
    listed = cli(tmp_path, "characters", "list").stdout.splitlines()
    for name, v in per.items():
        assert f"{name}  8 example(s)  validation accuracy {v['accuracy']:.2f} of {v['n']}" in listed
    # eval of the trained embedder: its threshold, and the figures merged into its stored metrics
    ev = cli(tmp_path, "characters", "eval")
    assert ev.returncode == 0, ev.stderr
    assert "threshold" in ev.stdout and "from the embedder" in ev.stdout and "not stored" not in ev.stderr
    with Store.open(tmp_path / "data" / "tastefeed.db") as store:
        stored = json.loads(store.get_identity_model(row["version"])["metrics"])
    assert stored["val_top1"] == json.loads(row["metrics"])["val_top1"]          # training's keys kept
    assert set(stored["open_set"]) >= {"precision", "recall", "f1"} and stored["closed_set"]["n"] == row_val(row)
    assert (tmp_path / "data" / "eval" / row["version"] / "confusion.png").exists()
    back = cli(tmp_path, "characters", "use", "identity-resnet18-random-init")
    assert back.returncode == 0, back.stderr
    with Store.open(tmp_path / "data" / "tastefeed.db") as store:
        assert store.active_identity_model()["version"] == "identity-resnet18-random-init"
        assert len(store.enrolled("identity-resnet18-random-init")) == 24
    assert cli(tmp_path, "characters", "use", "nope").returncode == 1


def row_val(row) -> int:
    return json.loads(row["metrics"])["n_val"]


def test_train_needs_two_characters(tmp_path):
    from tests.helpers import cli

    (tmp_path / "config.toml").write_text(FAST)
    _folder(tmp_path / "faces", "Alice", [1, 2])
    assert cli(tmp_path, "characters", "import", tmp_path / "faces", "--crops").returncode == 0
    out = cli(tmp_path, "characters", "train")
    assert out.returncode == 1 and "training needs 2 or more" in out.stderr


# ---- weak names from booru character tags --------------------------------------------------------
def _booru_picture(store, media, seed: int, characters, boxes) -> int:
    """A scored booru picture whose tags name ``characters``, with a face per box (none: the
    whole picture); its image id."""
    from storage.records import WHOLE_PICTURE

    sid = store.upsert_source("booru", "booru", {"enabled": False, "interval": 60, "options": {}}, origin="cli")
    data = picture(seed, size=(300, 200))
    info, _ = inspect(data)
    [image_id] = store.save_poll(sid, [{"external_id": f"post{seed}", "page_url": f"https://b.example/{seed}",
                                        "tags": ["solo", *characters], "characters": characters}], {})
    store.record_download(image_id, info, store_media(media, data, info), near_distance=-1)
    faces = [Face(*box, 0.9, "animeface").scored(3.0, None) for box in boxes] or \
        [Face.whole(info.width, info.height, WHOLE_PICTURE).scored(3.0, None)]
    store.record_analysis(image_id, faces, 3.0, None, "m")
    return image_id


def test_one_character_tag_and_one_face_give_a_weak_name(tmp_path, caplog):
    import logging

    one, two = [(10, 10, 90, 90)], [(10, 10, 90, 90), (150, 10, 230, 90)]
    with Store.open(tmp_path / "t.db") as store:
        store.register_model("m", "resnet18", "m.pt", activate=True)
        media = tmp_path / "media"
        named = _booru_picture(store, media, 1, ["hatsune_miku"], one)
        cases = {_booru_picture(store, media, 2, ["hatsune_miku", "kagamine_rin"], one): "two characters",
                 _booru_picture(store, media, 3, ["hatsune_miku"], two): "two faces",
                 _booru_picture(store, media, 4, ["hatsune_miku"], []): "no face (whole picture)",
                 _booru_picture(store, media, 5, [], one): "no character tag",
                 _booru_picture(store, media, 6, ["saber_(fate/stay_night)"], one): "a tag with a slash"}
        assert store.name_from_tags(named) == "hatsune_miku"
        [face] = store.faces_of(named)
        assert store.face_name(face["id"])["origin"] == "booru" and store.face_name(face["id"])["weak"] == 1
        with caplog.at_level(logging.DEBUG, logger="tastefeed.characters"):
            for image_id, why in cases.items():
                assert store.name_from_tags(image_id) is None, why
                assert all(store.face_name(f["id"]) is None for f in store.faces_of(image_id)), why
        assert "no slashes allowed" in caplog.text
        assert [(r["name"], r["examples"], r["weak"]) for r in store.list_characters()] == [("hatsune_miku", 1, 1)]
        # a face named already keeps its name
        rin = store.character_id("Rin", create=True)
        other = _booru_picture(store, media, 7, ["hatsune_miku"], one)
        store.name_face(store.faces_of(other)[0]["id"], rin, origin="gallery")
        assert store.name_from_tags(other) is None
        assert store.face_name(store.faces_of(other)[0]["id"])["name"] == "Rin"
        assert store.name_from_tags(10_000) is None                     # no such picture


# ---- characters eval and list ------------------------------------------------------------------
def _near_copies(root, name: str, seed: int, n: int) -> None:
    """``n`` pictures of one character: one synthetic picture with a different dot in each (so
    each is its own file and hash, yet its own character's examples are its nearest)."""
    import io

    from PIL import Image

    (root / name).mkdir(parents=True, exist_ok=True)
    base = Image.open(io.BytesIO(picture(seed))).convert("RGB")
    for i in range(n):
        im = base.copy()
        im.putpixel((i % 160, i // 160), (255, 255, 255))
        im.save(root / name / f"{i}.png")


def test_eval_writes_metrics_and_plots_and_bad_input_is_one_line(tmp_path):
    from tests.helpers import cli

    (tmp_path / "config.toml").write_text(FAST + "val_share = 0.4\n")
    none = cli(tmp_path, "characters", "eval")
    assert none.returncode == 1 and none.stderr.count("error:") == 1
    assert "error: no named faces to evaluate on" in none.stderr
    faces = tmp_path / "faces"
    _near_copies(faces, "Alice", 1, 8)
    assert cli(tmp_path, "characters", "import", faces, "--crops").returncode == 0
    one = cli(tmp_path, "characters", "eval")
    assert one.returncode == 1 and one.stderr.count("error:") == 1
    assert "named faces of 1 character only (Alice): evaluation needs 2 or more" in one.stderr
    for name, seed in [("Bob", 2), ("Carol", 3), ("Dan", 4)]:
        _near_copies(faces, name, seed, 8)
    assert cli(tmp_path, "characters", "import", faces, "--crops").returncode == 0

    out = cli(tmp_path, "characters", "eval", "--out", tmp_path / "ev")
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["version"] == "identity-resnet18-random-init" and m["characters"] == 4
    assert m["n_enrolled"] + m["n_val"] == 32 and m["n_val"] >= 4
    # each validation face's nearest example is a near copy of it: the closed set is all right
    assert m["closed_set"] == {"top1": 1.0, "n": m["n_val"]}
    assert sum(v["n"] for v in m["per_character"].values()) == m["n_val"]
    assert all(v["accuracy"] == 1.0 for v in m["per_character"].values())
    op = m["open_set"]
    # each character is unknown in one fold (all its faces), known in the other two (its validation faces)
    assert op["folds"] == 3 and op["n_unknown"] == 32 and op["n_known"] == 2 * m["n_val"]
    assert op["threshold_from"] == "enrolled examples (leave-one-out)"
    assert 0 <= op["precision"] <= 1 and 0 <= op["recall"] <= 1 and op["unknown_rejected"] is not None
    for png in ("confusion.png", "similarity.png"):
        assert (tmp_path / "ev" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"closed set: top-1 1.000 (n={m['n_val']})" in out.stdout
    assert f"precision {op['precision']:.3f}  recall {op['recall']:.3f}  F1 {op['f1']:.3f}" in out.stdout
    assert any(line.split()[:1] == ["Alice"] for line in out.stdout.splitlines())
    assert "not stored" in out.stderr                         # the untrained embedder keeps no metrics
    # default folder: <data>/eval/<version>
    assert cli(tmp_path, "characters", "eval").returncode == 0
    assert (tmp_path / "data" / "eval" / "identity-resnet18-random-init" / "metrics.json").exists()
    assert cli(tmp_path, "characters", "eval", "--model", "nope").returncode == 1


def test_list_shows_validation_accuracy_of_the_active_embedder(tmp_path):
    from tests.helpers import cli

    (tmp_path / "config.toml").write_text(FAST)
    faces = tmp_path / "faces"
    _folder(faces, "Alice", [1, 2])
    _folder(faces, "Bob", [3])
    assert cli(tmp_path, "characters", "import", faces, "--crops").returncode == 0
    assert cli(tmp_path, "characters", "list").stdout.splitlines() == [
        "Alice  2 example(s)  validation accuracy -", "Bob  1 example(s)  validation accuracy -"]
    with Store.open(tmp_path / "data" / "tastefeed.db") as store:
        store.register_identity_model("identity-x", "resnet18", "x.pt", activate=True,
                                      metrics={"val_top1": 0.5, "per_character": {"Alice": {"n": 4, "accuracy": 0.75}}})
        assert store.update_identity_metrics("identity-x", {"per_character": {"Alice": {"n": 3, "accuracy": 2 / 3}}})
        assert json.loads(store.get_identity_model("identity-x")["metrics"])["val_top1"] == 0.5   # merged
        assert not store.update_identity_metrics("nope", {})
    assert cli(tmp_path, "characters", "list").stdout.splitlines() == [
        "Alice  2 example(s)  validation accuracy 0.67 of 3", "Bob  1 example(s)  validation accuracy -"]


def test_confusion_plot_takes_names_that_look_like_formulas(tmp_path):
    from scorer.identity_eval import plot_confusion

    names = {1: "$\\foo$", 2: "a$b$^c", 3: "ミク 🎤"}
    path = plot_confusion(np.array([1, 2, 3, 1]), np.array([1, 2, 3, 2]), names, tmp_path / "confusion.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
