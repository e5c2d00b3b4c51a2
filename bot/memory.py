"""Keeping the daemon's memory near what it uses, on glibc (Linux).

glibc gives each thread that allocates its own malloc arena (up to 8 per core) and keeps freed
memory inside them: the daemon's worker threads (downloads, decoding, scoring) would otherwise
each hold the high-water mark of their largest picture for good. :func:`limit_arenas` caps the
arenas at two before the threads start, and :func:`trim` hands freed memory back to the system
after each scoring batch. Elsewhere (musl, macOS) both do nothing. Measured in bench/RESULTS.md
("Memory").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("tastefeed.daemon")
M_ARENA_MAX = -8      # mallopt's parameter number in glibc's malloc.h
ARENAS = 2

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else False
        except OSError:
            _libc = False
    return _libc or None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas (call before starting threads); False where not glibc."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, arenas) == 1)


def trim() -> None:
    """Hand memory freed inside malloc's arenas back to the system (glibc only)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
