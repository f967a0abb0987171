"""HTTP side of tagger: the signed webhook receiver (``tagger serve``), health checks and metrics."""

from tagger.web.app import create_app

__all__ = ["create_app"]
