"""Celery tasks. Each is a thin wrapper: the work is in ``tagger.pipeline``."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from tagger.errors import PoisonEvent, TransientError
from tagger.events import TASK_NAME, event_id_hint
from tagger.pipeline import Outcome, Pipeline
from tagger.worker.app import app

log = logging.getLogger("tagger.worker")

_pipeline: Pipeline | None = None


def pipeline() -> Pipeline:
    """The process's pipeline (model, engine, taxonomies), created on first use in each worker child."""
    global _pipeline
    if _pipeline is None:
        from tagger import services
        from tagger.settings import get_settings

        _pipeline = Pipeline(services.resolve(get_settings()))
    return _pipeline


def backoff_seconds(retries: int, cap: int) -> int:
    return int(min(cap, 2 ** (retries + 1)))


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def process_event(self: Task, payload: Any) -> dict[str, str | None]:
    """Process one product event (see ``tagger.events`` for the contract)."""
    p = pipeline()
    deliveries = p.count_delivery(payload)
    # A message that kills its worker process is redelivered forever under reject_on_worker_lost: stop it.
    if deliveries is not None and deliveries > p.settings.max_retries + 3:
        exc = PoisonEvent(f"event started {deliveries - 1} times without finishing (the worker process died each "
                          "time, e.g. out of memory or a time limit); given up, check the worker logs")
        p.record_failure(payload, exc)
        p.mark_delivered(payload, "failed")
        return {"sku": None, "status": "failed", "detail": str(exc)}
    try:
        outcome: Outcome = p.handle(payload)
    except TransientError as exc:
        if self.request.retries >= p.settings.max_retries:
            # Out of retries: record it where operators look, and stop redelivering.
            p.record_failure(payload, exc)
            p.mark_delivered(payload, "failed")
            return {"sku": None, "status": "failed", "detail": str(exc)}
        log.warning("transient failure, retrying: %s", exc,
                    extra={"event_id": event_id_hint(payload)})
        raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries, p.settings.retry_backoff_max_s),
                         max_retries=p.settings.max_retries) from exc
    except Exception as exc:  # noqa: BLE001 - a bug must not take the worker down nor loop forever
        log.exception("unexpected error while processing an event")
        try:
            p.record_failure(payload, exc)
            p.mark_delivered(payload, "failed")
        except Exception:  # noqa: BLE001 - the database itself may be down; then Celery's retry is all we have
            raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries, p.settings.retry_backoff_max_s),
                             max_retries=p.settings.max_retries) from exc
        return {"sku": None, "status": "failed", "detail": str(exc)}
    log.info("event %s: %s", outcome.status, outcome.detail,
             extra={"sku": outcome.sku, "event_id": event_id_hint(payload),
                    "outcome": outcome.status})
    p.mark_delivered(payload, outcome.status)
    return {"sku": outcome.sku, "status": outcome.status, "detail": outcome.detail}
