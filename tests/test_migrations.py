"""Alembic migrations against the real Postgres+pgvector: up, down, up again; dimension follows the model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import text

from tagger.db import migrate
from tagger.db.engine import make_engine
from tagger.errors import SchemaMismatch

TABLES = {"products", "embeddings", "tags", "duplicate_matches", "failures", "label_embeddings", "taxonomy_versions"}
VIEWS = {"duplicate_pairs", "product_tags"}


def objects(url: str) -> tuple[set[str], set[str], set[str], set[str]]:
    engine = make_engine(url, register_vectors=False)
    with engine.connect() as conn:
        tables = {r[0] for r in conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))}
        views = {r[0] for r in conn.execute(text("SELECT viewname FROM pg_views WHERE schemaname = 'public'"))}
        extensions = {r[0] for r in conn.execute(text("SELECT extname FROM pg_extension"))}
        indexes = {r[0] for r in conn.execute(text("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"))}
    engine.dispose()
    return tables, views, extensions, indexes


def test_upgrade_downgrade_upgrade(fresh_database: Callable[[], str]) -> None:
    url = fresh_database()
    migrate.upgrade(url, 512)
    tables, views, extensions, indexes = objects(url)
    assert TABLES <= tables and VIEWS <= views and "vector" in extensions
    assert {"embeddings_image_hnsw", "embeddings_text_hnsw"} <= indexes
    assert migrate.stored_dimension(url) == 512
    engine = make_engine(url, register_vectors=False)
    with engine.connect() as conn:
        method = conn.execute(text("SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam "
                                   "WHERE c.relname = 'embeddings_image_hnsw'")).scalar()
    engine.dispose()
    assert method == "hnsw"

    migrate.downgrade(url, 512, "base")
    tables, views, extensions, _ = objects(url)
    assert not (TABLES & tables) and not (VIEWS & views) and "vector" not in extensions
    assert migrate.current_revision(url) is None

    migrate.upgrade(url, 512)
    assert TABLES <= objects(url)[0]


def test_dimension_follows_the_model(fresh_database: Callable[[], str]) -> None:
    url = fresh_database()
    migrate.upgrade(url, 768)
    assert migrate.stored_dimension(url) == 768
    with pytest.raises(SchemaMismatch, match="768-d .* 512-d"):
        migrate.upgrade(url, 512)
