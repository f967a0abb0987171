"""Fixtures of the fault tests: their OWN embedded Postgres and Redis in a private temp dir (restarting them never
disturbs the rest of the suite), a fresh migrated database per test, many distinct product images, and a harness
that starts real worker and relay processes and stops every one of them at the end of the test, pass or fail."""

from __future__ import annotations

import hashlib
import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tagger.db import migrate
from tests.chaos.faultlib import ChaosServers, Harness, chaos_env, make_images
from tests.conftest import DIM, create_database


@pytest.fixture(scope="session")
def chaos_servers() -> Iterator[ChaosServers]:
    data_dir = Path(tempfile.mkdtemp(prefix="tagger-chaos-", dir="/tmp"))
    servers = None
    try:
        servers = ChaosServers.start(data_dir)
        yield servers
    finally:
        if servers is not None:
            servers.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def chaos_db(chaos_servers: ChaosServers, request: pytest.FixtureRequest) -> str:
    name = "chaos_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]
    url = create_database(chaos_servers.server_url, name)
    migrate.upgrade(url, DIM)
    return url


@pytest.fixture(scope="session")
def chaos_images() -> Iterator[list[Path]]:
    directory = Path(tempfile.mkdtemp(prefix="tagger-chaos-img-", dir="/tmp"))
    try:
        yield make_images(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


_broker_dbs = itertools.cycle(range(1, 16))


@pytest.fixture
def harness(chaos_servers: ChaosServers, chaos_db: str, chaos_images: list[Path], tiny_clip_dir: Path,
            tmp_path: Path) -> Iterator[Harness]:
    h = Harness(chaos_servers, chaos_db, chaos_env(chaos_servers, chaos_db, chaos_images[0].parent, tiny_clip_dir,
                                                    broker_db=next(_broker_dbs)),
                tmp_path)
    try:
        yield h
    finally:
        h.close()
