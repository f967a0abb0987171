"""Exemplars: labelled examples per attribute label for few-shot scoring

- ``exemplars``: one row per (product, attribute, label) a person vouched for: a review approval or correction,
  or a CLI import. Removed with the product (ON DELETE CASCADE). The row holds no features: scoring joins
  ``embeddings.image_features`` of the configured model, so an exemplar follows its product's current image,
  works for any model that has encoded it, and no second copy of 1280 numbers per exemplar can go stale.
- ``tags.exemplars``: how many of the attribute's exemplars contributed to a machine tag (0: zero-shot only).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE exemplars (
            id          bigserial PRIMARY KEY,
            sku         text NOT NULL REFERENCES products(sku) ON DELETE CASCADE,
            taxonomy    text NOT NULL,
            attribute   text NOT NULL,
            label       text NOT NULL,
            source      text NOT NULL CHECK (source IN ('review_approval', 'review_correction', 'import')),
            created_by  text,
            created_at  timestamptz NOT NULL DEFAULT now(),
            UNIQUE (sku, attribute, label)
        )
        """
    )
    op.execute("CREATE INDEX exemplars_attribute_label ON exemplars (attribute, label)")
    op.execute("COMMENT ON TABLE exemplars IS 'labelled examples per attribute label (few-shot scoring); features "
               "are read from embeddings.image_features'")
    op.execute("ALTER TABLE tags ADD COLUMN exemplars integer NOT NULL DEFAULT 0")
    op.execute("COMMENT ON COLUMN tags.exemplars IS 'exemplars of the attribute that contributed to this machine tag; "
               "0: zero-shot only'")


def downgrade() -> None:
    op.execute("ALTER TABLE tags DROP COLUMN IF EXISTS exemplars")
    op.execute("DROP TABLE IF EXISTS exemplars")
