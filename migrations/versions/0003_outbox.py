"""Transactional outbox: every event is recorded in Postgres before it reaches the broker, and a PIM that
shares the database can write products into ``pim_products`` and have events made by a trigger.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE outbox (
            id             bigserial PRIMARY KEY,
            event_id       text NOT NULL UNIQUE,
            sku            text NOT NULL,
            event          jsonb NOT NULL,
            source         text NOT NULL DEFAULT 'publish',
            received_at    timestamptz NOT NULL DEFAULT now(),
            sent_at        timestamptz,
            send_attempts  integer NOT NULL DEFAULT 0,
            deliveries     integer NOT NULL DEFAULT 0,
            processed_at   timestamptz,
            outcome        text
        )
        """
    )
    op.execute("COMMENT ON TABLE outbox IS 'events recorded before delivery; the relay sends unsent rows and "
               "re-sends rows whose processing never completed (lost broker messages)'")
    op.execute("COMMENT ON COLUMN outbox.deliveries IS 'times a worker started the event; an event that kills its "
               "worker every time is given up after a few'")
    op.execute("CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL")
    op.execute("CREATE INDEX outbox_unprocessed ON outbox (sent_at) WHERE sent_at IS NOT NULL AND processed_at IS NULL")
    op.execute("CREATE INDEX outbox_sku ON outbox (sku)")
    # Wake the relay at once instead of waiting for its next poll.
    op.execute(
        """
        CREATE FUNCTION tagger_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('tagger_outbox', NEW.id::text);
            RETURN NEW;
        END $$
        """
    )
    op.execute("CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION tagger_outbox_notify()")

    # A table a PIM may write to directly; each change becomes an outbox event in the same transaction.
    op.execute(
        """
        CREATE TABLE pim_products (
            sku          text PRIMARY KEY,
            title        text NOT NULL DEFAULT '',
            description  text NOT NULL DEFAULT '',
            brand        text,
            image        text,
            attributes   jsonb NOT NULL DEFAULT '{}'::jsonb,
            updated_at   timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE FUNCTION tagger_pim_products_event() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            row_data pim_products;
            kind text;
            body jsonb;
            eid text := md5(random()::text || clock_timestamp()::text);
        BEGIN
            IF TG_OP = 'DELETE' THEN
                row_data := OLD; kind := 'product.deleted';
                body := jsonb_build_object('type', kind, 'sku', OLD.sku);
            ELSE
                row_data := NEW;
                kind := CASE WHEN TG_OP = 'INSERT' THEN 'product.created' ELSE 'product.updated' END;
                body := jsonb_strip_nulls(jsonb_build_object(
                    'type', kind, 'sku', NEW.sku, 'title', NEW.title, 'description', NEW.description,
                    'brand', NEW.brand, 'image', NEW.image, 'attributes', NEW.attributes));
            END IF;
            body := body || jsonb_build_object('id', eid, 'occurred_at',
                                               to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
            INSERT INTO outbox (event_id, sku, event, source) VALUES (eid, row_data.sku, body, 'trigger');
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER pim_products_event AFTER INSERT OR UPDATE OR DELETE ON pim_products
        FOR EACH ROW EXECUTE FUNCTION tagger_pim_products_event()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS pim_products_event ON pim_products")
    op.execute("DROP FUNCTION IF EXISTS tagger_pim_products_event()")
    op.execute("DROP TABLE IF EXISTS pim_products")
    op.execute("DROP TRIGGER IF EXISTS outbox_notify ON outbox")
    op.execute("DROP FUNCTION IF EXISTS tagger_outbox_notify()")
    op.execute("DROP TABLE IF EXISTS outbox")
