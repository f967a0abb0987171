"""Alembic environment: online migrations against TAGGER_DATABASE_URL or the URL the CLI passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from tagger.db.engine import normalise_url

config = context.config


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from tagger import services
        from tagger.settings import get_settings

        url = services.database_url(get_settings())
    return normalise_url(url)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("tagger migrations run online only: set TAGGER_DATABASE_URL and run `tagger migrate`")
run_migrations_online()
