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


def create_database(server_url: str, name: str) -> str:
    """Create (or re-create, empty) database ``name`` on the server of ``server_url``; returns its URL.
    Used by tests and benchmarks to work in a database of their own."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    admin = make_engine(server_url, register_vectors=False)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(normalise_url(server_url)).set(database=name).render_as_string(hide_password=False)
