"""Benchmark: re-tagging one attribute for N products after a taxonomy edit (``tagger taxonomy apply``).

Creates a fresh database on the configured Postgres (the embedded one when TAGGER_DATABASE_URL is unset),
COPYs N products with synthetic unit-norm 512-d image embeddings into it (the HNSW indexes are dropped first:
they serve duplicate search, not re-tagging, and building them for random vectors would dominate the set-up),
tags the `style` attribute once as the baseline, then times:

- ``new label``: add a label to `style` (prompt texts encoded, 1 attribute re-scored for every product);
- ``threshold only``: change `style`'s threshold (statuses re-evaluated from stored scores);
- ``re-run``: apply again with nothing changed (no-op).

Writes bench/results/retag.json and prints a Markdown table.

    .venv/bin/python bench/retag.py            # 100,000 products
    .venv/bin/python bench/retag.py --products 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tagger import retag, services  # noqa: E402
from tagger.db import migrate  # noqa: E402
from tagger.db import repository as repo  # noqa: E402
from tagger.db.engine import create_database, get_engine, make_engine  # noqa: E402
from tagger.encoders.base import get_encoder  # noqa: E402
from tagger.settings import Settings  # noqa: E402
from tagger.taxonomy import load_taxonomies  # noqa: E402

DIM = 512
QUIET_LUXURY = ("      quiet_luxury: {name: Quiet luxury, prompts: [quiet luxury clothing, understated expensive "
                "minimalist outfit], translations: {fr: Luxe discret, de: Stiller Luxus}}\n")


def load_products(url: str, n: int, model_id: str, seed: int = 0) -> float:
    """COPY n products and their synthetic image embeddings; returns seconds."""
    rng = np.random.default_rng(seed)
    engine = get_engine(url)
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX IF EXISTS embeddings_image_hnsw"))
        conn.execute(text("DROP INDEX IF EXISTS embeddings_text_hnsw"))
        raw = conn.connection.dbapi_connection
        with raw.cursor() as cur:
            with cur.copy("COPY products (sku, title, image_hash, text_hash) FROM STDIN") as copy:
                for i in range(n):
                    copy.write_row((f"SKU-{i:07d}", f"product {i}", f"img{i}", f"txt{i}"))
            with cur.copy("COPY embeddings (sku, model_id, image_embedding, image_hash, text_hash) "
                          "FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "text", "vector", "text", "text"])
                for start in range(0, n, 10_000):
                    block = rng.standard_normal((min(10_000, n - start), DIM)).astype(np.float32)
                    block /= np.linalg.norm(block, axis=1, keepdims=True)
                    for j, vector in enumerate(block):
                        i = start + j
                        copy.write_row((f"SKU-{i:07d}", model_id, vector, f"img{i}", f"txt{i}"))
        conn.execute(text("ANALYZE products"))
        conn.execute(text("ANALYZE embeddings"))
    return time.perf_counter() - started


def timed_apply(engine, tax_dir: Path, encoder, settings: Settings) -> tuple[float, retag.ApplyResult]:
    taxonomies = load_taxonomies(tax_dir)
    started = time.perf_counter()
    result = retag.apply_taxonomies(engine, taxonomies, encoder=encoder, settings=settings, progress=False)
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--model", default="default")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "retag.json"))
    args = parser.parse_args()

    base = services.resolve(Settings.from_env())
    assert base.database_url
    name = f"tagger_bench_retag_{os.getpid()}"
    url = create_database(base.database_url, name)
    migrate.upgrade(url, DIM)
    encoder = get_encoder(args.model, "cpu")
    encoder.load()
    tax_dir = Path(tempfile.mkdtemp(prefix="tagger-bench-tax-"))
    for path in (ROOT / "taxonomies").glob("*.yaml"):
        shutil.copy(path, tax_dir / path.name)
    settings = base.with_overrides(database_url=url, taxonomy_dir=tax_dir, model=args.model)
    engine = get_engine(url)
    try:
        copy_s = load_products(url, args.products, encoder.model_id)
        print(f"loaded {args.products:,} products with COPY in {copy_s:.1f} s", file=sys.stderr)

        # Baseline: the shipped taxonomies applied, `style` tagged for every product.
        taxonomies = load_taxonomies(tax_dir)
        started = time.perf_counter()
        with engine.begin() as conn:
            prototypes, _ = retag.ensure_label_embeddings(conn, taxonomies.taxonomies, encoder)
        products, baseline_rows, _ = retag.rescore(engine, taxonomies, prototypes, ["style"], encoder=encoder,
                                                   settings=settings)
        with engine.begin() as conn:
            repo.mark_taxonomies_applied(conn, taxonomies.versions)
        baseline_s = time.perf_counter() - started

        style = tax_dir / "style.yaml"
        style.write_text(style.read_text() + QUIET_LUXURY)
        label_s, label = timed_apply(engine, tax_dir, encoder, settings)
        assert label.diff.rescore == ("style",), label.diff.plan()

        style.write_text(style.read_text().replace("threshold: 0.45", "threshold: 0.5", 1))
        threshold_s, threshold = timed_apply(engine, tax_dir, encoder, settings)
        assert threshold.diff.redecide == ("style",) and not threshold.diff.rescore, threshold.diff.plan()

        rerun_s, rerun = timed_apply(engine, tax_dir, encoder, settings)
        assert rerun.noop
        with engine.connect() as conn:
            tags = conn.execute(text("SELECT count(*) FROM tags")).scalar()
    finally:
        engine.dispose()
        if not args.keep:
            admin = make_engine(base.database_url, register_vectors=False)
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
        shutil.rmtree(tax_dir, ignore_errors=True)

    n = args.products
    runs = [
        {"run": "baseline: tag `style` (3 rows per product)", "seconds": baseline_s, "rows_written": baseline_rows},
        {"run": "edit: new label in `style` (re-score 1 attribute)", "seconds": label_s,
         "rows_written": label.rows_written, "rows_deleted": label.rows_deleted,
         "texts_encoded": label.encoded_texts},
        {"run": "edit: `style` threshold only (statuses from stored scores)", "seconds": threshold_s,
         "rows_written": threshold.rows_written},
        {"run": "re-run apply, nothing changed (no-op)", "seconds": rerun_s, "rows_written": 0},
    ]
    for run in runs:
        run["seconds"] = round(run["seconds"], 2)
        run["products_per_s"] = round(n / run["seconds"]) if run["seconds"] > 0 else None
    report = {
        "products": n, "embedding_dim": DIM, "model": encoder.model_id, "tags_after": tags,
        "copy_seconds": round(copy_s, 1), "chunk_size": retag.DEFAULT_CHUNK,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"| run ({n:,} products) | seconds | products/s | tag rows written |")
    print("| --- | ---: | ---: | ---: |")
    for run in runs:
        print(f"| {run['run']} | {run['seconds']:.2f} | {run['products_per_s']:,} | {run['rows_written']:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
