"""Benchmark: add 100 exemplars to one attribute and re-tag it for N products from stored embeddings and features.

Reuses ``bench/retag.py``'s set-up (a fresh database on the configured Postgres, N products with synthetic unit
512-d image embeddings COPYed in, HNSW indexes dropped), then stores synthetic 1280-d backbone features
(``embeddings.image_features``, halfvec; the default model's size) for every product: a common positive offset
plus one of the `style` label directions, as post-ReLU CNN features look. `style` is tagged zero-shot once as the
baseline, then timed:

- ``import + re-tag``: 100 exemplars (20 per label of 5 labels) added, `style` re-tagged for every product
  (what ``tagger exemplars import`` does after validating the file);
- ``re-run``: the same re-tag again (no score changes, nothing rewritten).

Writes bench/results/exemplar_retag.json and bench/results/exemplar_retag.md.

    .venv/bin/python bench/exemplar_retag.py                 # 100,000 products
    .venv/bin/python bench/exemplar_retag.py --products 20000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tagger import retag, services  # noqa: E402
from tagger.db import exemplar_repository as exrepo  # noqa: E402
from tagger.db import migrate  # noqa: E402
from tagger.db import repository as repo  # noqa: E402
from tagger.db.engine import create_database, get_engine, make_engine  # noqa: E402
from tagger.encoders.base import get_encoder  # noqa: E402
from tagger.exemplars.commands import retag_attributes  # noqa: E402
from tagger.settings import Settings  # noqa: E402
from tagger.taxonomy import load_taxonomies  # noqa: E402

FEATURE_DIM = 1280
ATTRIBUTE = "style"
LABELS = ("casual", "formal", "sporty", "ethnic", "party")
PER_LABEL = 20


def _bench_retag():  # noqa: ANN202 - the sibling benchmark module
    spec = importlib.util.spec_from_file_location("bench_retag", ROOT / "bench" / "retag.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_features(url: str, n: int, model_id: str, seed: int = 1) -> float:
    """Synthetic backbone features for every product (binary COPY into a temporary table, one UPDATE)."""
    from pgvector import HalfVector

    rng = np.random.default_rng(seed)
    directions = np.abs(rng.normal(0, 1, (len(LABELS), FEATURE_DIM))).astype(np.float32)
    started = time.perf_counter()
    with get_engine(url).begin() as conn:
        raw = conn.connection.dbapi_connection
        with raw.cursor() as cur:
            cur.execute("CREATE TEMP TABLE bench_features (sku text PRIMARY KEY, f halfvec) ON COMMIT DROP")
            with cur.copy("COPY bench_features (sku, f) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "halfvec"])
                for start in range(0, n, 10_000):
                    size = min(10_000, n - start)
                    block = np.abs(rng.normal(0, 0.5, (size, FEATURE_DIM))).astype(np.float32) + 0.5
                    block += directions[np.arange(start, start + size) % len(LABELS)]
                    for j, vector in enumerate(block):
                        copy.write_row((f"SKU-{start + j:07d}", HalfVector(vector)))
            cur.execute("UPDATE embeddings e SET image_features = b.f FROM bench_features b "
                        "WHERE b.sku = e.sku AND e.model_id = %s", (model_id,))
        conn.execute(text("ANALYZE embeddings"))
    return time.perf_counter() - started


def _backend_cpu(engine) -> float:  # noqa: ANN001
    """CPU seconds (user + system) used so far by the Postgres backends serving this database (same machine)."""
    with engine.connect() as conn:
        pids = [r[0] for r in conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"))]
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # another user's process or gone: not counted
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def timed(engine, run):  # noqa: ANN001, ANN201
    """(result, wall seconds, CPU seconds of this process plus the database backends): on a machine shared with
    other jobs the wall time mostly measures the others; the CPU time is what the work costs."""
    cpu_before = time.process_time() + _backend_cpu(engine)
    started = time.perf_counter()
    result = run()
    wall = time.perf_counter() - started
    return result, wall, time.process_time() + _backend_cpu(engine) - cpu_before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "exemplar_retag.json"))
    args = parser.parse_args()

    base = services.resolve(Settings.from_env())
    assert base.database_url
    name = f"tagger_bench_exemplars_{os.getpid()}"
    url = create_database(base.database_url, name)
    migrate.upgrade(url, 512)
    encoder = get_encoder("default", "cpu")
    settings = base.with_overrides(database_url=url, model="default")
    taxonomies = load_taxonomies(settings.taxonomy_dir)
    engine = get_engine(url)
    n = args.products
    try:
        copy_s = _bench_retag().load_products(url, n, encoder.model_id)
        features_s = load_features(url, n, encoder.model_id)
        print(f"loaded {n:,} products in {copy_s:.1f} s, their features in {features_s:.1f} s", file=sys.stderr)
        started = time.perf_counter()
        with engine.begin() as conn:
            prototypes, _ = retag.ensure_label_embeddings(conn, taxonomies.taxonomies, encoder)
        retag.rescore(engine, taxonomies, prototypes, [ATTRIBUTE], encoder=encoder, settings=settings)
        with engine.begin() as conn:
            repo.mark_taxonomies_applied(conn, taxonomies.versions)
        baseline_s = time.perf_counter() - started

        # 100 exemplars: the first products of each synthetic cluster (SKU i belongs to LABELS[i % 5]).
        rows = [(f"SKU-{i * len(LABELS) + k:07d}", "style", ATTRIBUTE, label)
                for k, label in enumerate(LABELS) for i in range(PER_LABEL)]

        def add_and_retag():  # noqa: ANN202
            with engine.begin() as conn:
                added = exrepo.add_exemplars(conn, rows, source="import", created_by="bench")
            return added, retag_attributes(engine, settings, taxonomies, [ATTRIBUTE])

        (added, result), exemplar_s, exemplar_cpu = timed(engine, add_and_retag)
        rerun, rerun_s, rerun_cpu = timed(engine, lambda: retag_attributes(engine, settings, taxonomies, [ATTRIBUTE]))
        with engine.connect() as conn:
            contributed = conn.execute(text("SELECT count(DISTINCT sku) FROM tags WHERE attribute = :a "
                                            "AND exemplars > 0"), {"a": ATTRIBUTE}).scalar()
            agree = conn.execute(text(
                "SELECT count(*) FROM tags WHERE attribute = :a AND rank = 1 AND value = "
                "(ARRAY['casual','formal','sporty','ethnic','party'])[(substring(sku from 5)::int % 5) + 1]"),
                {"a": ATTRIBUTE}).scalar()
    finally:
        engine.dispose()
        if not args.keep:
            admin = make_engine(base.database_url, register_vectors=False)
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

    runs = [
        {"run": f"baseline: tag `{ATTRIBUTE}` zero-shot (3 rows per product)", "seconds": baseline_s},
        {"run": f"add {added} exemplars + re-tag `{ATTRIBUTE}` from stored embeddings and features",
         "seconds": exemplar_s, "cpu_seconds": exemplar_cpu, "rows_written": result.rows_written,
         "rows_deleted": result.rows_deleted},
        {"run": "re-tag again, nothing changed", "seconds": rerun_s, "cpu_seconds": rerun_cpu,
         "rows_written": rerun.rows_written},
    ]
    for run in runs:
        run["seconds"] = round(run["seconds"], 2)
        if "cpu_seconds" in run:
            run["cpu_seconds"] = round(run["cpu_seconds"], 2)
        run["products_per_s"] = round(n / run["seconds"]) if run["seconds"] > 0 else None
    report = {
        "products": n, "feature_dim": FEATURE_DIM, "exemplars": added, "model": encoder.model_id,
        "products_with_exemplar_contribution": contributed, "top_label_matches_synthetic_cluster": agree,
        "copy_seconds": round(copy_s, 1), "feature_copy_seconds": round(features_s, 1),
        "chunk_size": retag.DEFAULT_CHUNK, "target_seconds": 30,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "command": "nice -n 10 .venv/bin/python bench/exemplar_retag.py" + (f" --products {n}" if n != 100_000 else ""),
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Exemplar re-tag benchmark ({n:,} products, {FEATURE_DIM}-d halfvec features)", "",
             f"Command: `{report['command']}`; machine: {os.cpu_count()} CPUs, load average at the end "
             f"{report['machine']['load_average_at_end']}.", "",
             "CPU seconds: this process plus the Postgres backends of the benchmark database (user + system), i.e. "
             "the work itself; wall seconds also count waiting for the other jobs on the machine.", "",
             f"| run ({n:,} products) | wall seconds | CPU seconds | products/s (wall) | tag rows written |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for run in runs:
        lines.append(f"| {run['run']} | {run['seconds']:.2f} | {run.get('cpu_seconds', '–')} | "
                     f"{run['products_per_s'] or '–'} | {run.get('rows_written', '–')} |")
    lines += ["", f"Products whose `{ATTRIBUTE}` tags record exemplar contribution: {contributed:,}; top label equal "
                  f"to the synthetic cluster: {agree:,}.", ""]
    out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
