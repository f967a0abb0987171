"""Taxonomy apply: which version of each taxonomy is applied, when, and a log of every apply.

- ``taxonomy_versions.applied_at``: when a version was last made the applied one (NULL: stored but never applied,
  e.g. seen by a worker before anyone ran ``tagger taxonomy apply``).
- ``taxonomy_state``: one row per taxonomy, the version ``tagger taxonomy apply`` last applied; ``tagger taxonomy
  diff`` compares the files on disk with it.
- ``taxonomy_applies``: one row per apply that changed something (versions, plan, counts, timing).
- ``tags`` gets fillfactor 70 so that re-tagging can update rows in place (HOT updates).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Re-tagging rewrites score/rank/version of many tag rows; free space on each page lets Postgres update them
    # in place (HOT: no new index entries) when no indexed column changes. Applies to pages written from now on.
    op.execute("ALTER TABLE tags SET (fillfactor = 70)")
    op.execute("ALTER TABLE taxonomy_versions ADD COLUMN applied_at timestamptz")
    op.execute(
        """
        CREATE TABLE taxonomy_state (
            taxonomy    text PRIMARY KEY,
            version     text NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now(),
            FOREIGN KEY (taxonomy, version) REFERENCES taxonomy_versions (taxonomy, version)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE taxonomy_applies (
            id            bigserial PRIMARY KEY,
            from_versions jsonb NOT NULL,
            to_versions   jsonb NOT NULL,
            model_id      text,
            plan          jsonb NOT NULL,
            changes       jsonb NOT NULL,
            products      integer NOT NULL DEFAULT 0,
            rows_written  integer NOT NULL DEFAULT 0,
            rows_deleted  integer NOT NULL DEFAULT 0,
            seconds       real NOT NULL DEFAULT 0,
            applied_at    timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS taxonomy_applies")
    op.execute("DROP TABLE IF EXISTS taxonomy_state")
    op.execute("ALTER TABLE taxonomy_versions DROP COLUMN IF EXISTS applied_at")
    op.execute("ALTER TABLE tags RESET (fillfactor)")
