"""Previous and next on the gallery's Picture page, in the order of the list it was opened from.

A card on *For you* or *Rated* links to its picture with ``?from=for-you`` (or ``rated``), the
list's filters and ``at``, the card's position in the list. The Picture page looks for the
picture in the pages of that list around ``at`` (the list as it is now: a rating takes a picture
off *For you*, and moves it to the top of *Rated*) and links to its neighbours there; a picture
no longer in the list is followed by the one now in its place. Opened from anywhere else, the
neighbours are the pictures before and after it by id.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

LISTS = {"for-you": ("/", ("character",)), "rated": ("/rated", ("rating", "source", "character"))}
MAX_AT = 10 ** 9                       # a position beyond is no position (and its offset fits SQLite)


@dataclass
class Origin:
    """The list a Picture page was opened from: its name (a key of ``LISTS``, or "" for none),
    its filters and the picture's position ``at`` in it."""
    name: str = ""
    filters: dict[str, str] = field(default_factory=dict)
    at: int = 0

    @classmethod
    def from_query(cls, query) -> Origin:
        """From a request's query (``from``, ``at`` and the list's filters); anything unknown or
        malformed is no list (the neighbours by id)."""
        name = query.get("from", "")
        if name not in LISTS:
            return cls()
        try:
            at = int(query.get("at", "0"))
        except ValueError:
            at = 0
        filters = {k: query[k] for k in LISTS[name][1] if query.get(k)}
        return cls(name, filters, min(MAX_AT, max(0, at)))

    def query(self, at: int) -> dict[str, str | int]:
        """The query parameters that open a picture at position ``at`` of this list."""
        return {"from": self.name, **self.filters, "at": at} if self.name else {}

    def back(self, size: int) -> str | None:
        """The address of the list's page this position is on (None without a list)."""
        if not self.name:
            return None
        params = dict(self.filters)
        if self.at >= size:
            params["page"] = str(self.at // size + 1)
        return LISTS[self.name][0] + ("?" + urlencode(params) if params else "")


@dataclass
class Step:
    """A neighbour: the picture's id and its position in the list (for its own links)."""
    id: int
    at: int


def neighbours(image_id: int, at: int, size: int,
               page_ids: Callable[[int], list[int]]) -> tuple[Step | None, Step | None]:
    """(previous, next) of ``image_id`` in a list whose page ``n`` (``size`` pictures) is
    ``page_ids(n)``, looked for on the page of position ``at`` and, only where needed (the
    picture is first or last there, or not on it), the pages either side."""
    page = at // size
    pages: dict[int, list[int]] = {}

    def ids_of(n: int) -> list[int]:
        if n < 0:
            return []
        if n not in pages:
            pages[n] = page_ids(n)
        return pages[n]

    def at_position(pos: int) -> Step | None:
        if pos < 0:
            return None
        ids = ids_of(pos // size)
        i = pos - (pos // size) * size
        return Step(ids[i], pos) if i < len(ids) else None

    here = ids_of(page)
    if image_id in here:
        pos = page * size + here.index(image_id)
        return at_position(pos - 1), at_position(pos + 1)
    for n in (page - 1, page + 1):                 # moved by a page's worth of changes
        if image_id in ids_of(n):
            pos = n * size + ids_of(n).index(image_id)
            return at_position(pos - 1), at_position(pos + 1)
    # it left the list: the one now in its place comes next
    return at_position(at - 1), at_position(at)
