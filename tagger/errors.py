"""Errors tagger raises, each with a message an operator or merchandiser can act on.

Two families matter to the worker: ``PermanentError`` (retrying cannot help: the event or its
image is bad, so it goes to the failures table at once) and ``TransientError`` (a host or the
database is down: retry with backoff, then record the failure once retries run out).
"""

from __future__ import annotations


class TaggerError(Exception):
    """Base class of every error tagger raises on purpose."""

    stage: str = "process"


class ConfigurationError(TaggerError):
    """A setting or environment variable is missing or invalid."""

    stage = "config"


class PermanentError(TaggerError):
    """Retrying will not help; the event is recorded in the failures table."""


class TransientError(TaggerError):
    """A dependency is temporarily unavailable; the task is retried with backoff."""


class InvalidEvent(PermanentError):
    """The event does not follow the event contract (see README, "Event contract")."""

    stage = "validate"


class ProductNotFound(PermanentError):
    """An update or delete names a SKU the database does not know."""

    stage = "lookup"


class ImageError(PermanentError):
    """Base class for images that cannot be used."""

    stage = "image"


class ImageNotAllowed(ImageError):
    """The image reference points somewhere tagger is configured not to read."""


class ImageNotFound(ImageError):
    """The image file or URL does not exist (404, missing file)."""


class ImageTooLarge(ImageError):
    """The image exceeds the configured byte or pixel limits."""


class ImageDecodeError(ImageError):
    """The bytes are not a decodable image."""


class ImageUnreachable(TransientError):
    """The image host did not answer; retried, then recorded."""

    stage = "image"


class PoisonEvent(PermanentError):
    """An event whose processing kills the worker process every time it is tried."""

    stage = "delivery"


class DatabaseUnavailable(TransientError):
    """Postgres did not answer; retried."""

    stage = "database"


class TaxonomyError(TaggerError):
    """A taxonomy YAML file is invalid; the message names the file, line and key."""

    stage = "taxonomy"

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, key: str | None = None):
        self.path = path
        self.line = line
        self.key = key
        where = ""
        if path:
            where = path + (f":{line}" if line else "")
            if key:
                where += f" ({key})"
            where += ": "
        super().__init__(where + message)
        self.bare_message = message


class ModelLoadError(TaggerError):
    """The configured model could not be loaded."""

    stage = "model"


class SchemaMismatch(TaggerError):
    """The database schema does not fit the configured model (for example the vector dimension)."""

    stage = "database"
