"""Running the Alembic migrations from code (`tagger migrate`) and checking the schema fits the model."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from tagger.db.engine import get_engine, normalise_url
from tagger.errors import ConfigurationError, SchemaMismatch
from tagger.settings import REPO_ROOT

# A source checkout has migrations/ beside the package; a container runs from a folder that holds it.
MIGRATIONS_DIR = next((p for p in (REPO_ROOT / "migrations", Path.cwd() / "migrations") if (p / "env.py").is_file()),
                      REPO_ROOT / "migrations")


def alembic_config(database_url: str, embedding_dim: int) -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise ConfigurationError(f"migrations not found at {MIGRATIONS_DIR}; install tagger from a source checkout "
                                 "(pip install -e .) so that migrations/ is beside the package")
    config = Config(str(REPO_ROOT / "alembic.ini")) if (REPO_ROOT / "alembic.ini").is_file() else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = normalise_url(database_url)
    config.attributes["embedding_dim"] = embedding_dim
    return config


def upgrade(database_url: str, embedding_dim: int, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url, embedding_dim), revision)
    check_dimension(database_url, embedding_dim)


def downgrade(database_url: str, embedding_dim: int, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url, embedding_dim), revision)


def current_revision(database_url: str) -> str | None:
    with get_engine(database_url).connect() as conn:
        exists = conn.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL")).scalar()
        if not exists:
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def stored_dimension(database_url: str) -> int | None:
    """The dimension of embeddings.image_embedding, or None before the first migration."""
    with get_engine(database_url).connect() as conn:
        return conn.execute(text(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass('embeddings') "
            "AND attname = 'image_embedding'")).scalar()


def check_dimension(database_url: str, embedding_dim: int) -> None:
    stored = stored_dimension(database_url)
    if stored is not None and stored != embedding_dim:
        raise SchemaMismatch(
            f"the database stores {stored}-d embeddings but the configured model produces {embedding_dim}-d ones; "
            "use a separate database for this model (TAGGER_DATABASE_URL) or set TAGGER_MODEL back"
        )


def migrations_path() -> Path:
    return MIGRATIONS_DIR
