"""End to end through a real Celery worker process, real Redis and real Postgres+pgvector."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import text

from tagger.db.engine import get_engine
from tagger.events import new_event, publish, read_catalog
from tagger.taxonomy import load_taxonomies
from tagger.settings import REPO_ROOT
from tests.conftest import BAD, CATALOG, DIM, query_rows, query_value, wait_until

pytestmark = pytest.mark.slow


q = query_rows
one = query_value


def catalog_events(n: int | None = None) -> list[dict[str, Any]]:
    events = list(read_catalog(CATALOG))
    return events if n is None else events[:n]


def wait_processed(url: str, sku: str, worker: Any, *, timeout_s: float = 90) -> None:
    wait_until(lambda: one(url, "SELECT count(*) FROM embeddings WHERE sku = :s", s=sku), timeout_s,
               f"{sku} to be processed", worker)


def wait_failure(url: str, sku: str | None, worker: Any, error_class: str, *, timeout_s: float = 60) -> tuple:
    def found() -> Any:
        rows = q(url, "SELECT stage, error_class, message, attempts FROM failures WHERE sku IS NOT DISTINCT FROM :s "
                      "AND error_class = :c", s=sku, c=error_class)
        return rows[0] if rows else None

    return wait_until(found, timeout_s, f"a {error_class} failure for {sku}", worker)


def snapshot(url: str, sku: str) -> dict[str, Any]:
    """Everything stored about one product, including row ids and timestamps (to prove nothing was rewritten)."""
    return {
        "product": q(url, "SELECT * FROM products WHERE sku = :s", s=sku),
        "embedding": q(url, "SELECT model_id, image_hash, text_hash, updated_at FROM embeddings WHERE sku = :s", s=sku),
        "tags": q(url, "SELECT id, attribute, value, score, rank, status, updated_at FROM tags WHERE sku = :s "
                       "ORDER BY id", s=sku),
        "matches": q(url, "SELECT sku_a, sku_b, similarity, updated_at FROM duplicate_matches "
                          "WHERE sku_a = :s OR sku_b = :s ORDER BY 1, 2", s=sku),
    }


@pytest.fixture
def db(clean_db: str, worker: Any) -> str:
    return clean_db


def test_created_event_stores_embeddings_tags_and_duplicates(db: str, worker: Any) -> None:
    events = catalog_events()
    source = next(e for e in events if e["attributes"].get("duplicate_of"))
    original = next(e for e in events if e["sku"] == source["attributes"]["duplicate_of"])
    other = next(e for e in events if e["sku"] not in (source["sku"], original["sku"]))
    publish([original, other, source])
    for event in (original, other, source):
        wait_processed(db, event["sku"], worker)

    model_id, dims = q(db, "SELECT model_id, vector_dims(image_embedding) FROM embeddings WHERE sku = :s",
                       s=original["sku"])[0]
    assert dims == DIM and model_id
    norm = one(db, "SELECT vector_norm(image_embedding) FROM embeddings WHERE sku = :s", s=original["sku"])
    assert abs(norm - 1.0) < 1e-3

    taxonomies = load_taxonomies(REPO_ROOT / "taxonomies")
    for event in (original, other):
        tagged = {r[0] for r in q(db, "SELECT DISTINCT attribute FROM tags WHERE sku = :s", s=event["sku"])}
        category = one(db, "SELECT value FROM tags WHERE sku = :s AND attribute = 'category' AND rank = 1",
                       s=event["sku"])
        from tagger.scoring import applies

        expected = {a.name for a in taxonomies.attributes if applies(a, taxonomies, {"category": category})}
        expected.add("category")
        assert tagged == expected, f"{event['sku']} ({category}): tagged {tagged}, expected {expected}"
        statuses = {r[0] for r in q(db, "SELECT status FROM tags WHERE sku = :s AND rank = 1", s=event["sku"])}
        assert statuses <= {"accepted", "needs_review"}
        # Every attribute has exactly one rank-1 tag, with a score in (0, 1].
        per_attribute = q(db, "SELECT attribute, count(*), min(score), max(score) FROM tags WHERE sku = :s AND rank = 1 "
                              "GROUP BY attribute", s=event["sku"])
        assert all(count == 1 and 0 < lo <= hi <= 1 for _, count, lo, hi in per_attribute)

    pair = sorted((source["sku"], original["sku"]))
    similarity = one(db, "SELECT similarity FROM duplicate_matches WHERE sku_a = :a AND sku_b = :b", a=pair[0], b=pair[1])
    assert similarity is not None and similarity >= 0.9
    # Queryable from either side.
    assert one(db, "SELECT duplicate_sku FROM duplicate_pairs WHERE sku = :s", s=pair[1]) == pair[0]
    assert one(db, "SELECT duplicate_sku FROM duplicate_pairs WHERE sku = :s", s=pair[0]) == pair[1]
    assert one(db, "SELECT count(*) FROM duplicate_matches") == 1


def test_redelivered_event_changes_nothing(db: str, worker: Any) -> None:
    event = catalog_events(1)[0]
    publish(event)
    wait_processed(db, event["sku"], worker)
    before = snapshot(db, event["sku"])
    for _ in range(3):
        publish(event)
    # A marker event processed after the repeats proves the queue drained (one worker, prefetch 1, FIFO).
    marker = catalog_events(2)[1]
    publish(marker)
    wait_processed(db, marker["sku"], worker)
    after = snapshot(db, event["sku"])
    assert after["product"] == before["product"]
    assert after["embedding"] == before["embedding"]
    assert after["tags"] == before["tags"]
    assert one(db, "SELECT count(*) FROM failures") == 0


def test_update_reembeds_only_on_change_and_delete_removes_everything(db: str, worker: Any, image_dir: Path) -> None:
    event = dict(catalog_events(1)[0])
    publish(event)
    wait_processed(db, event["sku"], worker)
    first = snapshot(db, event["sku"])

    same = new_event("product.updated", **{k: v for k, v in event.items() if k not in ("type", "id", "occurred_at")})
    publish(same)
    changed_text = new_event("product.updated", **{**{k: v for k, v in event.items()
                                                      if k not in ("type", "id", "occurred_at")},
                                                   "title": event["title"] + " (new season)"})
    publish(changed_text)
    wait_until(lambda: one(db, "SELECT title FROM products WHERE sku = :s", s=event["sku"]).endswith("(new season)"),
               60, "the text update", worker)
    second = snapshot(db, event["sku"])
    assert second["embedding"][0][1] == first["embedding"][0][1]  # same image hash
    assert second["embedding"][0][2] != first["embedding"][0][2]  # new text hash

    # A new image: the image embedding changes.
    flipped = image_dir / f"{event['sku']}-flipped.jpg"
    Image.open(event["image"]).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(flipped)
    publish(new_event("product.updated", sku=event["sku"], title=event["title"], image=str(flipped)))
    wait_until(lambda: one(db, "SELECT image_hash FROM embeddings WHERE sku = :s", s=event["sku"]) != first["embedding"][0][1],
               60, "the image update", worker)

    publish(new_event("product.deleted", sku=event["sku"]))
    wait_until(lambda: one(db, "SELECT count(*) FROM products WHERE sku = :s", s=event["sku"]) == 0, 60, "delete", worker)
    for table in ("embeddings", "tags"):
        assert one(db, f"SELECT count(*) FROM {table} WHERE sku = :s", s=event["sku"]) == 0
    assert one(db, "SELECT count(*) FROM duplicate_matches WHERE :s IN (sku_a, sku_b)", s=event["sku"]) == 0
    # Deleting again (a redelivery) is harmless: no failure recorded.
    publish(new_event("product.deleted", sku=event["sku"]))
    marker = catalog_events(2)[1]
    publish(marker)
    wait_processed(db, marker["sku"], worker)
    assert one(db, "SELECT count(*) FROM failures") == 0


def _bad_cases(image_dir: Path) -> list[tuple[Any, str | None, str]]:
    huge = image_dir / "huge.png"
    if not huge.exists():
        Image.new("L", (9000, 5000)).save(huge)  # 45 Mpx, over the 40 Mpx default limit
    return [
        ("{not json", None, "InvalidEvent"),
        ({"type": "product.created", "title": "no sku", "image": "catalog/images/2227.jpg"}, None, "InvalidEvent"),
        ({"type": "product.exploded", "sku": "BAD-TYPE", "image": "x.jpg"}, "BAD-TYPE", "InvalidEvent"),
        ({"type": "product.created", "sku": "BAD-TYPES", "title": 42, "image": "x.jpg"}, "BAD-TYPES", "InvalidEvent"),
        (new_event("product.created", sku="BAD-PATH", image="../../etc/passwd"), "BAD-PATH", "ImageNotAllowed"),
        (new_event("product.created", sku="BAD-MISSING", image="catalog/images/does-not-exist.jpg"), "BAD-MISSING",
         "ImageNotFound"),
        (new_event("product.created", sku="BAD-TRUNC", image=str(BAD / "truncated.jpg")), "BAD-TRUNC", "ImageDecodeError"),
        (new_event("product.created", sku="BAD-NOTIMG", image=str(BAD / "not-an-image.jpg")), "BAD-NOTIMG",
         "ImageDecodeError"),
        (new_event("product.created", sku="BAD-BOMB", image=str(BAD / "bomb.png")), "BAD-BOMB", "ImageTooLarge"),
        (new_event("product.created", sku="BAD-HUGE", image=str(huge)), "BAD-HUGE", "ImageTooLarge"),
        (new_event("product.created", sku="BAD-PRIVATE", image="http://127.0.0.1:9/x.jpg"), "BAD-PRIVATE",
         "ImageNotAllowed"),
        (new_event("product.created", sku="BAD-UNREACHABLE", image="http://images.invalid/x.jpg"), "BAD-UNREACHABLE",
         "ImageUnreachable"),
    ]


def test_bad_input_is_recorded_and_disturbs_nothing(db: str, worker: Any, celery_publisher: Any,
                                                    image_dir: Path) -> None:
    good = catalog_events(1)[0]
    publish(good)
    wait_processed(db, good["sku"], worker)
    before = snapshot(db, good["sku"])

    cases = _bad_cases(image_dir)
    for payload, _, _ in cases:
        celery_publisher(payload)
    for _, sku, error_class in cases:
        stage, found_class, message, attempts = wait_failure(db, sku, worker, error_class)
        assert message and len(message) > 20, message
    # Retried transient failure: recorded once, after its retries, with a clear reason.
    assert "unreachable" in one(db, "SELECT message FROM failures WHERE sku = 'BAD-UNREACHABLE'").lower() or \
        "resolved" in one(db, "SELECT message FROM failures WHERE sku = 'BAD-UNREACHABLE'").lower()

    # Nothing else was touched, no product row was created for a bad event, and the worker still works.
    assert snapshot(db, good["sku"]) == before
    assert one(db, "SELECT count(*) FROM products") == 1
    nxt = catalog_events(2)[1]
    publish(nxt)
    wait_processed(db, nxt["sku"], worker)

    # Redelivering a bad event adds no row: the failure's attempts go up.
    rows_before = one(db, "SELECT count(*) FROM failures")
    celery_publisher(cases[4][0])
    wait_until(lambda: one(db, "SELECT attempts FROM failures WHERE sku = 'BAD-PATH'") == 2, 30, "attempts=2", worker)
    assert one(db, "SELECT count(*) FROM failures") == rows_before


def test_unusual_but_valid_images_are_processed(db: str, worker: Any, image_dir: Path) -> None:
    for name in ("cmyk.jpg", "grey16.png", "transparent.png"):
        publish(new_event("product.created", sku=f"ODD-{name}", title=f"odd image {name}", image=str(BAD / name)))
    tiny = image_dir / "tiny.png"
    Image.new("RGB", (3, 90), "red").save(tiny)
    publish(new_event("product.created", sku="ODD-tiny", title="a thin red strip", image=str(tiny)))
    for sku in ("ODD-cmyk.jpg", "ODD-grey16.png", "ODD-transparent.png", "ODD-tiny"):
        wait_processed(db, sku, worker)
    assert one(db, "SELECT count(*) FROM failures") == 0


def test_failure_is_resolved_when_the_product_later_succeeds(db: str, worker: Any, image_dir: Path) -> None:
    path = image_dir / "late.jpg"
    event = new_event("product.created", sku="LATE-1", title="arrives late", image=str(path))
    publish(event)
    wait_failure(db, "LATE-1", worker, "ImageNotFound")
    shutil.copy(CATALOG.parent / "images" / "2227.jpg", path)
    publish(new_event("product.created", sku="LATE-1", title="arrives late", image=str(path)))
    wait_processed(db, "LATE-1", worker)
    assert one(db, "SELECT resolved_at IS NOT NULL FROM failures WHERE sku = 'LATE-1'") is True


def test_any_language_can_send_the_raw_celery_message(db: str, worker: Any, server_settings: Any) -> None:
    """The README documents the exact message; build it by hand (no Celery) and push it as a non-Python producer."""
    import base64
    import uuid

    import redis

    event = catalog_events(3)[2]
    task_id = str(uuid.uuid4())
    body = json.dumps([[event], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "tagger.process_event", "id": task_id, "root_id": task_id,
                    "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": "tagger.events"}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }
    redis.Redis.from_url(server_settings.broker_url).lpush("tagger.events", json.dumps(message))
    wait_processed(db, event["sku"], worker)


def test_an_event_that_keeps_killing_its_worker_is_given_up(db: str, worker: Any, celery_publisher: Any) -> None:
    """Stand-in for a message whose processing killed the worker process several times already: its outbox row
    has counted those starts; the next delivery records a PoisonEvent failure instead of processing again."""
    event = catalog_events(4)[3]
    with get_engine(db).begin() as conn:
        conn.execute(text("INSERT INTO outbox (event_id, sku, event, sent_at, deliveries) "
                          "VALUES (:id, :sku, CAST(:e AS jsonb), now(), 5)"),
                     {"id": event["id"], "sku": event["sku"], "e": json.dumps(event)})
    celery_publisher(event)
    stage, error_class, message, _ = wait_failure(db, event["sku"], worker, "PoisonEvent")
    assert stage == "delivery" and "given up" in message
    assert one(db, "SELECT count(*) FROM products WHERE sku = :s", s=event["sku"]) == 0
    assert one(db, "SELECT outcome FROM outbox WHERE event_id = :id", id=event["id"]) == "failed"
