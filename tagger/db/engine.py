"""SQLAlchemy engines over psycopg 3, with pgvector's adapter registered on every connection."""

from __future__ import annotations

import threading

from pgvector.psycopg import register_vector
from sqlalchemy import Engine, create_engine, event

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def normalise_url(url: str) -> str:
    """SQLAlchemy URL with the psycopg 3 driver, whatever form the operator wrote."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, *, register_vectors: bool = True, pool_size: int = 2) -> Engine:
    engine = create_engine(normalise_url(url), pool_pre_ping=True, pool_size=pool_size, max_overflow=4,
                           pool_recycle=1800)
    if register_vectors:
        @event.listens_for(engine, "connect")
        def _register(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            try:
                register_vector(dbapi_connection)
            except Exception:  # noqa: BLE001 - the extension may not exist yet (before the first migration)
                dbapi_connection.rollback()

    return engine


def get_engine(url: str) -> Engine:
    """One engine per URL per process (each forked worker child creates its own)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = make_engine(url)
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Forget pooled connections, e.g. in a freshly forked child (connections must not cross a fork)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()
