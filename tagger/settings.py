"""The one settings object, read from ``TAGGER_*`` environment variables.

Every knob of the service lives here with a safe default, so a fresh machine runs with no
configuration at all: no database URL means a private embedded Postgres, no broker URL means
a private embedded Redis, both kept under ``data_dir``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from tagger.errors import ConfigurationError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_taxonomy_dir() -> Path:
    # A source checkout keeps taxonomies/ beside the package; an installed wheel ships a copy inside it.
    for candidate in (REPO_ROOT / "taxonomies", Path(__file__).resolve().parent / "taxonomies"):
        if candidate.is_dir():
            return candidate
    return Path("taxonomies")


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tagger"


@dataclass(frozen=True)
class Settings:
    """Configuration of every tagger process. Field ``x`` is read from ``TAGGER_X``."""

    # Where things are.
    database_url: str | None = None  # None: embedded Postgres+pgvector under data_dir
    broker_url: str | None = None  # None: embedded Redis under data_dir
    data_dir: Path = field(default_factory=_default_data_dir)
    taxonomy_dir: Path = field(default_factory=_default_taxonomy_dir)

    # Which model embeds images and texts: "default" (offline, ships with tagger), a hub id such as
    # "patrickjohncyh/fashion-clip", or a local directory holding a CLIP checkpoint.
    model: str = "default"
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 16

    # Tagging.
    review_threshold: float = 0.5  # below this a machine tag is stored as needs_review
    top_k: int = 3  # labels stored per attribute
    text_weight: float = 0.3  # share of the product text (title, description) in the score; 0: image only

    # Learning from exemplars (tagger/fewshot.py; formula and measurements in the default model's MODEL_CARD.md).
    exemplar_scale: float = 5.0  # logit scale of a product's cosine to a label's exemplar centroid (until fitted)
    exemplar_prior: float = 4.0  # exemplars at which a label's exemplar evidence gets half its full weight
    exemplar_temperature: float = 1.0  # divides the combined logits, keeping confidences calibrated
    exemplar_fit: bool = True  # fit scale and temperature per attribute to its exemplars (leave-one-out)

    # Near-duplicates.
    duplicate_threshold: float = 0.90  # cosine similarity of image embeddings (see `tagger eval duplicates`)
    duplicate_neighbours: int = 10  # nearest neighbours examined per product

    # Fetching images safely.
    image_roots: tuple[Path, ...] = ()  # local folders that file paths in events may point into
    allow_private_urls: bool = False  # SSRF guard: refuse loopback/private hosts unless allowed
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    fetch_timeout_s: float = 10.0

    # Worker behaviour.
    max_retries: int = 5  # transient failures (database, image host) before the failures table
    retry_backoff_max_s: int = 300
    worker_concurrency: int = 2
    worker_max_tasks_per_child: int = 1000
    task_soft_time_limit_s: int = 120
    task_time_limit_s: int = 180
    log_format: str = "text"  # text | json (one object per line, with sku and event_id)

    # Webhook receiver (``tagger serve``): HMAC-SHA256 shared secret; unset means POST /events answers 503.
    webhook_secret: str | None = field(default=None, repr=False)  # never printed with the settings
    webhook_tolerance_s: int = 300  # accepted clock skew of X-Tagger-Timestamp, in seconds

    # Review page (``/review`` on ``tagger serve``). Without a token it answers only to clients on this machine
    # (loopback); with one, reviewers sign in with it. Read-only shows every page but refuses decisions.
    review_token: str | None = field(default=None, repr=False)  # never printed with the settings
    review_read_only: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(env_name(f.name))
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, str(f.type), raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("review_threshold", "duplicate_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigurationError(f"{env_name(name)}={value} is out of range: use a number from 0 to 1")
        if not 0.0 <= self.text_weight <= 1.0:
            raise ConfigurationError(f"{env_name('text_weight')}={self.text_weight} must lie between 0 and 1")
        if self.exemplar_scale < 0 or self.exemplar_prior < 0 or self.exemplar_temperature <= 0:
            raise ConfigurationError("TAGGER_EXEMPLAR_SCALE and TAGGER_EXEMPLAR_PRIOR must be at least 0 and "
                                     "TAGGER_EXEMPLAR_TEMPERATURE above 0")
        if self.log_format not in ("text", "json"):
            raise ConfigurationError(f"{env_name('log_format')}={self.log_format!r}: use text or json")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigurationError(f"{env_name('device')}={self.device!r}: use auto, cpu, cuda or cuda:N")
        for name in ("top_k", "batch_size", "duplicate_neighbours", "worker_concurrency"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{env_name(name)} must be at least 1")

    def with_overrides(self, **changes: object) -> Settings:
        updated = replace(self, **changes)
        updated.validate()
        return updated

    @property
    def pg_dir(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"


def env_name(field_name: str) -> str:
    return "TAGGER_" + field_name.upper()


ENV_NAMES: tuple[str, ...] = tuple(env_name(f.name) for f in fields(Settings))


def _parse(name: str, type_name: str, raw: str) -> object:
    try:
        if "tuple[Path" in type_name:
            return tuple(Path(p).expanduser() for p in raw.split(os.pathsep) if p)
        if "Path" in type_name:
            return Path(raw).expanduser()
        if type_name == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        return raw
    except ValueError as exc:
        raise ConfigurationError(f"{env_name(name)}={raw!r} is not valid: {exc}") from None


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def set_settings(settings: Settings | None) -> None:
    """Replace the process-wide settings (the CLI does this after resolving embedded services)."""
    global _settings
    _settings = settings
