"""Re-tagging after review decisions: approvals and corrections add exemplars (tagger.fewshot), and the
attribute is then re-scored for the whole catalog from stored embeddings, in a background thread of the web
process, so the page never waits for it and the next products' confidences reflect the decision within seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger("tagger.review")


class ExemplarRetagger:
    """Runs ``retag(attributes)`` in one background thread. Requests that arrive while a run is going are merged
    into the next run (a reviewer approving ten tags in a row costs two runs, not ten); a run refused because a
    taxonomy apply holds the lock is tried again after ``retry_s``."""

    def __init__(self, retag: Callable[[Sequence[str]], object], *, debounce_s: float = 0.5, retry_s: float = 5.0,
                 busy: type[BaseException] | tuple[type[BaseException], ...] = ()) -> None:
        self._retag = retag
        self._debounce_s = debounce_s
        self._retry_s = retry_s
        self._busy = busy
        self._pending: set[str] = set()
        self._running = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.completed_runs = 0

    def request(self, attributes: Iterable[str]) -> None:
        with self._cond:
            self._pending.update(attributes)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="tagger-exemplar-retag", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing is pending or running (for tests and orderly shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _loop(self) -> None:
        while True:
            time.sleep(self._debounce_s)
            with self._cond:
                if not self._pending:
                    return
                attributes = sorted(self._pending)
                self._pending.clear()
                self._running = True
            try:
                started = time.perf_counter()
                self._retag(attributes)
                log.info("re-tagged %s with the reviewers' exemplars in %.1f s", ", ".join(attributes),
                         time.perf_counter() - started)
            except self._busy as exc:
                log.info("exemplar re-tag postponed: %s", exc)
                with self._cond:
                    self._pending.update(attributes)
                time.sleep(self._retry_s)
            except Exception:  # noqa: BLE001 - a failed re-tag must not take the web process down; the next one retries
                log.exception("exemplar re-tag of %s failed; `tagger exemplars retag --attribute %s` repeats it",
                              ", ".join(attributes), attributes[0])
            finally:
                with self._cond:
                    self._running = False
                    self.completed_runs += 1
                    self._cond.notify_all()
