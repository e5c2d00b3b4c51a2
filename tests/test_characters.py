"""Characters: names and examples in storage, the identity embedder and recognizer, and the
``characters`` commands (import, add, identify, list)."""
from __future__ import annotations

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
