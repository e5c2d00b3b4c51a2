"""Media files: checking that bytes are a real picture, and storing each picture once by hash.

Files live under ``<data>/media/ab/cd/<sha256>.<ext>``: the same content from any source is stored
once. Writes go to a temporary name first and are renamed into place, so a crash never leaves a
half-written picture under its final name.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import imagehash
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False

# Magic numbers of the formats we accept, checked before Pillow sees the bytes.
_MAGIC = [
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
]
EXTENSIONS = {"jpeg": "jpg", "png": "png", "gif": "gif", "webp": "webp", "bmp": "bmp", "avif": "avif"}


class BadImage(Exception):
    """The bytes are not a usable picture; the message says why, in a few words."""


@dataclass
class ImageInfo:
    sha256: str
    phash: str          # 64-bit perceptual hash, 16 hex digits
    width: int
    height: int
    format: str         # jpeg | png | gif | webp | bmp | avif
    bytes: int


def sniff_format(data: bytes) -> str | None:
    """The picture format named by the first bytes, or None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "avif"
    return None


def decode_image(data: bytes, *, max_pixels: int = 90_000_000, draft: int = 0) -> Image.Image:
    """Decode ``data`` to an RGB picture (first frame), or raise BadImage.

    Refuses empty input, non-image bytes (an HTML error page, say), pictures over ``max_pixels``
    (checked from the header, before any pixel is decoded) and truncated or corrupt files.
    ``draft``: a JPEG is decoded at the smallest of libjpeg's scales (1/2 to 1/8) that keeps at
    least this many pixels a side (far less CPU; the whole file is still read, so a truncated or
    corrupt one is refused all the same); other formats at full size.
    """
    if not data:
        raise BadImage("empty file")
    fmt = sniff_format(data)
    if fmt is None:
        head = data[:64].lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
            raise BadImage("not an image (HTML or XML page)")
        raise BadImage("not an image (unknown format)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w <= 0 or h <= 0:
                raise BadImage("image has no pixels")
            if w * h > max_pixels:
                raise BadImage(f"image too large ({w}x{h} pixels, limit {max_pixels})")
            if draft and fmt == "jpeg":
                im.draft("RGB", (draft, draft))
            im.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("image too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError, EOFError) as e:
        raise BadImage(f"corrupt or truncated {fmt}: {e}") from None
    if im.mode != "RGB":
        if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            background = Image.new("RGB", im.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.split()[-1])
            im = background
        else:
            im = im.convert("RGB")
    return im


PHASH_DRAFT = 256   # pixels a side a JPEG is decoded at when only its fingerprint is wanted


def inspect(data: bytes, *, max_pixels: int = 90_000_000,
            picture: bool = True) -> tuple[ImageInfo, Image.Image | None]:
    """Decode and fingerprint ``data``: content hash, perceptual hash, size and format. Without
    ``picture`` (the download stage, which only fingerprints and checks), a JPEG is decoded at a
    reduced scale (:data:`PHASH_DRAFT`: about 5x less CPU, the same perceptual hash within a bit or
    two, measured on the shared pictures; the near-duplicate distance allows 4) and None is
    returned in place of the picture."""
    im = decode_image(data, max_pixels=max_pixels, draft=0 if picture else PHASH_DRAFT)
    width, height = im.size if picture else Image.open(io.BytesIO(data)).size
    info = ImageInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        phash=str(imagehash.phash(im)),
        width=width,
        height=height,
        format=sniff_format(data) or "unknown",
        bytes=len(data),
    )
    return info, im if picture else None


def media_relpath(sha256: str, fmt: str) -> str:
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}.{EXTENSIONS.get(fmt, 'bin')}"


def _write_atomic(final: Path, data: bytes) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def store_media(root: str | Path, data: bytes, info: ImageInfo) -> str:
    """Write ``data`` under ``root`` by its hash (once); return the path relative to ``root``."""
    rel = media_relpath(info.sha256, info.format)
    final = Path(root) / rel
    if not (final.exists() and final.stat().st_size == len(data)):
        _write_atomic(final, data)
    return rel


def thumbnail(root: str | Path, rel: str, thumbs: str | Path, size: int, *,
              box: tuple[int, int, int, int] | None = None, max_pixels: int = 90_000_000) -> Path:
    """A JPEG of the stored picture (or of its region ``box``: left, top, right, bottom, e.g. a
    face crop) at most ``size`` pixels on its longest side, made once and kept under
    ``thumbs/<size>/`` (named by the picture's hash, and the box). A thumbnail's mtime is when it
    was last used (to the hour): the cache is trimmed least recently used first
    (``storage/prune.py``)."""
    name = Path(rel).stem + ("-" + "-".join(str(int(v)) for v in box) if box else "") + ".jpg"
    out = Path(thumbs) / str(size) / rel[:6] / name
    try:
        if time.time() - out.stat().st_mtime > 3600:
            os.utime(out)
        return out
    except FileNotFoundError:
        pass
    im = load_media(root, rel, max_pixels=max_pixels)
    if box:
        im = im.crop(box)
    im.thumbnail((size, size))
    if im.mode != "RGB":
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    _write_atomic(out, buf.getvalue())
    return out


def load_media(root: str | Path, rel: str, *, max_pixels: int = 90_000_000) -> Image.Image:
    return decode_image((Path(root) / rel).read_bytes(), max_pixels=max_pixels)


def decode_on_device(datas: list[bytes], device, *, max_pixels: int = 90_000_000) -> list:
    """Pictures decoded straight onto ``device`` (a torch device: nvJPEG on a GPU), as uint8 RGB
    tensors (3 x height x width), or a :class:`BadImage` for each that cannot be: the GPU path of
    the daemon, where a full-size picture never goes through the CPU's memory.

    JPEGs are decoded together in one call (torchvision's ``decode_jpeg``; its size is checked
    against ``max_pixels`` from the header first); a batch that fails is decoded one by one, and
    a picture torchvision cannot decode (or another format) goes through :func:`decode_image`
    and is copied over."""
    import numpy as np
    import torch

    out: list = [None] * len(datas)
    jpegs = []
    for i, data in enumerate(datas):
        if sniff_format(data) == "jpeg":
            try:
                with warnings.catch_warnings():     # the same bomb guard as decode_image's
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    w, h = Image.open(io.BytesIO(data)).size
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                out[i] = BadImage("image too large (decompression bomb guard)")
                continue
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                out[i] = BadImage(f"corrupt or truncated jpeg: {e}")
                continue
            if w * h > max_pixels:
                out[i] = BadImage(f"image too large ({w}x{h} pixels, limit {max_pixels})")
            else:
                jpegs.append(i)
    decode = _decode_jpeg()
    if decode is not None and jpegs:
        raw = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpegs]
        try:
            for i, t in zip(jpegs, decode(raw, device)):
                out[i] = t
        except RuntimeError:            # one bad picture fails the batch: one at a time
            for i, r in zip(jpegs, raw):
                try:
                    out[i] = decode([r], device)[0]
                except RuntimeError:
                    pass                # left to Pillow, which says what is wrong
    for i, data in enumerate(datas):
        if out[i] is None:
            try:
                im = decode_image(data, max_pixels=max_pixels)
            except BadImage as e:
                out[i] = e
                continue
            out[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).to(device)
    return out


def _decode_jpeg():
    """torchvision's batched ``decode_jpeg`` (RGB), or None where torchvision no longer has it
    (its image decoding is deprecated since 0.29): Pillow then decodes every picture."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(raw, device):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    return decode


class PhashIndex:
    """The stored pictures' perceptual hashes, for the near-duplicate lookup of each new picture:
    kept in arrays and compared all at once (XOR and bit count over 100,000 hashes take 0.1-0.2 ms,
    against 6 ms for a Python loop; bench/RESULTS.md)."""

    def __init__(self, items=()):
        import numpy as np

        pairs = list(items)
        self._np = np
        self._n = len(pairs)
        cap = max(1024, self._n * 2)
        self._ids = np.zeros(cap, dtype=np.int64)
        self._hashes = np.zeros(cap, dtype=np.uint64)
        if pairs:
            self._ids[:self._n] = [p[0] for p in pairs]
            self._hashes[:self._n] = np.array([p[1] for p in pairs], dtype=np.uint64)

    def __len__(self) -> int:
        return self._n

    def add(self, image_id: int, phash: int) -> None:
        np = self._np
        if self._n == len(self._ids):
            self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
            self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
        self._ids[self._n] = image_id
        self._hashes[self._n] = np.uint64(phash)
        self._n += 1

    def nearest(self, phash: int, max_distance: int, exclude: int | None = None) -> int | None:
        """The id of the closest hash within ``max_distance`` bits (the lowest id among equals),
        not ``exclude``; None when there is none."""
        np = self._np
        if not self._n:
            return None
        dist = np.bitwise_count(self._hashes[:self._n] ^ np.uint64(phash)).astype(np.int64)
        ids = self._ids[:self._n]
        if exclude is not None:
            dist[ids == exclude] = 65
        close = np.flatnonzero(dist <= max_distance)
        if not len(close):
            return None
        order = np.lexsort((ids[close], dist[close]))
        return int(ids[close[order[0]]])
