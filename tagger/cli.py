"""The ``tagger`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tagger.errors import TaggerError
from tagger.settings import Settings, get_settings, set_settings

log = logging.getLogger("tagger.cli")


def resolved_settings() -> Settings:
    """Settings with database and broker URLs filled in (starting embedded servers when unset), exported to the
    environment so that worker processes started from here use the same servers."""
    from tagger import services

    settings = services.resolve(get_settings())
    set_settings(settings)
    os.environ["TAGGER_DATABASE_URL"] = str(settings.database_url)
    os.environ["TAGGER_BROKER_URL"] = str(settings.broker_url)
    return settings


# ---- commands ------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from tagger.db import migrate
    from tagger.encoders.base import model_dimension

    settings = resolved_settings()
    dim = model_dimension(settings.model)
    assert settings.database_url
    if args.downgrade:
        migrate.downgrade(settings.database_url, dim, args.downgrade)
        print(f"database downgraded to {args.downgrade}")
    else:
        migrate.upgrade(settings.database_url, dim)
        print(f"database at revision {migrate.current_revision(settings.database_url)} ({dim}-d embeddings)")
    return 0


def worker_argv(settings: Settings, concurrency: int | None, queues: str | None, loglevel: str) -> list[str]:
    from tagger.events import BULK_QUEUE, QUEUE

    return ["worker", "--queues", queues or f"{QUEUE},{BULK_QUEUE}",
            "--concurrency", str(concurrency or settings.worker_concurrency),
            "--loglevel", loglevel, "--without-gossip", "--without-mingle"]


def cmd_worker(args: argparse.Namespace) -> int:
    settings = resolved_settings()
    # Importing torch here (no ops!) lets forked children start fast; an op here would hang them.
    import torch  # noqa: F401

    from tagger.worker.app import app

    app.worker_main(worker_argv(settings, args.concurrency, args.queues, args.loglevel))
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    from tagger import outbox
    from tagger.db.engine import get_engine
    from tagger.encoders.base import get_encoder
    from tagger.events import BULK_QUEUE, QUEUE
    from tagger.taxonomy import load_taxonomies

    settings = resolved_settings()
    engine = get_engine(str(settings.database_url))
    model_id = get_encoder(settings.model, "cpu").model_id

    def reconcile_pass() -> int:
        # Taxonomies are re-read each pass, so an edited taxonomy counts as the current version.
        versions = list(load_taxonomies(settings.taxonomy_dir).versions.values())
        return outbox.reconcile(engine, model_id, versions)

    log.info("relay started (poll %.1fs, redeliver after %.0fs)", args.poll, args.redeliver_after)
    outbox.run_relay(engine, outbox.celery_sender(), poll_s=args.poll, redeliver_after_s=args.redeliver_after,
                     max_attempts=settings.max_retries,
                     queue_depth=outbox.redis_queue_depth(str(settings.broker_url), QUEUE, BULK_QUEUE),
                     reconcile_every_s=args.reconcile_every, reconcile_pass=None if args.no_reconcile else reconcile_pass)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tagger.web.serve import main

    return int(main(args.rest) or 0)


def _load_events(path: str) -> list[dict[str, object]]:
    raw = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    stripped = raw.strip()
    if stripped.startswith("["):
        return list(json.loads(stripped))
    if "\n" in stripped and not stripped.startswith("{\n"):
        try:
            return [json.loads(line) for line in stripped.splitlines() if line.strip()]
        except json.JSONDecodeError:
            pass
    return [json.loads(stripped)]


def cmd_publish(args: argparse.Namespace) -> int:
    from tagger.events import new_event, parse_event, publish

    resolved_settings()
    events = [new_event(**e) if isinstance(e, dict) and "type" in e and "sku" in e else e for e in _load_events(args.file)]
    for event in events:
        parse_event(event)  # refuse the whole file before sending anything
    sent = publish(events)
    print(f"published {sent} event(s)")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from tagger.events import publish, read_catalog

    resolved_settings()
    events = list(read_catalog(Path(args.catalog), event_type=args.type))
    sent = publish(events, validate=not args.no_validate, source="ingest")
    print(f"published {sent} event(s) from {args.catalog}")
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    from tagger import services

    settings = get_settings()
    if args.action == "start":
        resolved = services.resolve(settings)
        print(f"TAGGER_DATABASE_URL={resolved.database_url}\nTAGGER_BROKER_URL={resolved.broker_url}")
    elif args.action == "stop":
        stopped = services.stop_embedded(settings)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        print(json.dumps(services.embedded_status(settings), indent=2, default=str))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sqlalchemy import text

    from tagger.db.engine import get_engine

    settings = resolved_settings()
    assert settings.database_url
    with get_engine(settings.database_url).connect() as conn:
        counts = {
            name: conn.execute(text(sql)).scalar()
            for name, sql in {
                "products": "SELECT count(*) FROM products",
                "embeddings": "SELECT count(*) FROM embeddings",
                "tags": "SELECT count(*) FROM tags",
                "tags needing review": "SELECT count(*) FROM tags WHERE status = 'needs_review'",
                "duplicate pairs": "SELECT count(*) FROM duplicate_matches",
                "open failures": "SELECT count(*) FROM failures WHERE resolved_at IS NULL",
            }.items()
        }
    for name, value in counts.items():
        print(f"{name:>20}: {value}")
    return 0


def cmd_failures(args: argparse.Namespace) -> int:
    from sqlalchemy import text

    from tagger.db.engine import get_engine

    settings = resolved_settings()
    assert settings.database_url
    with get_engine(settings.database_url).connect() as conn:
        rows = conn.execute(text(
            "SELECT last_seen, sku, stage, error_class, attempts, message FROM failures "
            "WHERE resolved_at IS NULL OR :all ORDER BY last_seen DESC LIMIT :limit"),
            {"all": args.all, "limit": args.limit}).all()
    if not rows:
        print("no open failures")
    for last_seen, sku, stage, error_class, attempts, message in rows:
        print(f"{last_seen:%Y-%m-%d %H:%M:%S}  {sku or '-':<24} {stage:<9} {error_class:<18} x{attempts}  {message}")
    return 0


def cmd_taxonomy(args: argparse.Namespace) -> int:
    from tagger.taxonomy.commands import main

    return int(main(args.rest) or 0)


def cmd_exemplars(args: argparse.Namespace) -> int:
    from tagger.exemplars.commands import main

    return int(main(args.rest) or 0)


def cmd_model_train(args: argparse.Namespace) -> int:
    from tagger.modeling.train import main

    return int(main(args.rest) or 0)


def cmd_eval(args: argparse.Namespace) -> int:
    from tagger.evaluation.cli import main

    return int(main(args.rest) or 0)


def cmd_demo(args: argparse.Namespace) -> int:
    from tagger.demo import run_demo

    return run_demo(catalog=Path(args.catalog), concurrency=args.concurrency, timeout_s=args.timeout)


# ---- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from tagger.demo import DEFAULT_CATALOG

    parser = argparse.ArgumentParser(prog="tagger", description="Catalog auto-tagging for fashion retail.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole service on the sample catalog and print a summary")
    p.add_argument("--catalog", default=str(DEFAULT_CATALOG), help="catalog file (.jsonl/.csv/.parquet)")
    p.add_argument("--concurrency", type=int, default=2, help="worker processes")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the worker")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("worker", help="run a Celery worker that processes product events")
    p.add_argument("--concurrency", type=int, help="worker processes (TAGGER_WORKER_CONCURRENCY)")
    p.add_argument("--queues", help="comma-separated queues to consume")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("relay", help="deliver outbox events to the workers; re-send lost ones; reconcile")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between passes (NOTIFY wakes it sooner)")
    p.add_argument("--redeliver-after", type=float, default=60.0, help="seconds before an unprocessed event is re-sent")
    p.add_argument("--reconcile-every", type=float, default=60.0, help="seconds between reconciliation passes")
    p.add_argument("--no-reconcile", action="store_true")
    p.set_defaults(func=cmd_relay)

    p = sub.add_parser("serve", help="receive signed product events over HTTP (webhooks); /healthz, /metrics",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="create or upgrade the database schema (Alembic)")
    p.add_argument("--downgrade", metavar="REVISION", help="downgrade to REVISION instead (e.g. base)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("publish", help="publish product event(s) from a JSON file ('-' for stdin)")
    p.add_argument("file")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("ingest", help="publish one event per row of a catalog (.jsonl/.json/.csv/.parquet)")
    p.add_argument("catalog")
    p.add_argument("--type", default="product.created", choices=["product.created", "product.updated"])
    p.add_argument("--no-validate", action="store_true", help="let the workers validate and record bad rows")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("services", help="start, stop or inspect the embedded Postgres and Redis")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.set_defaults(func=cmd_services)

    p = sub.add_parser("status", help="counts of products, tags, duplicates and open failures")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("failures", help="list recorded failures (newest first)")
    p.add_argument("--all", action="store_true", help="include resolved ones")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_failures)

    p = sub.add_parser("taxonomy", help="validate, diff and apply taxonomy edits", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_taxonomy)

    p = sub.add_parser("exemplars", help="a shop's labelled examples: import, list, remove, check, retag",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exemplars)

    p = sub.add_parser("model", help="the default model")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    mt = msub.add_parser("train", help="train the default model's heads (see tagger/models/default/MODEL_CARD.md)",
                         add_help=False)
    mt.add_argument("rest", nargs=argparse.REMAINDER)
    mt.set_defaults(func=cmd_model_train)

    p = sub.add_parser("eval", help="measure tagging quality on a labelled catalog", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_eval)
    return parser


def _arguments_after(argv: Sequence[str], path: Sequence[str]) -> list[str]:
    position = 0
    for word in path:
        position = list(argv).index(word, position) + 1
    return list(argv[position:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "rest"):
        # Commands with their own parsers (taxonomy, model train, eval, ...) get every argument after their name,
        # --help too, in the order given (argparse's REMAINDER drops or reorders leading options).
        path = [args.command] + ([args.model_command] if getattr(args, "model_command", None) else [])
        args.rest = _arguments_after(argv, path)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from tagger.logs import configure_logging

    configure_logging(logging.INFO if args.verbose else logging.WARNING, get_settings().log_format)
    try:
        return int(args.func(args) or 0)
    except TaggerError as exc:
        print(f"tagger: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
