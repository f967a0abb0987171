"""The Celery application. Broker and database come from the settings (embedded servers when unset).

Delivery is at-least-once: late acks, reject on worker lost, prefetch 1. Tasks are idempotent, so a
redelivered message does no harm.
"""

from __future__ import annotations

import logging
import os

from celery import Celery, signals

from tagger.events import BATCH_TASK_NAME, QUEUE, TASK_NAME

log = logging.getLogger("tagger.worker")

app = Celery("tagger", include=["tagger.worker.tasks", "tagger.worker.taxonomy_tasks"])


def celery_config(broker_url: str, settings_visibility_s: int) -> dict[str, object]:
    return {
        "broker_url": broker_url,
        "task_ignore_result": True,  # results live in Postgres; the broker only carries events
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": QUEUE,
        # Default routes; the relay names the queue per message (live changes vs bulk loads).
        "task_routes": {TASK_NAME: {"queue": QUEUE}, BATCH_TASK_NAME: {"queue": QUEUE}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        # Unacked messages of a dead worker come back after the visibility timeout; it must exceed the
        # longest task (the hard time limit) but stay short enough that a crash is repaired quickly.
        "broker_transport_options": {"visibility_timeout": settings_visibility_s},
    }


@app.on_configure.connect
def _configure(sender: Celery, **_: object) -> None:
    # Resolving the broker may start the embedded Redis, so it happens on first use, not at import.
    from tagger import services
    from tagger.settings import get_settings

    settings = get_settings()
    sender.conf.update(celery_config(services.broker_url(settings), max(60, settings.task_time_limit_s * 2)))
    sender.conf.update(
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        # A recycled child loads the model before it reports "up"; Celery's 4 s default would kill it in a loop.
        worker_proc_alive_timeout=120,
    )


@signals.setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: object) -> None:
    # Our format (text or JSON with sku and event id) for the worker and its children, instead of Celery's.
    from tagger.logs import configure_logging
    from tagger.settings import get_settings

    configure_logging(loglevel or logging.INFO, get_settings().log_format)


@signals.worker_process_init.connect
def _init_child(**_: object) -> None:
    """Each forked child: one torch thread per child, fresh database connections, warm model."""
    from tagger.db.engine import dispose_engines
    from tagger.worker.tasks import pipeline

    dispose_engines()
    threads = int(os.environ.get("TAGGER_TORCH_THREADS", "1"))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        p = pipeline()
        p.encoder.load()
        p.prototypes()
        log.info("worker child ready with model %s", p.encoder.model_id)
    except Exception:  # noqa: BLE001 - a child that cannot warm up still serves and records failures per task
        log.exception("worker child could not warm up; tasks will retry loading")
