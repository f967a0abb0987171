"""10,000 product events in one burst through the real pipeline (relay, Redis, Celery worker, Postgres+pgvector).

    .venv/bin/python bench/burst.py [--products 200] [--versions 50] [--concurrency 2]

Starts private embedded Postgres and Redis in a temp dir, a tiny random CLIP (fast to encode), one worker and one
relay; publishes products x versions events (created, then updates with other titles and later occurred_at),
shuffled so that older events of a SKU often arrive after newer ones; waits until every outbox row is processed;
checks that each product ends as its newest event says (tests/chaos/faultlib.py ``verify``); prints the
throughput and appends a line to out/chaos/results.jsonl. Everything it started is stopped at the end.
The test suite runs a 2,000-event version (tests/chaos/test_faults.py::test_burst_keeps_per_sku_order)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tagger.db import migrate  # noqa: E402
from tests.chaos.faultlib import (  # noqa: E402
    ChaosServers,
    Harness,
    burst_events,
    chaos_env,
    make_images,
    newest_per_sku,
    record,
    verify,
)
from tests.conftest import DIM, create_database  # noqa: E402
from tests.tiny_clip import make_tiny_clip  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=200)
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tagger-burst-", dir="/tmp"))
    servers = ChaosServers.start(tmp / "data")
    harness = None
    try:
        db_url = create_database(servers.server_url, "burst")
        migrate.upgrade(db_url, DIM)
        images = make_images(tmp / "images")
        model = make_tiny_clip(tmp / "tiny-clip")
        (tmp / "logs").mkdir()
        harness = Harness(servers, db_url, chaos_env(servers, db_url, tmp / "images", model, broker_db=1),
                          tmp / "logs")
        harness.start_relay("--poll", "0.5")
        # Production defaults: each pool child is recycled after 1,000 tasks, so 10,000 events exercise recycling too.
        harness.start_worker(concurrency=args.concurrency)
        events = burst_events("BB", images, args.products, args.versions)
        ids = [e["id"] for e in events]
        print(f"publishing {len(events)} events for {len(newest_per_sku(events))} products ...", flush=True)
        start = time.monotonic()
        harness.publish(events)
        published = time.monotonic() - start
        waited = harness.wait_processed(ids, args.timeout)
        elapsed = time.monotonic() - start
        verdict = verify(harness, events)
        outcomes = dict(harness.q("SELECT outcome, count(*) FROM outbox GROUP BY 1"))
        throughput = len(events) / elapsed
        print(f"published in {published:.1f}s; all processed in {elapsed:.1f}s = {throughput:.1f} events/s "
              f"(worker concurrency {args.concurrency}); outcomes {outcomes}")
        record(f"burst_{len(events)}", verdict, elapsed, events_per_s=round(throughput, 1), outcomes=outcomes,
               publish_s=round(published, 1), concurrency=args.concurrency)
        if waited < 0 or not verdict.ok():
            print(f"NOT OK: {verdict.problems[:10]}\n{harness.diagnostics()}", file=sys.stderr)
            return 1
        return 0
    finally:
        if harness is not None:
            harness.close()
        servers.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
