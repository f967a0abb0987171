"""Batches inside the worker: one forward pass and one transaction for many events, with each event keeping
its own fate; and the queue split that keeps bulk loads from delaying live changes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tagger.db import migrate
from tagger.db.engine import get_engine
from tagger.errors import TransientError
from tagger.events import new_event, read_catalog
from tagger.pipeline import DELETED, FAILED, PROCESSED, STALE, UNCHANGED, Outcome, Pipeline
from tagger.settings import Settings
from tests.conftest import CATALOG, TaggerProcess, WorkerProcess, pipeline_settings, query_rows, query_value, wait_until

IMAGE = str(CATALOG.parent / "images" / "2227.jpg")
OTHER_IMAGE = str(CATALOG.parent / "images" / "2246.jpg")


@pytest.fixture
def pipeline(clean_db: str, image_dir: Path, tiny_clip_dir: Path) -> Pipeline:
    return Pipeline(pipeline_settings(clean_db, image_dir, model=str(tiny_clip_dir)))


def statuses(results: list[Outcome | TransientError]) -> list[str]:
    return [r.status if isinstance(r, Outcome) else type(r).__name__ for r in results]


def stored_results(url: str) -> dict[str, Any]:
    tags = query_rows(url, "SELECT sku, attribute, value, round(score::numeric, 4), rank, status FROM tags "
                           "ORDER BY 1, 2, 3")
    pairs = query_rows(url, "SELECT sku_a, sku_b, round(similarity::numeric, 4) FROM duplicate_matches ORDER BY 1, 2")
    return {"tags": tags, "pairs": pairs}


def test_a_batch_gives_each_event_its_own_outcome(pipeline: Pipeline, image_dir: Path) -> None:
    url = str(pipeline.settings.database_url)
    broken = image_dir / "batch-broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    payloads: list[Any] = [
        new_event("product.created", sku="B1", title="first", image=IMAGE, occurred_at="2026-01-01T00:10:00Z"),
        {"type": "product.created", "sku": "B2"},  # no image: invalid
        new_event("product.created", sku="B3", image="/etc/passwd"),  # outside the roots
        new_event("product.updated", sku="B1", title="older", image=OTHER_IMAGE, occurred_at="2026-01-01T00:05:00Z"),
        new_event("product.created", sku="B4", title="to delete", image=OTHER_IMAGE),
        new_event("product.deleted", sku="B4"),
        new_event("product.created", sku="B5", image=str(broken)),
        new_event("product.updated", sku="B1", title="newest", image=IMAGE, occurred_at="2026-01-01T00:20:00Z"),
    ]
    results = pipeline.handle_batch(payloads)
    assert statuses(results) == [PROCESSED, FAILED, FAILED, STALE, PROCESSED, DELETED, FAILED, PROCESSED]
    assert query_value(url, "SELECT title FROM products WHERE sku = 'B1'") == "newest"
    assert query_value(url, "SELECT count(*) FROM products WHERE sku IN ('B2', 'B3', 'B4', 'B5')") == 0
    failures = dict(query_rows(url, "SELECT sku, error_class FROM failures"))
    assert failures == {"B2": "InvalidEvent", "B3": "ImageNotAllowed", "B5": "ImageDecodeError"}
    # Features for exemplar scoring come from the same forward pass and are stored beside the embedding.
    assert query_value(url, "SELECT vector_dims(image_features::vector) FROM embeddings WHERE sku = 'B1'") > 0
    # Redelivering the whole batch changes nothing and records nothing new.
    before = stored_results(url)
    again = pipeline.handle_batch(payloads)
    assert statuses(again)[0] in (UNCHANGED, STALE) and statuses(again)[7] == UNCHANGED
    assert stored_results(url) == before
    assert query_value(url, "SELECT sum(attempts) FROM failures") == 6


def test_a_batch_stores_exactly_what_one_by_one_processing_stores(pipeline: Pipeline) -> None:
    url = str(pipeline.settings.database_url)
    events = list(read_catalog(CATALOG))[:24]
    assert statuses(pipeline.handle_batch(events)) == [PROCESSED] * len(events)
    batched = stored_results(url)
    with get_engine(url).begin() as conn:
        conn.execute(text("DELETE FROM products"))
    # A batch writes in SKU order (lock order); with the tiny model every product is a near-duplicate of
    # every other, so the top-k neighbour cut depends on write order: compare with the same order.
    for event in sorted(events, key=lambda e: e["sku"]):
        assert pipeline.handle(event).status == PROCESSED
    assert stored_results(url) == batched
    assert batched["tags"]


def test_old_rows_without_features_are_reencoded_once(pipeline: Pipeline) -> None:
    url = str(pipeline.settings.database_url)
    event = new_event("product.created", sku="OLD1", title="shirt", image=IMAGE)
    pipeline.handle(event)
    with get_engine(url).begin() as conn:
        conn.execute(text("UPDATE embeddings SET image_features = NULL"))
    assert pipeline.handle(event).status == PROCESSED
    assert query_value(url, "SELECT count(*) FROM embeddings WHERE image_features IS NOT NULL") == 1
    assert pipeline.handle(event).status == UNCHANGED


@pytest.mark.slow
def test_bulk_loads_do_not_delay_live_changes(server_settings: Settings, fresh_database: Any, image_dir: Path,
                                              tiny_clip_dir: Path, tmp_path: Path) -> None:
    """Two workers on different queues: a catalog load waits on `tagger.bulk` while a live update on
    `tagger.events` is done at once by the other worker."""
    url = fresh_database()
    migrate.upgrade(url, int(query_dim(tiny_clip_dir)))
    # A broker database of its own, so the session's worker (which consumes both queues) sees none of this.
    broker = re.sub(r"/\d*$", "", str(server_settings.broker_url)) + "/9"
    from tests.conftest import worker_env

    env = worker_env(server_settings, url, image_dir, TAGGER_BROKER_URL=broker, TAGGER_MODEL=str(tiny_clip_dir),
                     TAGGER_BATCH_SIZE="4")
    # The bulk load is queued first: 212 events, in batches of 4.
    ingest = TaggerProcess(["ingest", str(CATALOG)], env, tmp_path / "ingest.log")
    assert ingest.process.wait(timeout=120) == 0, ingest.log()
    ingest.stop()
    live_event = tmp_path / "live.jsonl"
    live_event.write_text('{"type": "product.updated", "sku": "LIVE-1", "title": "price drop", "image": "%s"}\n' % IMAGE)
    publish = TaggerProcess(["publish", str(live_event)], env, tmp_path / "publish.log")
    assert publish.process.wait(timeout=120) == 0, publish.log()
    publish.stop()
    total = query_value(url, "SELECT count(*) FROM outbox WHERE source = 'ingest'")
    assert total == len(list(read_catalog(CATALOG)))

    bulk = WorkerProcess(env, tmp_path / "bulk.log", concurrency=1, queues="tagger.bulk")
    live = WorkerProcess(env, tmp_path / "live.log", concurrency=1, queues="tagger.events")
    try:
        bulk.wait_ready()
        live.wait_ready()
        wait_until(lambda: query_value(url, "SELECT count(*) FROM embeddings WHERE sku = 'LIVE-1'"), 60,
                   "the live event", live)
        pending = query_value(url, "SELECT count(*) FROM outbox WHERE source = 'ingest' AND processed_at IS NULL")
        assert pending > total // 2, f"only {pending} of {total} bulk events were still waiting"
        wait_until(lambda: query_value(url, "SELECT count(*) FROM outbox WHERE processed_at IS NULL") == 0, 300,
                   "the bulk load", bulk)
    finally:
        bulk.stop()
        live.stop()
    assert "tagger.process_events" in bulk.log_path.read_text()  # the relay sent batches
    assert "LIVE-1" not in bulk.log_path.read_text()
    assert query_value(url, "SELECT count(*) FROM products") == total + 1


def query_dim(model_dir: Path) -> int:
    from tagger.encoders.base import model_dimension

    return model_dimension(str(model_dir))
