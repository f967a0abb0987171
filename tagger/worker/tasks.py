"""Celery tasks. Each is a thin wrapper: the work is in ``tagger.pipeline``."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from tagger.errors import PoisonEvent, TransientError
from tagger.events import BATCH_TASK_NAME, TASK_NAME, event_id_hint
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


def _given_up_as_poison(p: Pipeline, payload: Any, deliveries: int | None) -> PoisonEvent | None:
    """A message that kills its worker process is redelivered forever under reject_on_worker_lost: after a few
    starts, record it as failed and settle its outbox row (returns the error), else None."""
    if deliveries is None or deliveries <= p.settings.max_retries + 3:
        return None
    exc = PoisonEvent(f"event started {deliveries - 1} times without finishing (the worker process died each "
                      "time, e.g. out of memory or a time limit); given up, check the worker logs")
    p.record_failure(payload, exc)
    p.mark_delivered(payload, "failed")
    return exc


def backoff_seconds(retries: int, cap: int) -> int:
    return int(min(cap, 2 ** (retries + 1)))


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def process_event(self: Task, payload: Any) -> dict[str, str | None]:
    """Process one product event (see ``tagger.events`` for the contract)."""
    p = pipeline()
    poison = _given_up_as_poison(p, payload, p.count_delivery(payload))
    if poison is not None:
        return {"sku": None, "status": "failed", "detail": str(poison)}
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


@app.task(name=BATCH_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def process_events(self: Task, payloads: list[Any]) -> dict[str, int]:
    """Process several events at once (what the relay sends): one forward pass, one transaction.

    A batch that was started before (its worker died, or it was retried) is processed one event at a
    time, so a poison event takes only itself down and the others finish.
    """
    p = pipeline()
    if not isinstance(payloads, list):  # a hand-made message: treat it as one event
        payloads = [payloads]
    deliveries = p.count_deliveries(payloads)
    todo = [payload for payload, count in zip(payloads, deliveries, strict=True)
            if _given_up_as_poison(p, payload, count) is None]
    restarted = any(count is not None and count > 1 for count in deliveries)
    groups = [[payload] for payload in todo] if restarted else [todo]
    counts: dict[str, int] = {}
    for group in groups:
        try:
            results = p.handle_batch(group)
        except TransientError as exc:  # the database is down: retry the whole (idempotent) batch
            raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries, p.settings.retry_backoff_max_s),
                             max_retries=p.settings.max_retries) from exc
        except Exception as exc:  # noqa: BLE001 - a bug: redo the batch event by event so only the culprit is recorded
            if len(group) == 1:
                log.exception("unexpected error while processing an event")
                _settle_failed(p, group[0], exc)
                counts["failed"] = counts.get("failed", 0) + 1
                continue
            log.exception("unexpected error in a batch of %d events; processing them one by one", len(group))
            results = []
            for payload in group:
                try:
                    results.extend(p.handle_batch([payload]))
                except TransientError as single_exc:
                    results.append(single_exc)
                except Exception as single_exc:  # noqa: BLE001
                    log.exception("unexpected error while processing an event")
                    _settle_failed(p, payload, single_exc)
                    results.append(None)
        settled: list[tuple[Any, str]] = []
        for payload, result in zip(group, results, strict=True):
            if result is None:
                status = "failed"
            elif isinstance(result, TransientError):
                # Retried alone, with backoff, as a single-event task; its outbox row stays open meanwhile.
                log.warning("transient failure, retrying the event alone: %s", result,
                            extra={"event_id": event_id_hint(payload)})
                queue = (self.request.delivery_info or {}).get("routing_key")
                process_event.apply_async(args=[payload], queue=queue,
                                          countdown=backoff_seconds(0, p.settings.retry_backoff_max_s))
                status = "retrying"
            else:
                log.info("event %s: %s", result.status, result.detail,
                         extra={"sku": result.sku, "event_id": event_id_hint(payload), "outcome": result.status})
                settled.append((payload, result.status))
                status = result.status
            counts[status] = counts.get(status, 0) + 1
        p.mark_delivered_many(settled)
    return counts


def _settle_failed(p: Pipeline, payload: Any, exc: BaseException) -> None:
    p.record_failure(payload, exc)
    p.mark_delivered(payload, "failed")
