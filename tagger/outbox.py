"""The transactional outbox and its relay: no event is lost between a producer and a worker.

1. Producers (``publish``, the webhook, the ``pim_products`` trigger) insert events into ``outbox`` first.
   An event id makes the insert idempotent: a PIM retrying a webhook does not create a second row.
2. The relay sends unsent rows to the broker and marks them sent.
3. A worker that finished an event (processed, unchanged, skipped or recorded as failed) marks its row processed.
4. Rows sent long ago but never processed were lost on the way (a Redis restart drops its queue): the relay
   sends them again; processing is idempotent, so a duplicate does no harm. After ``max_attempts`` the event is
   recorded in ``failures`` and given up.
"""

from __future__ import annotations

import json
import logging
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, text

from tagger.db import repository as repo
from tagger.events import ProductEvent

log = logging.getLogger("tagger.outbox")

# Sends events to a broker queue: ``send(events, queue)``.
Sender = Callable[[Sequence[dict[str, Any]], str], None]


@dataclass(frozen=True)
class RelayStats:
    sent: int = 0
    resent: int = 0
    given_up: int = 0


def enqueue(conn: Connection, events: Sequence[ProductEvent], source: str) -> list[str]:
    """Record validated events (in the caller's transaction); returns their event ids."""
    rows = [{"event_id": e.id, "sku": e.sku, "event": json.dumps(e.to_message(), ensure_ascii=False), "source": source}
            for e in events]
    if rows:
        conn.execute(
            text("INSERT INTO outbox (event_id, sku, event, source) VALUES (:event_id, :sku, CAST(:event AS jsonb), "
                 ":source) ON CONFLICT (event_id) DO NOTHING"),
            rows,
        )
    return [str(r["event_id"]) for r in rows]


def mark_processed(conn: Connection, event_id: str, outcome: str) -> None:
    conn.execute(
        text("UPDATE outbox SET processed_at = now(), outcome = :outcome WHERE event_id = :id AND processed_at IS NULL"),
        {"id": event_id, "outcome": outcome},
    )


def relay_once(engine: Engine, send: Sender, *, batch: int = 500, redeliver_after_s: float = 60.0,
               max_attempts: int = 5, drained_at: datetime | None = None) -> RelayStats:
    """One pass: send unsent rows; re-send lost ones. Safe to run in several processes (SKIP LOCKED).

    A sent row counts as lost only if it was sent at least ``redeliver_after_s`` before ``drained_at``, a
    moment the broker queue was seen empty: it was no longer queued then, and had that long to be processed.
    With ``drained_at=None`` (the queue was never seen empty) nothing is re-sent, so a long backlog is never
    mistaken for lost messages.
    """
    sent = resent = given_up = 0
    while True:
        with engine.begin() as conn:
            rows = conn.execute(
                text("SELECT id, event, source FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT :n "
                     "FOR UPDATE SKIP LOCKED"),
                {"n": batch},
            ).all()
            if not rows:
                break
            _send_by_queue(send, [(r[1], r[2]) for r in rows])
            conn.execute(text("UPDATE outbox SET sent_at = now(), send_attempts = send_attempts + 1 "
                              "WHERE id = ANY(:ids)"), {"ids": [r[0] for r in rows]})
            sent += len(rows)
        if len(rows) < batch:
            break
    if drained_at is None:
        return RelayStats(sent, 0, 0)
    with engine.begin() as conn:
        stale = conn.execute(
            text("SELECT id, event, send_attempts, sku, event_id, source FROM outbox WHERE processed_at IS NULL "
                 "AND sent_at < CAST(:drained AS timestamptz) - make_interval(secs => :age) "
                 "ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED"),
            {"drained": drained_at, "age": redeliver_after_s, "n": batch},
        ).all()
        retry = [r for r in stale if r[2] < max_attempts]
        give_up = [r for r in stale if r[2] >= max_attempts]
        if retry:
            _send_by_queue(send, [(r[1], r[5]) for r in retry])
            conn.execute(text("UPDATE outbox SET sent_at = now(), send_attempts = send_attempts + 1 "
                              "WHERE id = ANY(:ids)"), {"ids": [r[0] for r in retry]})
            resent = len(retry)
        for row in give_up:
            repo.record_failure(conn, payload=row[1], sku=row[3], stage="delivery", error_class="DeliveryGaveUp",
                                message=f"event sent {row[2]} times and never processed; check the workers' logs",
                                event_id=row[4])
            mark_processed(conn, row[4], "gave_up")
        given_up = len(give_up)
    if resent or given_up:
        log.warning("relay re-sent %d lost event(s), gave up on %d", resent, given_up)
    return RelayStats(sent, resent, given_up)


def observe_drain(engine: Engine, queue_depth: Callable[[], int | None] | None,
                  previous: datetime | None) -> datetime | None:
    """The latest moment the broker queue was seen empty (database clock), or ``previous`` if it is not empty now.
    A broker whose depth cannot be read counts as drained: then re-sending relies on time alone."""
    depth = queue_depth() if queue_depth else None
    if depth:
        return previous
    with engine.connect() as conn:
        return conn.execute(text("SELECT now()")).scalar()


def reconcile(engine: Engine, model_id: str, taxonomy_versions: Sequence[str], *, limit: int = 1000) -> int:
    """Re-enqueue products whose embeddings or tags are missing or stale for the current model and taxonomy
    versions (and that have no event in flight), so a lost message is repaired without a person."""
    with engine.begin() as conn:
        rows = conn.execute(
            text(
                """
                SELECT p.sku, p.title, p.description, p.brand, p.image_ref, p.attributes
                FROM products p
                WHERE (NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.sku = p.sku AND e.model_id = :model_id)
                       OR NOT EXISTS (SELECT 1 FROM tags t WHERE t.sku = p.sku AND t.model_id = :model_id
                                      AND t.taxonomy_version = ANY(:versions)))
                  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.sku = p.sku AND o.processed_at IS NULL)
                ORDER BY p.sku
                LIMIT :limit
                """
            ),
            {"model_id": model_id, "versions": list(taxonomy_versions), "limit": limit},
        ).all()
        from tagger.events import new_event, parse_event

        events = [
            parse_event(new_event("product.updated", sku=sku, title=title, description=description, brand=brand,
                                  image=image, attributes=attributes or {}))
            for sku, title, description, brand, image, attributes in rows if image
        ]
        enqueue(conn, events, "reconcile")
    if events:
        log.warning("reconciliation re-enqueued %d product(s) with missing or stale results", len(events))
    return len(events)


def _send_by_queue(send: Sender, events: Sequence[tuple[dict[str, Any], str]]) -> None:
    from tagger.events import queue_for

    by_queue: dict[str, list[dict[str, Any]]] = {}
    for event, source in events:
        by_queue.setdefault(queue_for(source), []).append(event)
    for queue, queued in by_queue.items():
        send(queued, queue)


def celery_sender(batch_size: int | None = None) -> Sender:
    """Sends events as Celery tasks over one broker connection per call: groups of up to ``batch_size``
    events (default: the ``batch_size`` setting) as one ``tagger.process_events`` task, which the worker
    embeds in one forward pass; a lone event as ``tagger.process_event``."""
    from tagger.events import BATCH_TASK_NAME, TASK_NAME
    from tagger.worker.app import app

    if batch_size is None:
        from tagger.settings import get_settings

        batch_size = get_settings().batch_size
    size = max(1, batch_size)

    def send(events: Sequence[dict[str, Any]], queue: str) -> None:
        with app.producer_or_acquire() as producer:
            for start in range(0, len(events), size):
                chunk = list(events[start : start + size])
                if len(chunk) == 1:
                    app.send_task(TASK_NAME, args=[chunk[0]], queue=queue, producer=producer)
                else:
                    app.send_task(BATCH_TASK_NAME, args=[chunk], queue=queue, producer=producer)

    return send


def redis_queue_depth(broker_url: str, *queues: str) -> Callable[[], int | None]:
    """Messages waiting in the queues on a Redis broker, summed (None for other brokers or when Redis does not answer)."""

    def depth() -> int | None:
        if not broker_url.startswith(("redis://", "rediss://")):
            return None
        import redis

        try:
            client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
            return sum(int(client.llen(queue)) for queue in queues)
        except redis.RedisError:
            return None

    return depth


def run_relay(engine: Engine, send: Sender, *, poll_s: float = 2.0, redeliver_after_s: float = 60.0,
              max_attempts: int = 5, queue_depth: Callable[[], int | None] | None = None,
              reconcile_every_s: float = 60.0, reconcile_pass: Callable[[], int] | None = None,
              stop: Callable[[], bool] = lambda: False) -> None:
    """The relay loop: wakes on NOTIFY tagger_outbox or every ``poll_s``; survives broker and database outages."""
    listener = None
    drained_at: datetime | None = None
    next_reconcile = time.monotonic() + reconcile_every_s
    while not stop():
        try:
            if reconcile_pass is not None and time.monotonic() >= next_reconcile:
                next_reconcile = time.monotonic() + reconcile_every_s
                reconcile_pass()
            if listener is None:
                listener = engine.raw_connection()
                listener.driver_connection.autocommit = True  # type: ignore[union-attr]
                listener.driver_connection.execute("LISTEN tagger_outbox")  # type: ignore[union-attr]
            drained_at = observe_drain(engine, queue_depth, drained_at)
            relay_once(engine, send, redeliver_after_s=redeliver_after_s, max_attempts=max_attempts,
                       drained_at=drained_at)
            _wait_for_notify(listener, poll_s)
        except Exception as exc:  # noqa: BLE001 - the broker or the database is down: wait and try again
            log.warning("relay pass failed, retrying: %s", exc)
            if listener is not None:
                try:
                    listener.close()
                except Exception:  # noqa: BLE001
                    pass
                listener = None
            time.sleep(poll_s)


def _wait_for_notify(listener: Any, timeout_s: float) -> None:
    connection = listener.driver_connection
    ready, _, _ = select.select([connection.fileno()], [], [], timeout_s)
    if ready:
        for _ in connection.notifies(timeout=0):
            pass
