"""End-to-end throughput and latency: events published (outbox → relay → Redis → Celery worker) until their
tags and duplicate matches are committed in Postgres, with 1 and 2 worker processes.

Everything is real and private: an embedded Postgres+pgvector and Redis in a temporary data dir, `tagger
worker` subprocesses with the default model (one torch/ONNX thread per child), the sample catalog's 212
photos published several times under distinct SKUs. In the same run, the raw encoder throughput at the same
batch size (decode + image encoder + text encoder, what a worker child cannot avoid doing) is measured
with the same number of processes, so the ratio is not skewed by a noisy machine.

    .venv/bin/python bench/end_to_end.py                 # about 6 minutes on 2 cores
    .venv/bin/python bench/end_to_end.py --copies 1      # a smoke run

Writes bench/results/end_to_end.json and bench/results/end_to_end.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
CATALOG = ROOT / "samples" / "catalog" / "catalog.jsonl"


def catalog_events(copies: int) -> list[dict[str, Any]]:
    from tagger.events import read_catalog

    base = list(read_catalog(CATALOG))
    # Each copy is a new product: new SKU and event id (the outbox would rightly drop a repeated id).
    return [{**{k: v for k, v in e.items() if k != "id"}, "sku": f"{e['sku']}-c{c}", "title": f"{e.get('title', '')} #{c}"}
            for c in range(copies) for e in base]


def raw_encoder_rate(batch: int, seconds: float, queue: Any) -> None:
    """One process, one thread: decode + encode images (with features) + encode texts, batch by batch."""
    import torch

    torch.set_num_threads(1)
    from tagger.encoders.default import DefaultEncoder
    from tagger.images import ImageLimits, decode_image
    from tagger.settings import Settings

    limits = ImageLimits.from_settings(Settings())
    data = [p.read_bytes() for p in sorted((CATALOG.parent / "images").glob("*.jpg"))]
    titles = [f"product title {i}" for i in range(len(data))]
    encoder = DefaultEncoder()
    encoder.load()

    def step(start: int) -> None:
        images = [decode_image(d, limits) for d in data[start : start + batch]]
        encoder.encode_images_with_features(images, batch_size=batch)
        encoder.encode_texts(titles[start : start + batch], batch_size=batch)

    step(0)
    done, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step((i * batch) % (len(data) - batch))
        done += batch
        i += 1
    queue.put(done / (time.perf_counter() - t0))


def raw_rate(processes: int, batch: int, seconds: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=raw_encoder_rate, args=(batch, seconds, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20
    except psutil.Error:
        return 0.0


def child_rss_mb(pid: int) -> list[float]:
    import psutil

    try:
        return [c.memory_info().rss / 2**20 for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


class Worker:
    def __init__(self, env: dict[str, str], concurrency: int, log: Path):
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tagger", "worker", "--concurrency", str(concurrency)],
                                     env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while "ready." not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(log.read_text(errors="replace")[-3000:])
            time.sleep(0.3)
        # Children load the model after "ready."; wait until each has warmed up.
        while log.read_text(errors="replace").count("worker child ready") < concurrency and time.monotonic() < deadline:
            time.sleep(0.3)

    def stop(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._fh.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="tagger-bench-e2e-"))
    os.environ["TAGGER_DATA_DIR"] = str(data_dir)
    for name in ("TAGGER_DATABASE_URL", "TAGGER_BROKER_URL"):
        os.environ.pop(name, None)
    os.environ["TAGGER_BATCH_SIZE"] = str(args.batch)
    os.environ["TAGGER_IMAGE_ROOTS"] = str(ROOT / "samples")
    from sqlalchemy import text

    from tagger import services
    from tagger.db import migrate
    from tagger.db.engine import get_engine
    from tagger.encoders.base import model_dimension
    from tagger.events import publish
    from tagger.settings import get_settings

    settings = services.resolve(get_settings())
    url = str(settings.database_url)
    migrate.upgrade(url, model_dimension("default"))
    engine = get_engine(url)
    env = {**os.environ, "TAGGER_DATABASE_URL": url, "TAGGER_BROKER_URL": str(settings.broker_url),
           "TAGGER_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    events = catalog_events(args.copies)
    result: dict[str, Any] = {"events": len(events), "batch_size": args.batch, "runs": []}

    def reset() -> None:
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE products, outbox, failures CASCADE"))

    def wait_all(timeout_s: float, worker: Worker, sample: list[float]) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                left = conn.execute(text("SELECT count(*) FROM outbox WHERE processed_at IS NULL")).scalar()
            sample.append(tree_rss_mb(worker.proc.pid))
            if left == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"events not processed in {timeout_s}s:\n" + worker.log.read_text()[-3000:])

    try:
        for workers in (1, 2):
            reset()
            worker = Worker(env, workers, data_dir / f"worker-{workers}.log")
            try:
                rss: list[float] = []
                start = time.perf_counter()
                publish(events, source="ingest")
                wait_all(1800, worker, rss)
                elapsed = time.perf_counter() - start
                with engine.connect() as conn:
                    outcomes = dict(conn.execute(text("SELECT outcome, count(*) FROM outbox GROUP BY 1")).all())
                    tags = conn.execute(text("SELECT count(*) FROM tags")).scalar()
                if sum(outcomes.values()) != len(events):
                    raise RuntimeError(f"{sum(outcomes.values())} events recorded for {len(events)} published")
                children = child_rss_mb(worker.proc.pid)
                row: dict[str, Any] = {
                    "workers": workers, "seconds": round(elapsed, 2), "events_per_s": round(len(events) / elapsed, 2),
                    "outcomes": outcomes, "tag_rows": tags, "peak_rss_mb_all": round(max(rss), 1),
                    "rss_mb_per_child": [round(c, 1) for c in children],
                }
                if workers == 1:
                    row["latency"] = latency(engine, events[:1], args.latency_events)
            finally:
                worker.stop()
            row["raw_encoder_per_s"] = round(raw_rate(workers, args.batch, args.raw_seconds), 2)
            row["ratio"] = round(row["events_per_s"] / row["raw_encoder_per_s"], 3)
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        engine.dispose()
        services.stop_embedded(settings)
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


def latency(engine: Any, template: list[dict[str, Any]], n: int) -> dict[str, float]:
    """Idle-system latency: one event at a time, the next only after the previous is committed."""
    from sqlalchemy import text

    from tagger.events import new_event, publish

    samples = []
    base = template[0]
    for i in range(n):
        event = new_event("product.updated", sku=f"LAT-{i}", title=f"latency probe {i}", image=base["image"])
        publish(event)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                row = conn.execute(text("SELECT EXTRACT(EPOCH FROM processed_at - received_at) FROM outbox "
                                        "WHERE event_id = :id AND processed_at IS NOT NULL"), {"id": event["id"]}).first()
            if row:
                samples.append(float(row[0]) * 1000)
                break
            time.sleep(0.05)
        time.sleep(0.2)
    samples.sort()
    return {"n": len(samples), "p50_ms": round(statistics.median(samples), 1),
            "p95_ms": round(samples[max(0, int(round(0.95 * len(samples))) - 1)], 1)}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['events']} events (the sample catalog's 212 photos under distinct SKUs), relay batches of "
             f"{result['batch_size']}, one thread per worker child.", "",
             "| worker processes | seconds | events/s | raw encoder/s (same processes, batch) | ratio | "
             "peak RSS, worker + children | RSS per child |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["runs"]:
        lines.append(f"| {r['workers']} | {r['seconds']} | {r['events_per_s']} | {r['raw_encoder_per_s']} | "
                     f"{r['ratio']:.0%} | {r['peak_rss_mb_all']:.0f} MB | "
                     + ", ".join(f"{c:.0f} MB" for c in r["rss_mb_per_child"]) + " |")
    lat = result["runs"][0].get("latency")
    if lat:
        lines += ["", f"Latency on an idle system (1 worker process, {lat['n']} single events, publish → tags "
                      f"committed): p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=3, help="times the sample catalog is published (212 each)")
    parser.add_argument("--batch", type=int, default=16, help="events per relay batch (TAGGER_BATCH_SIZE)")
    parser.add_argument("--latency-events", type=int, default=30)
    parser.add_argument("--raw-seconds", type=float, default=20.0)
    args = parser.parse_args()
    result = run(args)
    result["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "end_to_end" if args.copies >= 3 else "end_to_end-quick"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
