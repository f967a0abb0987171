"""Initial schema: pgvector, products, embeddings, taxonomy versions, label embeddings, tags,
near-duplicate matches, failures.

The vector dimension follows the configured model: `tagger migrate` passes it in as the
``embedding_dim`` attribute (TAGGER_EMBEDDING_DIM or 512 when run by plain alembic).

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import os

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _dim() -> int:
    configured = op.get_context().config.attributes.get("embedding_dim") if op.get_context().config else None
    dim = int(configured or os.environ.get("TAGGER_EMBEDDING_DIM") or 512)
    if not 1 <= dim <= 2000:  # HNSW indexes take at most 2000 dimensions of `vector`
        raise ValueError(f"embedding dimension {dim} is outside 1..2000 supported by pgvector HNSW")
    return dim


def upgrade() -> None:
    dim = _dim()
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute(
        """
        CREATE TABLE products (
            sku            text PRIMARY KEY,
            title          text NOT NULL DEFAULT '',
            description    text NOT NULL DEFAULT '',
            brand          text,
            image_ref      text,
            attributes     jsonb NOT NULL DEFAULT '{}'::jsonb,
            image_hash     text,
            text_hash      text,
            content_hash   text,
            last_event_at  timestamptz,
            created_at     timestamptz NOT NULL DEFAULT now(),
            updated_at     timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("COMMENT ON COLUMN products.content_hash IS 'sha256 over image bytes and product text'")
    op.execute("COMMENT ON COLUMN products.last_event_at IS 'occurred_at of the newest event applied; older events are skipped'")
    op.execute(
        f"""
        CREATE TABLE embeddings (
            sku              text NOT NULL REFERENCES products(sku) ON DELETE CASCADE,
            model_id         text NOT NULL,
            image_embedding  vector({dim}) NOT NULL,
            text_embedding   vector({dim}),
            image_hash       text NOT NULL,
            text_hash        text NOT NULL,
            created_at       timestamptz NOT NULL DEFAULT now(),
            updated_at       timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (sku, model_id)
        )
        """
    )
    op.execute("CREATE INDEX embeddings_image_hnsw ON embeddings USING hnsw (image_embedding vector_cosine_ops)")
    op.execute("CREATE INDEX embeddings_text_hnsw ON embeddings USING hnsw (text_embedding vector_cosine_ops)")
    op.execute(
        """
        CREATE TABLE taxonomy_versions (
            taxonomy    text NOT NULL,
            version     text NOT NULL,
            content     jsonb NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (taxonomy, version)
        )
        """
    )
    op.execute(
        f"""
        CREATE TABLE label_embeddings (
            model_id          text NOT NULL,
            taxonomy          text NOT NULL,
            taxonomy_version  text NOT NULL,
            attribute         text NOT NULL,
            label             text NOT NULL,
            embedding         vector({dim}) NOT NULL,
            prompts           jsonb NOT NULL,
            created_at        timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (model_id, taxonomy, taxonomy_version, attribute, label)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE tags (
            id                bigserial PRIMARY KEY,
            sku               text NOT NULL REFERENCES products(sku) ON DELETE CASCADE,
            taxonomy          text NOT NULL,
            attribute         text NOT NULL,
            value             text NOT NULL,
            score             real NOT NULL,
            rank              smallint NOT NULL,
            path              text,
            model_id          text,
            taxonomy_version  text,
            source            text NOT NULL DEFAULT 'machine' CHECK (source IN ('machine', 'manual')),
            status            text NOT NULL CHECK (status IN ('accepted', 'needs_review', 'alternative',
                                                              'approved', 'rejected')),
            created_at        timestamptz NOT NULL DEFAULT now(),
            updated_at        timestamptz NOT NULL DEFAULT now(),
            UNIQUE (sku, attribute, value)
        )
        """
    )
    op.execute("CREATE INDEX tags_attribute_value ON tags (attribute, value)")
    op.execute("CREATE INDEX tags_needs_review ON tags (attribute) WHERE status = 'needs_review'")
    op.execute(
        """
        CREATE TABLE duplicate_matches (
            sku_a       text NOT NULL REFERENCES products(sku) ON DELETE CASCADE,
            sku_b       text NOT NULL REFERENCES products(sku) ON DELETE CASCADE,
            model_id    text NOT NULL,
            similarity  real NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (sku_a, sku_b, model_id),
            CHECK (sku_a < sku_b)
        )
        """
    )
    op.execute("CREATE INDEX duplicate_matches_sku_b ON duplicate_matches (sku_b)")
    # Each pair is stored once (sku_a < sku_b); this view answers "duplicates of X" from either side.
    op.execute(
        """
        CREATE VIEW duplicate_pairs AS
            SELECT sku_a AS sku, sku_b AS duplicate_sku, similarity, model_id FROM duplicate_matches
            UNION ALL
            SELECT sku_b AS sku, sku_a AS duplicate_sku, similarity, model_id FROM duplicate_matches
        """
    )
    op.execute(
        """
        CREATE VIEW product_tags AS
            SELECT t.sku, t.taxonomy, t.attribute, t.value, t.path, t.score, t.status, t.source, t.model_id,
                   t.taxonomy_version
            FROM tags t
            WHERE t.status IN ('accepted', 'approved', 'needs_review')
        """
    )
    op.execute(
        """
        CREATE TABLE failures (
            id           bigserial PRIMARY KEY,
            fingerprint  text NOT NULL UNIQUE,
            event_id     text,
            sku          text,
            stage        text NOT NULL,
            error_class  text NOT NULL,
            message      text NOT NULL,
            payload      jsonb,
            attempts     integer NOT NULL DEFAULT 1,
            first_seen   timestamptz NOT NULL DEFAULT now(),
            last_seen    timestamptz NOT NULL DEFAULT now(),
            resolved_at  timestamptz
        )
        """
    )
    op.execute("CREATE INDEX failures_sku ON failures (sku)")
    op.execute("CREATE INDEX failures_open ON failures (last_seen) WHERE resolved_at IS NULL")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS failures")
    op.execute("DROP VIEW IF EXISTS product_tags")
    op.execute("DROP VIEW IF EXISTS duplicate_pairs")
    op.execute("DROP TABLE IF EXISTS duplicate_matches")
    op.execute("DROP TABLE IF EXISTS tags")
    op.execute("DROP TABLE IF EXISTS label_embeddings")
    op.execute("DROP TABLE IF EXISTS taxonomy_versions")
    op.execute("DROP TABLE IF EXISTS embeddings")
    op.execute("DROP TABLE IF EXISTS products")
    # The extension may be shared with other schemas in this database; dropping it only if nothing uses it.
    op.execute("DROP EXTENSION IF EXISTS vector RESTRICT")
