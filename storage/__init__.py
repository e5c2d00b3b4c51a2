"""Storage: one SQLite file (sqlite-utils) and content-addressed media files."""
from storage.db import open_db, SCHEMA_VERSION
from storage.store import Store
from storage.writer import AsyncStore

__all__ = ["open_db", "SCHEMA_VERSION", "Store", "AsyncStore"]
