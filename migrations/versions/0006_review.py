"""Review page: decisions, duplicate verdicts, heat-map cache

- ``tags.decided_by`` / ``tags.decided_at``: who approved or rejected a tag on the review page, and when. A row a
  person decided has ``source = 'manual'`` and status ``approved`` or ``rejected``; machine re-tagging never
  touches it (``repository.MACHINE_TAG_CONFLICT``).
- ``review_decisions``: one row per decision (approve, reject, pick another label), with what the machine had
  proposed, for the agreement-over-time chart and the most-corrected labels.
- ``duplicate_verdicts``: a person's "same product" or "different" for a pair (``sku_a < sku_b``); the matcher
  never stores a pair marked different again (``repository.replace_duplicates``).
- ``review_heatmaps``: occlusion heat maps rendered as PNG, cached per product image, tag, label and model.
- ``catalog_tags``: the tags the catalog should show: a person's approved labels for an attribute where there are
  any, otherwise the machine's accepted and needs-review labels.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE tags ADD COLUMN decided_by text")
    op.execute("ALTER TABLE tags ADD COLUMN decided_at timestamptz")
    op.execute("COMMENT ON COLUMN tags.decided_by IS 'reviewer who approved or rejected this tag (source manual)'")
    op.execute(
        """
        CREATE TABLE review_decisions (
            id                bigserial PRIMARY KEY,
            sku               text NOT NULL REFERENCES products(sku) ON DELETE CASCADE,
            taxonomy          text NOT NULL,
            attribute         text NOT NULL,
            action            text NOT NULL CHECK (action IN ('approve', 'reject', 'pick')),
            machine_value     text,
            machine_score     real,
            machine_status    text,
            chosen_value      text,
            model_id          text,
            taxonomy_version  text,
            bulk              boolean NOT NULL DEFAULT false,
            decided_by        text NOT NULL,
            decided_at        timestamptz NOT NULL DEFAULT now(),
            CHECK ((action = 'reject') = (chosen_value IS NULL))
        )
        """
    )
    op.execute("COMMENT ON TABLE review_decisions IS 'one row per review decision; machine_* is what the machine "
               "proposed (its top label) when the person decided'")
    op.execute("CREATE INDEX review_decisions_sku ON review_decisions (sku, attribute)")
    op.execute("CREATE INDEX review_decisions_decided_at ON review_decisions (decided_at)")
    op.execute(
        """
        CREATE TABLE duplicate_verdicts (
            sku_a       text NOT NULL REFERENCES products(sku) ON DELETE CASCADE,
            sku_b       text NOT NULL REFERENCES products(sku) ON DELETE CASCADE,
            verdict     text NOT NULL CHECK (verdict IN ('same', 'different')),
            similarity  real,
            decided_by  text NOT NULL,
            decided_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (sku_a, sku_b),
            CHECK (sku_a < sku_b)
        )
        """
    )
    op.execute("CREATE INDEX duplicate_verdicts_sku_b ON duplicate_verdicts (sku_b)")
    op.execute(
        """
        CREATE TABLE review_heatmaps (
            sku          text NOT NULL REFERENCES products(sku) ON DELETE CASCADE,
            attribute    text NOT NULL,
            label        text NOT NULL,
            model_id     text NOT NULL,
            image_hash   text NOT NULL,
            png          bytea NOT NULL,
            base_score   real NOT NULL,
            max_drop     real NOT NULL,
            grid         smallint NOT NULL,
            seconds      real NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (sku, attribute, label, model_id, image_hash)
        )
        """
    )
    op.execute(
        """
        CREATE VIEW catalog_tags AS
            SELECT t.sku, t.taxonomy, t.attribute, t.value, t.path, t.score, t.status, t.source, t.model_id,
                   t.taxonomy_version, t.decided_by, t.decided_at
            FROM tags t
            WHERE t.status = 'approved'
               OR (t.status IN ('accepted', 'needs_review')
                   AND NOT EXISTS (SELECT 1 FROM tags p WHERE p.sku = t.sku AND p.attribute = t.attribute
                                   AND p.status = 'approved'))
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS catalog_tags")
    op.execute("DROP TABLE IF EXISTS review_heatmaps")
    op.execute("DROP TABLE IF EXISTS duplicate_verdicts")
    op.execute("DROP TABLE IF EXISTS review_decisions")
    op.execute("ALTER TABLE tags DROP COLUMN IF EXISTS decided_at")
    op.execute("ALTER TABLE tags DROP COLUMN IF EXISTS decided_by")
