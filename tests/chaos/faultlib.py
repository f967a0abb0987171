"""Building blocks of the fault tests, shared with bench/burst.py: embedded servers that can be restarted, worker
and relay subprocesses, event generation and the end-state verification."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Engine, text

from tagger import services
from tagger.db.engine import make_engine
from tagger.settings import REPO_ROOT, Settings
from tests.conftest import SAMPLES, TaggerProcess, WorkerProcess, worker_env

RESULTS = REPO_ROOT / "out" / "chaos" / "results.jsonl"
SAMPLE_IMAGES = SAMPLES / "catalog" / "images"
OK_OUTCOMES = ("processed", "unchanged", "stale", "deleted")


# ---- embedded servers of our own ------------------------------------------------------------------------------


@dataclass
class ChaosServers:
    base: Settings  # data_dir only: the embedded servers live there
    server_url: str
    broker_url: str
    redis_port: int

    @classmethod
    def start(cls, data_dir: Path) -> ChaosServers:
        base = Settings(data_dir=data_dir, database_url=None, broker_url=None)
        resolved = services.resolve(base)
        port = services._read_int(base.redis_dir / services.REDIS_PORT_FILE)
        assert port is not None
        return cls(base, str(resolved.database_url), str(resolved.broker_url), port)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            services.stop_embedded(self.base)

    def restart_redis(self, down_s: float = 1.0) -> None:
        """Stop the embedded Redis (its queues are lost: no snapshots) and start it again on the SAME port, so that
        workers and relay, whose broker URL names that port, can reconnect. (``services._ensure_redis`` would pick a
        new free port.)"""
        redis_dir = self.base.redis_dir
        with services._data_dir_lock(self.base):
            assert services._stop_redis(redis_dir) is not None, "embedded Redis was not running"
        time.sleep(down_s)
        with services._data_dir_lock(self.base):
            pid = services._start_redis_once(services._redis_server_path(), redis_dir, self.redis_port,
                                             redis_dir / services.REDIS_LOG_FILE)
            assert pid is not None, f"Redis did not restart on port {self.redis_port}"
            (redis_dir / services.REDIS_PORT_FILE).write_text(f"{self.redis_port}\n")

    def restart_postgres(self, down_s: float = 3.0) -> None:
        with services._data_dir_lock(self.base):
            assert services._stop_postgres(self.base.pg_dir) is not None, "embedded Postgres was not running"
        time.sleep(down_s)
        with services._data_dir_lock(self.base):
            url = services._ensure_postgres(self.base)
        assert url == self.server_url, f"Postgres came back at {url}, not {self.server_url}"


def make_images(directory: Path, n: int = 120, size: int = 96) -> list[Path]:
    """``n`` distinct small product images: sample photos, shrunk, each with its own coloured mark."""
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    sources = sorted(SAMPLE_IMAGES.glob("*.jpg"))
    paths = []
    for i in range(n):
        with Image.open(sources[i % len(sources)]) as img:
            im = img.convert("RGB")
        im.thumbnail((size, size))
        draw = ImageDraw.Draw(im)
        x, y = (i * 7) % max(1, im.width - 10), (i * 13) % max(1, im.height - 10)
        draw.rectangle((x, y, x + 9, y + 9), fill=((i * 37) % 256, (i * 91) % 256, (i * 53 + 40) % 256))
        path = directory / f"chaos-{i:03d}.jpg"
        im.save(path, quality=90)
        paths.append(path)
    return paths


def chaos_env(servers: ChaosServers, db_url: str, image_root: Path, model_dir: Path, broker_db: int = 0,
              **extra: str) -> dict[str, str]:
    """Environment of the workers, relay and producers of one run. ``broker_db`` picks a Redis database of its own,
    so that messages a previous run left behind (a dead worker's unacked ones come back after the visibility timeout)
    are never delivered into this run's database."""
    broker_url = servers.broker_url.rsplit("/", 1)[0] + f"/{broker_db}"
    import redis

    redis.Redis.from_url(broker_url).flushdb()
    return worker_env(servers.base.with_overrides(broker_url=broker_url), db_url, image_root,
                      TAGGER_MODEL=str(model_dir), TAGGER_DEVICE="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      # Short limits so that a dead worker's messages come back sooner (visibility timeout =
                      # 2 x hard limit, at least 60 s, in tagger/worker/app.py); tiny-CLIP tasks take milliseconds.
                      TAGGER_TASK_TIME_LIMIT_S="10", TAGGER_TASK_SOFT_TIME_LIMIT_S="8",
                      TAGGER_MAX_RETRIES="6", TAGGER_RETRY_BACKOFF_MAX_S="2", TAGGER_WORKER_CONCURRENCY="2",
                      **extra)


# ---- processes -------------------------------------------------------------------------------------------------


class RelayProcess(TaggerProcess):
    """A ``tagger relay`` subprocess."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        super().__init__(["relay", *args], env, log_path)


def kill_group(pid: int) -> None:
    """SIGKILL a process group we started (a worker parent and its pool children)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        psutil.Process(pid).wait(timeout=10)


def pool_children(worker: WorkerProcess) -> list[psutil.Process]:
    try:
        return psutil.Process(worker.process.pid).children()
    except psutil.NoSuchProcess:
        return []


@dataclass
class Harness:
    """What one fault run started; ``close`` stops all of it (fixtures call it even when the test fails)."""

    servers: ChaosServers
    db_url: str
    env: dict[str, str]
    logs: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    relays: list[RelayProcess] = field(default_factory=list)
    _engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.db_url)
        return self._engine

    def start_worker(self, concurrency: int = 2, wait: bool = True, **env: str) -> WorkerProcess:
        w = WorkerProcess({**self.env, **env}, self.logs / f"worker-{len(self.workers)}.log", concurrency=concurrency)
        self.workers.append(w)
        if wait:
            w.wait_ready(timeout_s=180)
        return w

    def start_relay(self, *args: str) -> RelayProcess:
        r = RelayProcess(self.env, self.logs / f"relay-{len(self.relays)}.log", *args)
        self.relays.append(r)
        return r

    def publish(self, events: list[dict[str, Any]], *, validate: bool = True) -> None:
        """Publish from a separate producer process, as a PIM integration would (``tagger.events.publish``)."""
        path = self.logs / f"events-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(events))
        code = ("import json, sys; from tagger.events import publish; "
                "publish(json.load(open(sys.argv[1])), validate=sys.argv[2] == '1')")
        result = subprocess.run([sys.executable, "-c", code, str(path), "1" if validate else "0"], env=self.env,
                                cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"publish failed:\n{result.stdout}\n{result.stderr}"

    def q(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())

    def processed_count(self, event_ids: list[str]) -> int:
        try:
            return int(self.q("SELECT count(*) FROM outbox WHERE event_id = ANY(:ids) AND processed_at IS NOT NULL",
                              ids=event_ids)[0][0])
        except Exception:  # noqa: BLE001 - the database may be restarting
            return -1

    def wait_processed(self, event_ids: list[str], timeout_s: float, at_least: int | None = None) -> float:
        """Seconds until ``at_least`` (default: all) of the events' outbox rows are processed."""
        goal = len(event_ids) if at_least is None else at_least
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            if self.processed_count(event_ids) >= goal:
                return time.monotonic() - start
            for w in self.workers[-1:]:
                if w.process.poll() is not None:
                    raise AssertionError(f"worker exited with {w.process.returncode}\n{self.diagnostics()}")
            time.sleep(0.25)
        return -1.0

    def diagnostics(self) -> str:
        parts = []
        for w in self.workers:
            parts.append(f"--- {w.log_path.name}\n{w.log()[-2500:]}")
        for r in self.relays:
            parts.append(f"--- {r.log_path.name}\n{r.log()[-2000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                kill_group(w.process.pid)
            with contextlib.suppress(Exception):
                w.stop()
        for r in self.relays:
            with contextlib.suppress(Exception):
                r.stop()
        if self._engine is not None:
            self._engine.dispose()


# ---- events ----------------------------------------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def product_event(sku: str, image: Path, version: int = 0, *, type_: str = "product.created") -> dict[str, Any]:
    colour = ("Navy", "Red", "Black", "White", "Green")[version % 5]
    return {"type": type_ if version == 0 else "product.updated", "sku": sku, "id": uuid.uuid4().hex,
            "title": f"{colour} shirt {sku} v{version}", "description": f"Cotton, revision {version}",
            "brand": "Chaos", "image": str(image), "attributes": {"version": version},
            "occurred_at": (T0 + timedelta(seconds=version)).isoformat()}


def created_events(prefix: str, images: list[Path], n: int) -> list[dict[str, Any]]:
    return [product_event(f"{prefix}-{i:05d}", images[i % len(images)]) for i in range(n)]


def burst_events(prefix: str, images: list[Path], products: int, versions: int, seed: int = 7) -> list[dict[str, Any]]:
    """``products`` × ``versions`` events (created, then updates with other titles and later occurred_at),
    shuffled so that older events of a SKU often arrive after newer ones."""
    events = [product_event(f"{prefix}-{p:05d}", images[p % len(images)], v)
              for p in range(products) for v in range(versions)]
    random.Random(seed).shuffle(events)
    return events


def newest_per_sku(events: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    newest: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["sku"] not in newest or e["occurred_at"] > newest[e["sku"]]["occurred_at"]:
            newest[e["sku"]] = e
    return newest


def text_hash(event: dict[str, Any]) -> str:
    text_ = ". ".join(p for p in (event.get("title", "").strip(), event.get("description", "").strip()) if p)
    return hashlib.sha256((text_ or event["sku"]).encode()).hexdigest()


# ---- verification ----------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    sent: int
    correct: int  # events whose outbox row closed successfully and whose SKU ended in the right state
    lost: int  # events never processed (or given up / failed) plus SKUs whose product is missing
    products: int
    products_correct: int
    problems: list[str]
    bad_skus: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return self.correct == self.sent and self.lost == 0 and not self.problems


def verify(h: Harness, events: list[dict[str, Any]], *, outbox: bool = True) -> Verdict:
    """Check the end state against the newest event of every SKU: one embedding row per SKU and model whose hashes
    match the newest event, one rank-1 tag per attribute (and a category), matches that are unique, point at stored
    products and agree with the current embeddings, every outbox row processed, nothing extra."""
    expected = newest_per_sku(events)
    problems: list[str] = []
    bad: set[str] = set()

    def flag(sku: str, what: str) -> None:
        bad.add(sku)
        if len(problems) < 30:
            problems.append(f"{sku}: {what}")

    products = {r[0]: r for r in h.q("SELECT sku, title, image_ref, text_hash, image_hash, last_event_at "
                                     "FROM products")}
    embeddings: dict[str, list[Any]] = defaultdict(list)
    for r in h.q("SELECT sku, model_id, image_hash, text_hash FROM embeddings"):
        embeddings[r[0]].append(r)
    models = {r[1] for rows in embeddings.values() for r in rows}
    if len(models) > 1:
        problems.append(f"embeddings of several models: {sorted(models)}")
    tag_counts: dict[str, dict[str, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
    for sku, attribute, rank, count in h.q("SELECT sku, attribute, rank, count(*) FROM tags "
                                           "GROUP BY sku, attribute, rank"):
        tag_counts[sku][attribute][rank] = count
    for sku in set(products) - set(expected):
        flag(sku, "a product nobody sent")
    for sku, event in expected.items():
        p = products.get(sku)
        if p is None:
            flag(sku, "product missing")
            continue
        if p[1] != event["title"] or p[2] != event["image"]:
            flag(sku, f"product shows {p[1]!r}, newest event says {event['title']!r}")
        if p[5] is None or p[5] != datetime.fromisoformat(event["occurred_at"]):
            flag(sku, f"last_event_at {p[5]} != newest occurred_at {event['occurred_at']}")
        rows = embeddings.get(sku, [])
        if len(rows) != 1:
            flag(sku, f"{len(rows)} embedding rows")
        elif (rows[0][2], rows[0][3]) != (p[4], p[3]) or rows[0][3] != text_hash(event):
            flag(sku, "embedding does not match the newest event's image/text")
        attributes = tag_counts.get(sku, {})
        if "category" not in attributes:
            flag(sku, "no category tag")
        for attribute, ranks in attributes.items():
            contiguous = sorted(ranks) == list(range(1, len(ranks) + 1))
            if ranks.get(1) != 1 or any(c != 1 for c in ranks.values()) or not contiguous:
                flag(sku, f"attribute {attribute} has ranks {ranks}")
    # Matches: unique per pair (primary key + sku_a < sku_b), both products stored, similarity = current cosine.
    for a, b, stored, current in h.q(
            "SELECT d.sku_a, d.sku_b, d.similarity, 1 - (ea.image_embedding <=> eb.image_embedding) "
            "FROM duplicate_matches d LEFT JOIN embeddings ea ON ea.sku = d.sku_a AND ea.model_id = d.model_id "
            "LEFT JOIN embeddings eb ON eb.sku = d.sku_b AND eb.model_id = d.model_id"):
        if current is None or abs(stored - current) > 1e-3:
            flag(a, f"match {a}~{b} stale or dangling ({stored} vs {current})")
            flag(b, f"match {a}~{b} stale or dangling ({stored} vs {current})")
    reversed_pairs = h.q("SELECT count(*) FROM duplicate_matches d JOIN duplicate_matches r "
                         "ON r.sku_a = d.sku_b AND r.sku_b = d.sku_a AND r.model_id = d.model_id")[0][0]
    if reversed_pairs:
        problems.append(f"{reversed_pairs} pairs stored in both directions")

    lost_ids: set[str] = set()
    outcome_of: dict[str, tuple[Any, Any]] = {}
    if outbox:
        outcome_of = {r[0]: (r[1], r[2]) for r in h.q("SELECT event_id, processed_at, outcome FROM outbox")}
        for e in events:
            row = outcome_of.get(e["id"])
            if row is None or row[0] is None or row[1] not in OK_OUTCOMES:
                lost_ids.add(e["id"])
        stuck = h.q("SELECT count(*) FROM outbox WHERE processed_at IS NULL")[0][0]
        if stuck:
            problems.append(f"{stuck} outbox rows never processed")
    missing = [s for s in expected if s not in products]
    open_failures = h.q("SELECT stage, error_class, count(*) FROM failures WHERE resolved_at IS NULL "
                        "GROUP BY 1, 2")
    if open_failures:
        problems.append(f"open failures: {open_failures}")
    correct = sum(1 for e in events if e["id"] not in lost_ids and e["sku"] not in bad)
    lost_ids |= {e["id"] for e in events if e["sku"] in missing}
    return Verdict(sent=len(events), correct=correct, lost=len(lost_ids), products=len(expected),
                   products_correct=len(expected) - len(bad & set(expected)), problems=problems,
                   bad_skus=sorted(bad))


def record(fault: str, verdict: Verdict, recovery_s: float, **extra: Any) -> str:
    line = (f"fault={fault} sent={verdict.sent} correct={verdict.correct} lost={verdict.lost} "
            f"recovery_s={recovery_s:.1f}")
    print(line, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps({"fault": fault, "sent": verdict.sent, "correct": verdict.correct, "lost": verdict.lost,
                             "recovery_s": round(recovery_s, 2), "products": verdict.products,
                             "products_correct": verdict.products_correct, "problems": verdict.problems[:10],
                             "at": datetime.now(UTC).isoformat(timespec="seconds"), **extra}) + "\n")
    return line


def poll(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return None
