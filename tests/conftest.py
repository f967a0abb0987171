"""Shared fixtures: real Postgres+pgvector and Redis (embedded unless TAGGER_TEST_DATABASE_URL /
TAGGER_TEST_BROKER_URL name servers), migrated databases, and real Celery worker processes."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tagger import services
from tagger.db import migrate
from tagger.db.engine import create_database, dispose_engines, get_engine
from tagger.settings import REPO_ROOT, Settings, set_settings

SAMPLES = REPO_ROOT / "samples"
CATALOG = SAMPLES / "catalog" / "catalog.jsonl"
BAD = SAMPLES / "bad"
DIM = 512
_db_counter = itertools.count()


@pytest.fixture(scope="session")
def server_settings() -> Iterator[Settings]:
    """One Postgres and one Redis for the whole test session, in a private data dir."""
    data_dir = Path(tempfile.mkdtemp(prefix="tagger-test-", dir="/tmp"))
    base = Settings(data_dir=data_dir, database_url=os.environ.get("TAGGER_TEST_DATABASE_URL") or None,
                    broker_url=os.environ.get("TAGGER_TEST_BROKER_URL") or None)
    resolved = services.resolve(base)
    # Code under test that reads settings from the environment (the Celery app, publish()) must use these
    # servers, never start its own under the user's data dir.
    saved = {k: os.environ.get(k) for k in ("TAGGER_DATABASE_URL", "TAGGER_BROKER_URL", "TAGGER_DATA_DIR")}
    os.environ.update({"TAGGER_DATABASE_URL": str(resolved.database_url), "TAGGER_BROKER_URL": str(resolved.broker_url),
                       "TAGGER_DATA_DIR": str(data_dir)})
    set_settings(None)
    try:
        yield resolved
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        set_settings(None)
        dispose_engines()
        services.stop_embedded(base)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def fresh_database(server_settings: Settings) -> Callable[[], str]:
    """Factory of new, empty (unmigrated) databases."""

    def factory() -> str:
        assert server_settings.database_url
        return create_database(server_settings.database_url, f"tagger_t{os.getpid()}_{next(_db_counter)}")

    return factory


@pytest.fixture(scope="session")
def database_url(server_settings: Settings) -> str:
    """A migrated database shared by the session; tests that need it empty use ``clean_db``."""
    assert server_settings.database_url
    url = create_database(server_settings.database_url, f"tagger_shared_{os.getpid()}")
    migrate.upgrade(url, DIM)
    # publish() and the relay read the database from the settings: point them at this migrated database.
    os.environ["TAGGER_DATABASE_URL"] = url
    set_settings(None)
    return url


TABLES = ("outbox", "pim_products", "taxonomy_applies", "failures", "duplicate_matches", "tags", "embeddings", "label_embeddings", "taxonomy_versions", "products")


@pytest.fixture
def clean_db(database_url: str) -> str:
    with get_engine(database_url).begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    return database_url


@pytest.fixture(scope="session")
def image_dir() -> Iterator[Path]:
    """A folder of images the tests write, allowed as an image root for workers and pipelines."""
    directory = Path(tempfile.mkdtemp(prefix="tagger-img-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def pipeline_settings(database_url: str, image_dir: Path, **overrides: Any) -> Settings:
    base = Settings(database_url=database_url, broker_url="redis://unused", image_roots=(SAMPLES, image_dir),
                    taxonomy_dir=REPO_ROOT / "taxonomies", data_dir=image_dir / "data")
    return base.with_overrides(**overrides) if overrides else base


@pytest.fixture(scope="session")
def tiny_clip_dir() -> Iterator[Path]:
    from tests.tiny_clip import make_tiny_clip

    directory = Path(tempfile.mkdtemp(prefix="tagger-clip-", dir="/tmp"))
    make_tiny_clip(directory / "tiny-clip")
    yield directory / "tiny-clip"
    shutil.rmtree(directory, ignore_errors=True)


# ---- real Celery workers ----------------------------------------------------------------------------


class TaggerProcess:
    """A `tagger <command>` subprocess in its own process group; its output goes to a log file shown on failure."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "tagger", *args], stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(REPO_ROOT))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM (warm shutdown), then SIGKILL of the whole group if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()


class WorkerProcess(TaggerProcess):
    """A `tagger worker` subprocess with its own environment."""

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int = 1, queues: str | None = None):
        args = ["worker", "--concurrency", str(concurrency), "--loglevel", "INFO"]
        super().__init__(args + (["--queues", queues] if queues else []), env, log_path)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if "ready." in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout_s}s:\n{self.log()}")


def worker_env(settings: Settings, database_url: str, image_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGGER_")}
    env.update({
        "TAGGER_DATABASE_URL": database_url,
        "TAGGER_BROKER_URL": str(settings.broker_url),
        "TAGGER_DATA_DIR": str(settings.data_dir),
        "TAGGER_TAXONOMY_DIR": str(REPO_ROOT / "taxonomies"),
        "TAGGER_IMAGE_ROOTS": os.pathsep.join([str(SAMPLES), str(image_dir)]),
        "TAGGER_MAX_RETRIES": "2",
        "TAGGER_RETRY_BACKOFF_MAX_S": "1",
        "TAGGER_FETCH_TIMEOUT_S": "3",
        "PYTHONUNBUFFERED": "1",
        # The offline default model unless a test run names another (e.g. a CLIP directory).
        "TAGGER_MODEL": os.environ.get("TAGGER_TEST_MODEL", "default"),
    })
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def worker(server_settings: Settings, database_url: str, image_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[WorkerProcess]:
    """One real worker process (default model) for the session, consuming the session's broker."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    process = WorkerProcess(worker_env(server_settings, database_url, image_dir), log_path)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def celery_publisher(server_settings: Settings) -> Callable[..., None]:
    """Sends raw payloads to the worker queue exactly as any producer would (no validation on this side)."""
    from tagger.events import QUEUE, TASK_NAME
    from tagger.worker.app import app

    assert app.conf.broker_url == server_settings.broker_url

    def send(payload: Any) -> None:
        app.send_task(TASK_NAME, args=[payload], queue=QUEUE)

    return send


def query_rows(url: str, sql: str, **params: Any) -> list[Any]:
    with get_engine(url).connect() as conn:
        return list(conn.execute(text(sql), params).all())


def query_value(url: str, sql: str, **params: Any) -> Any:
    rows = query_rows(url, sql, **params)
    return rows[0][0] if rows else None


def wait_until(predicate: Callable[[], Any], timeout_s: float = 60, what: str = "condition",
               worker: WorkerProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f"\nworker log:\n{worker.log()}" if worker else ""))
