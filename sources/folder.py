"""Folder source: new or changed picture files in a directory, subfolders included.

The cursor maps each seen file (relative path) to its ``mtime_ns:size``; a file is new when it is
not in the map, changed when its stamp differs. Files still being written (modified less than
``settle`` seconds ago) wait for the next poll.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sources.base import Item, Poll, Source, SourceError

PICTURE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".avif"}


@dataclass
class FolderOptions:
    path: str = "inbox"
    recursive: bool = True
    settle: float = 0.5          # seconds a file must be unchanged before it is taken
    create: bool = True          # create the folder if it does not exist


def _scan(root: Path, recursive: bool) -> list[tuple[str, int, int]]:
    found = []
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in PICTURE_SUFFIXES:
                continue
            full = Path(dirpath) / name
            try:
                st = full.stat()
            except OSError:
                continue  # vanished between listing and stat
            found.append((full.relative_to(root).as_posix(), st.st_mtime_ns, st.st_size))
    return found


class FolderSource(Source):
    kind = "folder"
    Options = FolderOptions
    remote = False

    def __init__(self, name, options, http=None):
        super().__init__(name, options, http)
        try:
            self._ensure_root()  # so users can drop pictures in at once
        except OSError:
            pass  # reported by the first poll

    def _ensure_root(self) -> Path:
        root = Path(self.options.path)
        if self.options.create and not root.exists():
            root.mkdir(parents=True, exist_ok=True)
        return root

    def describe(self) -> str:
        return f"folder {self.options.path}"

    async def poll(self, cursor: dict, limit: int) -> Poll:
        try:
            root = self._ensure_root()
        except OSError as e:
            raise SourceError(f"cannot create folder {self.options.path}: {e.strerror}") from None
        if not root.is_dir():
            raise SourceError(f"folder {root} does not exist or is not a folder")
        try:
            found = await asyncio.to_thread(_scan, root, self.options.recursive)
        except OSError as e:
            raise SourceError(f"cannot read folder {root}: {e.strerror}") from None
        seen: dict[str, str] = dict(cursor.get("files", {}))
        present = {rel for rel, _, _ in found}
        cutoff = time.time_ns() - int(self.options.settle * 1e9)
        changed = sorted((mtime, rel, size) for rel, mtime, size in found
                         if seen.get(rel) != f"{mtime}:{size}" and mtime <= cutoff and size > 0)
        waiting = sum(1 for rel, mtime, size in found
                      if seen.get(rel) != f"{mtime}:{size}" and (mtime > cutoff or size == 0))
        items = []
        for mtime, rel, size in changed[:limit]:
            stamp = f"{mtime}:{size}"
            seen[rel] = stamp
            items.append(Item(external_id=f"{rel}@{stamp}", local_path=str((root / rel).resolve()),
                              title=Path(rel).name, posted_at=None))
        # Forget files that were deleted, so the cursor does not grow for ever.
        seen = {rel: stamp for rel, stamp in seen.items() if rel in present}
        return Poll(items=items, cursor={"files": seen}, more=len(changed) > limit or waiting > 0)
