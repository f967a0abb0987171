"""`tagger demo`: the whole service on the sample catalog, on embedded Postgres and Redis, with a summary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import text

from tagger.settings import REPO_ROOT

DEFAULT_CATALOG = REPO_ROOT / "samples" / "catalog" / "catalog.jsonl"


def _psql_command(database_url: str) -> str:
    """A psql invocation for the URL (unix-socket URLs carry the host as a query parameter)."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    host = url.query.get("host") or url.host or "localhost"
    parts = ["psql", f"-h {host}"]
    if url.port:
        parts.append(f"-p {url.port}")
    parts.append(f"-U {url.username or 'postgres'}")
    parts.append(url.database or "postgres")
    return " ".join(parts)


def _start_worker(settings: Any, concurrency: int, log_path: Path, image_root: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["TAGGER_DATABASE_URL"] = settings.database_url
    env["TAGGER_BROKER_URL"] = settings.broker_url
    roots = [str(p) for p in settings.image_roots] + [str(image_root)]
    env["TAGGER_IMAGE_ROOTS"] = os.pathsep.join(dict.fromkeys(roots))
    log_file = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "tagger", "worker", "--concurrency", str(concurrency), "--loglevel", "INFO"],
        stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )


def _stop_worker(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # warm shutdown: finish the current task, then exit
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _progress(conn: Any, skus: list[str], model_id: str) -> tuple[int, int]:
    # Embeddings of this model, so a database left by an earlier run with another model does not count.
    done = conn.execute(text("SELECT count(*) FROM embeddings WHERE sku = ANY(:s) AND model_id = :m"),
                        {"s": skus, "m": model_id}).scalar()
    failed = conn.execute(
        text("SELECT count(DISTINCT sku) FROM failures WHERE sku = ANY(:s) AND resolved_at IS NULL"), {"s": skus}
    ).scalar()
    return int(done or 0), int(failed or 0)


def run_demo(catalog: Path = DEFAULT_CATALOG, concurrency: int = 2, timeout_s: float = 600) -> int:
    from tqdm import tqdm

    from tagger.cli import resolved_settings
    from tagger.db import migrate
    from tagger.db.engine import get_engine
    from tagger.encoders.base import get_encoder, model_dimension
    from tagger.events import publish, read_catalog
    from tagger.taxonomy import load_taxonomies

    started = time.monotonic()
    if not catalog.is_file():
        print(f"tagger demo: catalog {catalog} not found", file=sys.stderr)
        return 2
    print("tagger demo: starting embedded services (Postgres+pgvector, Redis) where no URLs are configured ...")
    settings = resolved_settings()
    assert settings.database_url and settings.broker_url
    print(f"  database: {settings.database_url}\n  broker:   {settings.broker_url}\n  model:    {settings.model}")
    migrate.upgrade(settings.database_url, model_dimension(settings.model))
    model_id = get_encoder(settings.model, "cpu").model_id
    taxonomies = load_taxonomies(settings.taxonomy_dir)
    events = list(read_catalog(catalog))
    skus = [str(e["sku"]) for e in events]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.data_dir / "demo-worker.log"
    print(f"  worker:   {concurrency} process(es), log in {log_path}")
    worker = _start_worker(settings, concurrency, log_path, catalog.parent.resolve())
    engine = get_engine(settings.database_url)
    try:
        publish(events)
        print(f"published {len(events)} product events from {catalog}")
        deadline = time.monotonic() + timeout_s
        with tqdm(total=len(skus), unit="product", desc="tagging") as bar:
            while True:
                with engine.connect() as conn:
                    done, failed = _progress(conn, skus, model_id)
                bar.n = done + failed
                bar.set_postfix(failed=failed)
                bar.refresh()
                if done + failed >= len(skus):
                    break
                if worker.poll() is not None:
                    print(f"\nthe worker exited with code {worker.returncode}; see {log_path}", file=sys.stderr)
                    return 1
                if time.monotonic() > deadline:
                    print(f"\ntimed out after {timeout_s:.0f}s; see {log_path}", file=sys.stderr)
                    return 1
                time.sleep(0.5)
    finally:
        _stop_worker(worker)
    with engine.connect() as conn:
        summary = _summary(conn, events, taxonomies, model_id)
    _print_summary(summary, settings.database_url, time.monotonic() - started)
    return 0


def _summary(conn: Any, events: list[dict[str, Any]], taxonomies: Any, model_id: str) -> dict[str, Any]:
    skus = [e["sku"] for e in events]
    tags = conn.execute(
        text("SELECT sku, attribute, value, path, score, status, rank FROM tags WHERE sku = ANY(:s) "
             "AND model_id = :m ORDER BY sku, attribute, rank"), {"s": skus, "m": model_id}).all()
    top: dict[str, dict[str, tuple[str, float, str, str | None]]] = {}
    for sku, attribute, value, path, score, status, rank in tags:
        if rank == 1:
            top.setdefault(sku, {})[attribute] = (value, float(score), status, path)
    category = taxonomies.attribute("category")
    colour = taxonomies.attribute("colour")
    agreement: dict[str, Counter[str]] = {"category": Counter(), "colour": Counter()}
    for event in events:
        attrs = event.get("attributes") or {}
        tags_of = top.get(event["sku"], {})
        for name, attribute, column in (("category", category, "articleType"), ("colour", colour, "baseColour")):
            truth = attrs.get(column)
            expected = attribute.match_value(str(truth)) if truth else None
            if expected is None or name not in tags_of:
                continue
            agreement[name]["total"] += 1
            chosen = tags_of[name][0]
            if chosen == expected.key or expected.key in attribute.ancestors(chosen):
                agreement[name]["agree"] += 1
    # Every two SKUs of one seeded group (an original and its altered copies) are a true pair.
    groups: dict[str, set[str]] = {}
    for e in events:
        original = (e.get("attributes") or {}).get("duplicate_of")
        if original:
            groups.setdefault(original, {original}).add(e["sku"])
    expected_pairs = {(a, b) for group in groups.values() for a in group for b in group if a < b}
    pairs = conn.execute(
        text("SELECT sku_a, sku_b, similarity FROM duplicate_matches WHERE sku_a = ANY(:s) AND sku_b = ANY(:s) "
             "AND model_id = :m ORDER BY similarity DESC"), {"s": skus, "m": model_id}).all()
    found = {(a, b) for a, b, _ in pairs}
    failures = conn.execute(
        text("SELECT sku, stage, error_class, message FROM failures WHERE sku = ANY(:s) AND resolved_at IS NULL"),
        {"s": skus}).all()
    review = sum(1 for sku in top for (_, _, status, _) in top[sku].values() if status == "needs_review")
    return {"top": top, "agreement": agreement, "pairs": pairs, "expected_pairs": expected_pairs, "found": found,
            "failures": failures, "events": events, "review": review,
            "tag_rows": len(tags), "model_id": model_id}


def _print_summary(s: dict[str, Any], database_url: str, elapsed: float) -> None:
    events = s["events"]
    print(f"\n=== tagger demo: {len(events)} products in {elapsed:.0f}s, model {s['model_id']} ===")
    print(f"{s['tag_rows']} tag rows; {s['review']} top tags wait for review (under their attribute's threshold)\n")
    shown = [e for e in events if not (e.get("attributes") or {}).get("duplicate_of")][:: max(1, len(events) // 4)][:4]
    for event in shown:
        tags = s["top"].get(event["sku"], {})
        print(f"{event['sku']}  {event.get('title', '')}")
        for attribute, (value, score, status, path) in tags.items():
            flag = "" if status == "accepted" else f"  ({status})"
            print(f"    {attribute:<14} {path or value:<36} {score:.2f}{flag}")
        print()
    for name, counter in s["agreement"].items():
        if counter["total"]:
            print(f"agreement with the sample's known {'article type' if name == 'category' else 'base colour'}: "
                  f"{counter['agree']}/{counter['total']} = {counter['agree'] / counter['total']:.0%}")
    expected, found = s["expected_pairs"], s["found"]
    print(f"\nnear-duplicate pairs: {len(found)} found; {len(expected & found)}/{len(expected)} of the seeded altered "
          "copies' pairs recovered")
    for a, b, similarity in s["pairs"][:15]:
        marker = "seeded" if (a, b) in expected else "      "
        print(f"    {marker}  {a:<22} {b:<22} {similarity:.3f}")
    if s["failures"]:
        print(f"\n{len(s['failures'])} failure(s):")
        for sku, stage, error_class, message in s["failures"][:10]:
            print(f"    {sku}: [{stage}] {error_class}: {message}")
    psql = _psql_command(database_url)
    print("\nAsk it yourself in SQL:")
    print(f"    {psql}")
    print("  -- the tags of one product")
    print(f"    SELECT attribute, value, path, round(score::numeric, 2) AS score, status FROM product_tags "
          f"WHERE sku = '{shown[0]['sku'] if shown else 'KAGL-2227'}' ORDER BY attribute;")
    print("  -- the 5 products that look most like it (cosine distance on image embeddings, HNSW index)")
    print("    SELECT e2.sku, p.title, round((1 - (e2.image_embedding <=> e1.image_embedding))::numeric, 3) AS similarity "
          "FROM embeddings e1 JOIN embeddings e2 ON e2.model_id = e1.model_id AND e2.sku <> e1.sku "
          f"JOIN products p ON p.sku = e2.sku WHERE e1.sku = '{shown[0]['sku'] if shown else 'KAGL-2227'}' "
          "ORDER BY e2.image_embedding <=> e1.image_embedding LIMIT 5;")
    print("  -- near-duplicate SKUs, from either side")
    print("    SELECT sku, duplicate_sku, round(similarity::numeric, 3) FROM duplicate_pairs ORDER BY similarity DESC;")
    # The web process reads product photos with the same image-root rule as the workers.
    folders = sorted({str(Path(e["image"]).parent) for e in events
                      if e.get("image") and not str(e["image"]).startswith(("http://", "https://"))})
    roots = f"TAGGER_IMAGE_ROOTS={os.pathsep.join(folders)} " if folders else ""
    print(f"\nReview tags and duplicates in a browser: run `{roots}tagger serve`, then open "
          "http://127.0.0.1:8080/review (decisions land in the tags table; see docs/review.md)")
    print("\nThe embedded servers keep running for these queries; `tagger services stop` stops them.")
