"""The daemon's one database writer: every Store call runs on a single dedicated thread.

``await store.save_poll(...)`` behaves like ``Store.save_poll`` but never blocks the event loop,
and since only this thread holds the connection, concurrent tasks can never interleave writes,
lock each other out or corrupt the file.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from storage.store import Store


class AsyncStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-writer")
        self._store: Store | None = None

    async def open(self) -> "AsyncStore":
        loop = asyncio.get_running_loop()
        self._store = await loop.run_in_executor(self._executor, Store.open, self.path)
        return self

    async def close(self) -> None:
        if self._store is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._store.close)
            self._store = None
        self._executor.shutdown(wait=True)

    async def call(self, fn, *args, **kwargs) -> Any:
        """Run ``fn(store, *args, **kwargs)`` on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, self._store, *args, **kwargs))

    def __getattr__(self, name: str):
        method = getattr(Store, name, None)
        if method is None or name.startswith("_"):
            raise AttributeError(name)

        async def run(*args, **kwargs):
            return await self.call(method, *args, **kwargs)

        run.__name__ = name
        return run
