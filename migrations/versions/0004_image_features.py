"""Backbone image features beside each embedding, for exemplar (few-shot) scoring.

Frozen backbone features separate a shop's own labels better than the projected embedding does, so
they are kept. ``halfvec`` without a fixed dimension: they are read per SKU, never indexed, and
their size depends on the model (1280 for the default model).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE embeddings ADD COLUMN image_features halfvec")
    op.execute("COMMENT ON COLUMN embeddings.image_features IS 'frozen backbone image features (exemplar scoring); "
               "NULL for rows written before revision 0004 until the product is re-encoded'")


def downgrade() -> None:
    op.execute("ALTER TABLE embeddings DROP COLUMN IF EXISTS image_features")
