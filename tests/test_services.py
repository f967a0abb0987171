"""The embedded Postgres+pgvector and Redis, against the real binaries.

Each test gets its own short data dir under /tmp (unix socket paths must stay under 107 bytes) and
a finalizer that stops, or at worst kills, every server the test started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import sqlalchemy

from tagger import services
from tagger.errors import ConfigurationError
from tagger.settings import REPO_ROOT, Settings


def _alive(pid: int) -> bool:
    """Live and not a zombie (PID 1 here does not reap killed servers)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))
    return state not in ("Z", "X")


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        time.sleep(0.05)


def _pids(settings: Settings) -> tuple[int | None, int | None]:
    status = services.embedded_status(settings)
    pg = status["postgres"]
    rd = status["redis"]
    assert isinstance(pg, dict) and isinstance(rd, dict)
    return pg["pid"], rd["pid"]


def _recorded_pids(data_dir: Path) -> list[int]:
    pids: list[int] = []
    for path in (data_dir / "postgres" / "postmaster.pid", data_dir / "redis" / "redis.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pids.append(int(path.read_text().split()[0]))
    return pids


@pytest.fixture
def settings() -> Iterator[Settings]:
    data_dir = Path(tempfile.mkdtemp(dir="/tmp", prefix="tg-svc-"))
    s = Settings(data_dir=data_dir)
    try:
        yield s
    finally:
        try:
            services.stop_embedded(s)
        finally:
            # Last resort when stopping failed: no server may outlive the test.
            for pid in _recorded_pids(data_dir):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(data_dir, ignore_errors=True)


def _check_postgres(url: str) -> None:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
            conn.execute(sqlalchemy.text("CREATE EXTENSION IF NOT EXISTS vector"))
            dist = conn.execute(sqlalchemy.text("SELECT '[1,0]'::vector <=> '[0,1]'::vector")).scalar()
            assert dist == pytest.approx(1.0)
    finally:
        engine.dispose()


def _check_redis(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        assert client.ping()
        client.set("tagger-test", "ok")
        assert client.get("tagger-test") == b"ok"
    finally:
        client.close()


def test_start_connect_reattach_stop(settings: Settings) -> None:
    resolved = services.resolve(settings)
    assert resolved.data_dir == settings.data_dir
    db_url, br_url = resolved.database_url, resolved.broker_url
    assert db_url is not None and db_url.startswith("postgresql+psycopg://")
    assert br_url is not None and br_url.startswith("redis://127.0.0.1:")
    assert not br_url.startswith("redis://127.0.0.1:6379/")

    _check_postgres(db_url)
    _check_redis(br_url)

    # The same URL works for psql (libpq) once the driver suffix is dropped, and for psycopg directly.
    psql = shutil.which("psql")
    if psql:
        out = subprocess.run(
            [psql, services.psql_url(db_url), "-tAc", "SELECT extname FROM pg_extension WHERE extname='vector'"],
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        )
        assert out.stdout.strip() == "vector"
    with psycopg.connect(services.psql_url(db_url)) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)

    pg_pid, redis_pid = _pids(settings)
    assert pg_pid and redis_pid and _alive(pg_pid) and _alive(redis_pid)

    # A second call re-attaches to the very same servers, fast.
    started = time.monotonic()
    again = services.resolve(settings)
    assert time.monotonic() - started < 1.0
    assert (again.database_url, again.broker_url) == (db_url, br_url)
    assert _pids(settings) == (pg_pid, redis_pid)

    stopped = services.stop_embedded(settings)
    assert len(stopped) == 2
    assert stopped[0].startswith("postgres") and stopped[1].startswith("redis")
    _wait_gone(pg_pid, 1.0)
    _wait_gone(redis_pid, 1.0)
    status = services.embedded_status(settings)
    assert status["postgres"]["running"] is False  # type: ignore[index]
    assert status["redis"]["running"] is False  # type: ignore[index]
    assert services.stop_embedded(settings) == []  # idempotent

    # And they come back after a clean stop (same cluster, new processes).
    restarted = services.resolve(settings)
    _check_postgres(restarted.database_url or "")
    _check_redis(restarted.broker_url or "")


def test_restart_after_kill_9(settings: Settings) -> None:
    services.resolve(settings)
    pg_pid, redis_pid = _pids(settings)
    assert pg_pid and redis_pid
    os.kill(pg_pid, signal.SIGKILL)
    os.kill(redis_pid, signal.SIGKILL)
    _wait_gone(pg_pid)
    _wait_gone(redis_pid)
    # Stale pid files remain (and the processes may linger as zombies) ...
    assert (settings.pg_dir / "postmaster.pid").exists()
    status = services.embedded_status(settings)
    assert status["postgres"]["running"] is False  # type: ignore[index]
    assert status["redis"]["running"] is False  # type: ignore[index]

    # ... yet the next call starts fresh servers instead of attaching to dead ones.
    resolved = services.resolve(settings)
    _check_postgres(resolved.database_url or "")
    _check_redis(resolved.broker_url or "")
    new_pg, new_redis = _pids(settings)
    assert new_pg and new_redis and new_pg != pg_pid and new_redis != redis_pid

    # stop_embedded after a kill -9 of both: cleans up, reports nothing, does not hang.
    for pid in (new_pg, new_redis):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
    assert services.stop_embedded(settings) == []
    assert not (settings.pg_dir / "postmaster.pid").exists()


def test_explicit_urls_are_untouched(settings: Settings) -> None:
    explicit = settings.with_overrides(
        database_url="postgresql+psycopg://u:p@db.example:5432/tagger", broker_url="redis://broker.example:6379/3"
    )
    assert services.database_url(explicit) == explicit.database_url
    assert services.broker_url(explicit) == explicit.broker_url
    assert services.resolve(explicit) == explicit
    assert not explicit.pg_dir.exists() and not explicit.redis_dir.exists()
    status = services.embedded_status(explicit)
    assert status["postgres"] == {  # nothing runs, and the embedded server is not the one in use
        "in_use": False,
        "running": False,
        "pid": None,
        "url": None,
        "data_dir": str(explicit.pg_dir),
        "log_file": str(explicit.pg_dir / "log"),
    }
    assert status["redis"]["in_use"] is False  # type: ignore[index]


_RACER = """
import json, sys, time
from pathlib import Path
from tagger import services
from tagger.settings import Settings
s = Settings(data_dir=Path(sys.argv[1]))
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
r = services.resolve(s)
print(json.dumps([r.database_url, r.broker_url]))
"""


def test_concurrent_start_makes_one_server_each(settings: Settings) -> None:
    go = time.time() + 1.5  # both racers are imported and waiting by then
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(settings.data_dir), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    # Both servers outlived the processes that started them ...
    pg_pid, redis_pid = _pids(settings)
    assert pg_pid is not None and redis_pid is not None
    _check_postgres(results[0][0])
    # ... and exactly one Redis serves this data dir: the URL's server reports the recorded pid.
    assert redis.Redis.from_url(results[0][1]).info("server")["process_id"] == redis_pid
    redis_servers = [
        p
        for p in os.listdir("/proc")
        if p.isdigit() and _alive(int(p)) and str(settings.redis_dir) in _proc_cwd(int(p))
    ]
    assert redis_servers == [str(redis_pid)]


def _proc_cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def test_start_failures_raise_configuration_error(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    fake = settings.data_dir / "fake-redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR (fake)'\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(services, "_redis_server_path", lambda: fake)
    with pytest.raises(ConfigurationError) as info:
        services.broker_url(settings)
    message = str(info.value)
    assert "redis.log" in message and "FATAL CONFIG FILE ERROR (fake)" in message
    assert "TAGGER_BROKER_URL" in message

    settings.pg_dir.write_text("not a directory")  # pgserver cannot use a file as its data dir
    with pytest.raises(ConfigurationError) as info:
        services.database_url(settings)
    assert "TAGGER_DATABASE_URL" in str(info.value)


def _zombie(name: str, where: Path) -> subprocess.Popen[bytes]:
    """A dead-but-unreaped child whose process name is ``name``, like a server killed under a PID 1
    that never reaps orphans. The caller keeps the Popen (holding it keeps the zombie) and reaps it."""
    exe = where / name
    shutil.copy("/bin/sleep", exe)
    proc = subprocess.Popen([str(exe), "60"])
    proc.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while "State:\tZ" not in Path(f"/proc/{proc.pid}/status").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def test_zombie_pid_files_are_treated_as_dead(settings: Settings) -> None:
    services.resolve(settings)
    pid_lines = (settings.pg_dir / "postmaster.pid").read_text().splitlines()
    old_port = (settings.redis_dir / "redis.port").read_text()
    services.stop_embedded(settings)

    scratch = Path(tempfile.mkdtemp(dir="/tmp", prefix="tg-z-"))
    zombies = [_zombie("postgres", scratch), _zombie("redis-server", scratch)]
    try:
        pg_z, redis_z = (z.pid for z in zombies)
        # What a kill -9 leaves behind: pid files (and the socket lock) naming a zombie.
        (settings.pg_dir / "postmaster.pid").write_text("\n".join([str(pg_z), *pid_lines[1:]]) + "\n")
        sock_dir, port = pid_lines[4].strip(), pid_lines[3].strip()
        Path(sock_dir, f".s.PGSQL.{port}.lock").write_text(f"{pg_z}\n")
        (settings.redis_dir / "redis.pid").write_text(f"{redis_z}\n")
        (settings.redis_dir / "redis.port").write_text(old_port)

        status = services.embedded_status(settings)
        assert status["postgres"]["running"] is False  # type: ignore[index]
        resolved = services.resolve(settings)
        _check_postgres(resolved.database_url or "")
        _check_redis(resolved.broker_url or "")
        new_pg, new_redis = _pids(settings)
        assert new_pg not in (None, pg_z) and new_redis not in (None, redis_z)
    finally:
        for z in zombies:
            z.wait()
        shutil.rmtree(scratch, ignore_errors=True)
