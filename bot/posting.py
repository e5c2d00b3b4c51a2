"""What may be posted where, and the files that go with a post: plain functions, no Discord.

- :func:`route`: the channel a picture goes to by its source's content rating and tags
  (questionable/explicit only to the NSFW channel, blocked tags nowhere); :func:`blocked_character`:
  a picture with a character of ``characters.block`` goes nowhere.
- :func:`character_summary`: who is in a picture, as posts and ``/why`` say it.
- :class:`Reactions`: the emoji -> rating mapping (``discord.reactions``).
- :func:`fit_upload`: the picture's bytes, recompressed/downscaled below an upload limit.
- :func:`face_sheet`: the face crops of a picture side by side with their scores (``/why``).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from scorer.analyze import face_crop
from storage.characters import name_key
from storage.records import Face
from storage.media import load_media

NSFW_RATINGS = ("questionable", "explicit")
VS16 = "\ufe0f"   # emoji presentation selector: "❤" and "❤️" are the same reaction


def emoji_key(text: str) -> str:
    return text.replace(VS16, "")


class Reactions:
    """The rating each reaction emoji stands for (unicode emoji, or a custom emoji's name)."""

    def __init__(self, mapping: dict[str, int]):
        self.mapping = dict(mapping)
        self._by_key = {emoji_key(e): v for e, v in mapping.items()}

    def value_of(self, emoji: str | None, name: str | None = None) -> int | None:
        for candidate in (emoji, name):
            if candidate and emoji_key(candidate) in self._by_key:
                return self._by_key[emoji_key(candidate)]
        return None

    def buttons(self) -> list[str]:
        """The reactions the bot adds to its posts: the first emoji mapped to each rating, 1 to 5."""
        out = []
        for value in range(1, 6):
            emoji = next((e for e, v in self.mapping.items() if v == value), None)
            if emoji is not None:
                out.append(emoji)
        return out


def blocked_tag(image: dict, blocklist: list[str]) -> str | None:
    tags = {t.lower() for t in image.get("tags") or []}
    return next((t for t in blocklist if t.lower() in tags), None)


def blocked_character(names: list[str], block: list[str]) -> str | None:
    """The first of ``block`` among a picture's characters (``names``), whatever the case,
    underscores or spacing (``storage.characters.name_key``)."""
    have = {name_key(n) for n in names}
    return next((b for b in block if name_key(b) in have), None)


def block_reason(store, image: dict, block: list[str]) -> str | None:
    """Why ``characters.block`` keeps the picture (a row of ``images``) from being posted, or
    None: a blocked character among its faces (named or recognised) or among the source's own
    character tags; or, while some face is named (so recognition is on), a face the active
    embedder has not identified yet (just scored, or after a promotion until the background run
    reaches it): it waits. ``store`` is a sync Store."""
    if not block:
        return None
    names = store.picture_characters([image["id"]])[image["id"]] + list(image.get("characters") or [])
    hit = blocked_character(names, block)
    if hit is not None:
        return f"{hit} is blocked (characters.block)"
    if store.enrolment_stamp()[0] and store.unrecognised_faces(image["id"]):
        return "a face is not identified yet and characters.block is set"
    return None


def describe_character(entry: dict) -> str:
    """One face's character (an entry of ``Store.face_characters``): ``Miku (named)``, ``Miku
    (0.83)`` for a recognised face with its similarity, or ``unknown (0.41)``."""
    if entry["named_by"]:
        return f"{entry['character']} (named{', weak' if entry['weak'] else ''})"
    return f"{entry['character'] or 'unknown'} ({entry['similarity']:.2f})"


def character_summary(entries: list[dict]) -> str:
    """The known characters of a picture's faces (entries of ``Store.face_characters``), each once:
    ``Miku (named), Rin (0.83)``; named beats recognised, else the best similarity. "" if none."""
    best: dict[str, dict] = {}
    for e in entries:
        name = e["character"]
        if name is None:
            continue
        old = best.get(name)
        if old is None or (e["named_by"] and not old["named_by"]) or (
                not old["named_by"] and (e["similarity"] or 0) > (old["similarity"] or 0)):
            best[name] = e
    return ", ".join(describe_character(best[n]) for n in sorted(best, key=str.casefold))


def numbered_faces(faces: list[dict]) -> list[dict]:
    """A picture's faces in the order ``/why``, its face sheet and ``/name`` number them (face 1,
    2, ...): best score first."""
    return sorted(faces, key=lambda f: -(f.get("score") if f.get("score") is not None else -1))


def route(image: dict, channel_id: int, nsfw_channel_id: int, blocklist: list[str]) -> int | None:
    """The channel id ``image`` may be posted to, or None (blocked tag, or NSFW with no NSFW channel)."""
    if blocked_tag(image, blocklist):
        return None
    if (image.get("rating") or "").lower() in NSFW_RATINGS:
        return nsfw_channel_id or None
    return channel_id


@dataclass
class Upload:
    data: bytes
    filename: str


def fit_upload(media_root: str | Path, rel: str, limit: int, *, max_pixels: int = 90_000_000,
               name: str = "picture") -> Upload:
    """The stored picture as it is when it fits in ``limit`` bytes, else as a JPEG, downscaled
    step by step until it fits."""
    path = Path(media_root) / rel
    data = path.read_bytes()
    ext = path.suffix.lstrip(".").lower() or "jpg"
    if len(data) <= limit and ext in ("jpg", "jpeg", "png", "gif", "webp"):
        return Upload(data, f"{name}.{ext}")
    im = load_media(media_root, rel, max_pixels=max_pixels)
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    side = max(im.size)
    quality = 90
    while True:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, optimize=True)
        if buf.tell() <= limit or side <= 64:
            return Upload(buf.getvalue(), f"{name}.jpg")
        if quality > 75:
            quality -= 10
            continue
        side = int(side * 0.75)
        im = im.copy()
        im.thumbnail((side, side))


def face_sheet(media_root: str | Path, rel: str, faces: list[dict], *, margin: float = 0.2, size: int = 160,
               max_pixels: int = 90_000_000) -> bytes:
    """PNG: each face crop (as the model saw it) with its score below, left to right, best first."""
    im = load_media(media_root, rel, max_pixels=max_pixels).convert("RGB")
    faces = numbered_faces(faces)[:10]
    sheet = Image.new("RGB", (max(1, len(faces)) * (size + 8) + 8, size + 36), "white")
    draw = ImageDraw.Draw(sheet)
    for i, f in enumerate(faces):
        box = Face.from_row(f)
        crop = face_crop(im, box, margin).copy()
        crop.thumbnail((size, size))
        x = 8 + i * (size + 8)
        sheet.paste(crop, (x + (size - crop.width) // 2, 8 + (size - crop.height) // 2))
        score = "n/a" if f.get("score") is None else f"{f['score']:.2f}"
        draw.text((x + 4, size + 14), f"face {i + 1}: {score}", fill="black")
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue()
