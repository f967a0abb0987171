"""The merchandisers' review page (``/review`` on ``tagger serve``): queue, duplicates, why-this-tag, health."""

from tagger.web.review.routes import mount_review

__all__ = ["mount_review"]
