"""Fault tests for "PIM integration that loses nothing": real worker and relay processes, real (private) embedded
Postgres and Redis, a tiny CLIP so that encoding is fast. Each test sends events, injects one fault mid-run, waits
until the outbox is drained and checks the end state (tests/chaos/faultlib.py ``verify``). Each prints
``fault=<name> sent=<N> correct=<M> lost=<K> recovery_s=<t>`` and appends a JSON line to out/chaos/results.jsonl
(``python bench/chaos_table.py`` renders them). The 10,000-event burst lives in bench/burst.py."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.chaos.faultlib import (
    Harness,
    burst_events,
    created_events,
    kill_group,
    newest_per_sku,
    poll,
    pool_children,
    product_event,
    Verdict,
    record,
    verify,
)

N = 80  # events per fault run: enough that the fault lands mid-batch, small enough for 2 busy cores
RECOVER_S = 150  # upper bound on waiting for the outbox to drain after a fault
FAST_RELAY = ("--poll", "0.5", "--redeliver-after", "5", "--reconcile-every", "20")


def _inject_mid_run(h: Harness, events: list[dict], fraction: float = 0.2) -> int:
    """Publish ``events`` and return once a ``fraction`` of them is processed; how many are still pending."""
    ids = [e["id"] for e in events]
    h.publish(events)
    assert h.wait_processed(ids, 120, at_least=max(1, int(len(ids) * fraction))) >= 0, h.diagnostics()
    return len(ids) - h.processed_count(ids)


def _finish(h: Harness, fault: str, events: list[dict], fault_at: float, **extra: object) -> None:
    ids = [e["id"] for e in events]
    waited = h.wait_processed(ids, RECOVER_S)
    recovery = time.monotonic() - fault_at if waited >= 0 else float("nan")
    resent = h.q("SELECT count(*) FROM outbox WHERE send_attempts > 1")[0][0]
    verdict = verify(h, events)
    record(fault, verdict, recovery, resent=resent, **extra)
    assert waited >= 0, f"{fault}: outbox not drained after {RECOVER_S}s\n{h.diagnostics()}"
    assert verdict.ok(), f"{fault}: {verdict}\n{h.diagnostics()}"


@pytest.mark.slow
def test_kill_9_of_a_worker_child_mid_batch(harness: Harness, chaos_images: list[Path]) -> None:
    h = harness
    h.start_relay(*FAST_RELAY)
    worker = h.start_worker(concurrency=2)
    events = created_events("KC", chaos_images, N)
    pending = _inject_mid_run(h, events)
    children = pool_children(worker)
    assert children, "the worker has no pool children"
    assert pending > 0, "the batch finished before the fault: nothing was tested"
    fault_at = time.monotonic()
    os.kill(children[0].pid, signal.SIGKILL)
    _finish(h, "kill9_worker_child", events, fault_at, pending_at_fault=pending)


@pytest.mark.slow
def test_kill_9_of_the_whole_worker_then_a_new_worker(harness: Harness, chaos_images: list[Path]) -> None:
    """Parent and children die at once: their unacked messages come back only after the broker's visibility timeout
    (60 s minimum) plus kombu's restore sweep, so the relay's redelivery (5 s here) is what recovers them."""
    h = harness
    h.start_relay(*FAST_RELAY)
    worker = h.start_worker(concurrency=2)
    events = created_events("KW", chaos_images, N)
    pending = _inject_mid_run(h, events)
    fault_at = time.monotonic()
    kill_group(worker.process.pid)
    assert worker.process.poll() is not None
    h.start_worker(concurrency=2)
    _finish(h, "kill9_whole_worker", events, fault_at, pending_at_fault=pending)


@pytest.mark.slow
def test_redis_restart_mid_run_loses_no_event(harness: Harness, chaos_images: list[Path]) -> None:
    """Redis keeps no snapshot: a restart drops every queued message. Worker and relay reconnect; the relay re-sends
    the events whose outbox rows stay unprocessed."""
    h = harness
    relay = h.start_relay(*FAST_RELAY)
    worker = h.start_worker(concurrency=2)
    events = created_events("RR", chaos_images, N)
    pending = _inject_mid_run(h, events)
    fault_at = time.monotonic()
    h.servers.restart_redis(down_s=1.0)
    _finish(h, "redis_restart", events, fault_at, pending_at_fault=pending)
    assert worker.process.poll() is None and relay.process.poll() is None


@pytest.mark.slow
def test_postgres_restart_mid_run_loses_no_event(harness: Harness, chaos_images: list[Path]) -> None:
    """Workers see DatabaseUnavailable and retry with backoff; the relay waits and carries on."""
    h = harness
    relay = h.start_relay(*FAST_RELAY)
    worker = h.start_worker(concurrency=2)
    events = created_events("PR", chaos_images, N)
    pending = _inject_mid_run(h, events)
    fault_at = time.monotonic()
    h.servers.restart_postgres(down_s=3.0)
    _finish(h, "postgres_restart", events, fault_at, pending_at_fault=pending)
    assert worker.process.poll() is None and relay.process.poll() is None


def _snapshot(h: Harness, skus: list[str]) -> dict[str, list]:
    return {
        "products": h.q("SELECT sku, updated_at, last_event_at, content_hash FROM products WHERE sku = ANY(:s) "
                        "ORDER BY sku", s=skus),
        "embeddings": h.q("SELECT sku, model_id, image_hash, text_hash, updated_at FROM embeddings "
                          "WHERE sku = ANY(:s) ORDER BY sku", s=skus),
        "tags": h.q("SELECT id, sku, attribute, value, score, rank, status, updated_at FROM tags WHERE sku = ANY(:s) "
                    "ORDER BY id", s=skus),
        "matches": h.q("SELECT sku_a, sku_b, similarity, updated_at FROM duplicate_matches "
                       "WHERE sku_a = ANY(:s) OR sku_b = ANY(:s) ORDER BY 1, 2", s=skus),
    }


def _outcome_lines(h: Harness) -> int:
    pattern = re.compile(r"tagger\.worker: event (?:processed|unchanged|stale)\b")  # old and new log formats
    return sum(len(pattern.findall(w.log_path.read_text(errors="replace"))) for w in h.workers)


@pytest.mark.slow
def test_same_event_three_times_changes_nothing(harness: Harness, chaos_images: list[Path]) -> None:
    """The same event id published thrice (the outbox keeps one row), and the same raw Celery message delivered
    thrice (``publish(validate=False)``, no outbox), both as three concurrent FIRST deliveries and as repeats of an
    event already applied: one set of results, and repeats leave every row untouched (ids, updated_at)."""
    h = harness
    h.start_relay(*FAST_RELAY)
    h.start_worker(concurrency=2)
    image = chaos_images[5]
    # DUP-A and DUP-B share one image: a near-duplicate pair whose row must not be rewritten either.
    a, b = product_event("DUP-A", image), product_event("DUP-B", image)
    c = product_event("DUP-C", chaos_images[6])
    raw = product_event("DUP-D", chaos_images[7])  # never in the outbox: only ever delivered raw
    events = [a, b, c, raw]
    skus = [e["sku"] for e in events]
    seen = _outcome_lines(h)
    # First deliveries: a thrice by event id (with b and c), the raw one thrice at once.
    h.publish([a, b, c, a, a])
    h.publish([raw, raw, raw], validate=False)
    assert h.q("SELECT count(*) FROM outbox WHERE event_id = :i", i=a["id"])[0][0] == 1
    assert h.wait_processed([a["id"], b["id"], c["id"]], 120) >= 0, h.diagnostics()
    assert poll(lambda: _outcome_lines(h) >= seen + 6, 90), f"6 deliveries not seen\n{h.diagnostics()}"
    time.sleep(1.0)
    first = verify(h, events, outbox=False)
    before = _snapshot(h, skus)
    assert len(before["matches"]) >= 1, "DUP-A and DUP-B (same image) should be a near-duplicate pair"
    # Repeats of events already applied: a published twice more by id, then a's and the raw one's message thrice.
    start = time.monotonic()
    seen = _outcome_lines(h)
    for _ in range(2):
        h.publish([a])
    h.publish([a, a, a, raw, raw, raw], validate=False)
    assert poll(lambda: _outcome_lines(h) >= seen + 6, 90), f"6 repeats not seen\n{h.diagnostics()}"
    time.sleep(1.0)  # anything still running would show up as a changed row
    after = _snapshot(h, skus)
    recovery = time.monotonic() - start
    verdict = verify(h, events, outbox=False)
    outbox_rows = h.q("SELECT event_id, processed_at IS NOT NULL, outcome FROM outbox")
    unchanged = before == after
    deliveries = 3 + 3 + 2 + 3 + 3  # a x3 by id, raw x3 first; then a x2 by id, a x3 raw, raw x3
    problems = first.problems + verdict.problems + ([] if unchanged else ["rows rewritten by a repeat"])
    if len(outbox_rows) != 3 or not all(r[1] for r in outbox_rows):
        problems.append(f"outbox rows {outbox_rows}")
    ok = not problems and verdict.products_correct == len(events)
    record("duplicate_delivery_x3", Verdict(sent=deliveries, correct=deliveries if ok else 0, lost=verdict.lost,
                                            products=len(events), products_correct=verdict.products_correct,
                                            problems=problems), recovery)
    assert unchanged, {k: ([r for r in before[k] if r not in after[k]], [r for r in after[k] if r not in before[k]])
                       for k in before if before[k] != after[k]}
    assert ok, problems


BURST_PRODUCTS, BURST_VERSIONS = 200, 10  # 2,000 events in the suite; bench/burst.py runs 10,000


@pytest.mark.slow
def test_burst_keeps_per_sku_order(harness: Harness, chaos_images: list[Path]) -> None:
    """A burst of updates, shuffled so that older events of a SKU often arrive after newer ones: all processed, and
    each product ends as its newest event says (an older occurred_at never overwrites newer results)."""
    h = harness
    # The production default redelivery (60 s after the queue was last seen empty): a backlog is not a loss.
    h.start_relay("--poll", "0.5")
    # 2,000 events replace each pool child after its 1,000th task (test_pool_child_replacement_survives_a_slow_warm_up).
    h.start_worker(concurrency=2)
    events = burst_events("BU", chaos_images, BURST_PRODUCTS, BURST_VERSIONS)
    ids = [e["id"] for e in events]
    start = time.monotonic()
    h.publish(events)
    waited = h.wait_processed(ids, 300)
    elapsed = time.monotonic() - start
    verdict = verify(h, events)
    outcomes = dict(h.q("SELECT outcome, count(*) FROM outbox GROUP BY 1"))
    throughput = len(events) / elapsed
    print(f"burst: {len(events)} events, {len(newest_per_sku(events))} products in {elapsed:.1f}s = "
          f"{throughput:.1f} events/s; outcomes {outcomes}", flush=True)
    record(f"burst_{len(events)}", verdict, elapsed, events_per_s=round(throughput, 1), outcomes=outcomes)
    assert waited >= 0, f"burst not drained in 300 s\n{h.diagnostics()}"
    assert verdict.ok(), f"{verdict}\n{h.diagnostics()}"
    # The check itself is not vacuous: an older title, a missing embedding and a second rank-1 tag are all caught.
    skus = sorted(newest_per_sku(events))[:3]
    with h.engine.begin() as conn:
        conn.execute(text("UPDATE products SET title = 'older title' WHERE sku = :s"), {"s": skus[0]})
        conn.execute(text("DELETE FROM embeddings WHERE sku = :s"), {"s": skus[1]})
        conn.execute(text("UPDATE tags SET rank = 1 WHERE sku = :s AND attribute = 'category'"), {"s": skus[2]})
    broken = verify(h, events)
    assert set(skus) <= set(broken.bad_skus), broken


# ---- faults that once needed a production change (each was a strict xfail until fixed) -----------------------


def test_restarted_embedded_redis_keeps_its_port(tmp_path: Path) -> None:
    from tagger import services
    from tagger.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", database_url=None, broker_url=None)
    try:
        first = services.broker_url(settings)
        services.stop_embedded(settings)
        assert services.broker_url(settings) == first
    finally:
        services.stop_embedded(settings)


@pytest.mark.slow
def test_backlog_is_not_mistaken_for_lost_messages(harness: Harness, chaos_images: list[Path]) -> None:
    """Scaled down: redelivery after 0.3 s against a backlog of 600 events (~30 s): nothing still queued is re-sent."""
    h = harness
    h.start_relay("--poll", "0.5", "--redeliver-after", "0.3", "--no-reconcile")
    h.start_worker(concurrency=2)
    events = burst_events("BL", chaos_images, 120, 5)
    ids = [e["id"] for e in events]
    start = time.monotonic()
    h.publish(events)
    # Bounded: a re-sending relay makes the backlog grow, so give it 60 s, then judge what it did meanwhile.
    waited = h.wait_processed(ids, 60)
    elapsed = time.monotonic() - start
    resent = h.q("SELECT coalesce(sum(send_attempts - 1), 0) FROM outbox")[0][0]
    gave_up = h.q("SELECT count(*) FROM outbox WHERE outcome = 'gave_up'")[0][0]
    verdict = verify(h, events)
    record("backlog_redelivery", verdict, elapsed if waited >= 0 else float("nan"), resent=int(resent),
           gave_up=int(gave_up))
    # Re-sends of the messages in flight when the queue empties are expected (one batch per worker process, each
    # up to TAGGER_BATCH_SIZE events, and a few single-event retries); re-sending the queue is not.
    from tagger.settings import get_settings

    in_flight = 2 * get_settings().batch_size + 10
    assert resent <= in_flight and gave_up == 0, f"{resent} re-sends, {gave_up} given up for {len(events)} events"
    assert waited >= 0 and verdict.ok(), verdict


@pytest.mark.slow
def test_pool_child_replacement_survives_a_slow_warm_up(harness: Harness, chaos_images: list[Path]) -> None:
    """Seen in bench/burst.py: with the default 1,000 tasks per child, the worker stalled after 2,000 events."""
    h = harness
    h.start_relay(*FAST_RELAY)
    worker = h.start_worker(concurrency=2, TAGGER_WORKER_MAX_TASKS_PER_CHILD="10")
    events = created_events("MC", chaos_images, 50)
    start = time.monotonic()
    h.publish(events)
    ids = [e["id"] for e in events]

    def settled() -> bool:  # all done, or replacement children being killed (then it never finishes)
        return (h.processed_count(ids) == len(ids)
                or worker.log_path.read_text(errors="replace").count("Timed out waiting for UP message") >= 2)

    poll(settled, 90, interval_s=0.5)
    waited = h.wait_processed(ids, 1)
    verdict = verify(h, events)
    log = worker.log_path.read_text(errors="replace")
    timeouts = log.count("Timed out waiting for UP message")
    record("pool_child_replacement", verdict, time.monotonic() - start if waited >= 0 else float("nan"),
           up_timeouts=timeouts)
    assert timeouts == 0, f"{timeouts} replacement children killed before they were up"
    assert waited >= 0 and verdict.ok(), verdict
