"""The taxonomy apply as a Celery task, so that a PIM or a git hook can trigger it.

Send ``tagger.apply_taxonomy`` (no arguments: the worker's ``TAGGER_TAXONOMY_DIR``) to the queue
``tagger.maintenance``; a worker started with ``tagger worker --queues tagger.events,tagger.maintenance`` (or a
dedicated ``--queues tagger.maintenance`` worker) runs it. ``send_apply()`` does that from Python. Invalid
taxonomy files are reported in the result and not applied. Applies are serialised by a database lock and
idempotent, so a redelivered message does no harm.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Task

from tagger.worker.app import app

log = logging.getLogger("tagger.worker")

APPLY_TASK_NAME = "tagger.apply_taxonomy"
MAINTENANCE_QUEUE = "tagger.maintenance"


@app.task(name=APPLY_TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, queue=MAINTENANCE_QUEUE,
          soft_time_limit=3300, time_limit=3600)
def apply_taxonomy(self: Task, taxonomy_dir: str | None = None) -> dict[str, Any]:
    """Validate the taxonomy files and apply them (re-tag what changed from stored embeddings)."""
    from tagger.retag import apply_taxonomies
    from tagger.taxonomy.loader import validate_taxonomies
    from tagger.worker.tasks import pipeline

    p = pipeline()
    directory = Path(taxonomy_dir) if taxonomy_dir else p.settings.taxonomy_dir
    taxonomies, errors = validate_taxonomies(directory)
    if errors or taxonomies is None:
        log.warning("taxonomy apply refused: %d problem(s) in %s", len(errors), directory)
        return {"status": "invalid", "errors": [str(e) for e in errors]}
    result = apply_taxonomies(p.engine, taxonomies, encoder=p.encoder, settings=p.settings)
    log.info("taxonomy apply: %s", result.summary())
    return {"status": "noop" if result.noop else "applied", "versions": result.diff.new_versions,
            "plan": result.diff.plan(), "products": result.products, "rows_written": result.rows_written,
            "rows_deleted": result.rows_deleted, "seconds": round(result.seconds, 3), "summary": result.summary()}


def send_apply(taxonomy_dir: str | None = None) -> str:
    """Queue an apply (what a PIM webhook or a git post-merge hook calls); returns the task id."""
    kwargs = {"taxonomy_dir": taxonomy_dir} if taxonomy_dir else {}
    return str(app.send_task(APPLY_TASK_NAME, kwargs=kwargs, queue=MAINTENANCE_QUEUE).id)
