"""Why this tag, at the edge: load the product image, score occluded copies with the process's encoder against
the stored label prototypes, render the overlay, cache the PNG (``review_heatmaps``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sqlalchemy import Engine

from tagger import explain, scoring
from tagger.db import repository as repo
from tagger.db import review_repository as review_repo
from tagger.encoders.base import get_encoder
from tagger.errors import ImageError, ModelLoadError, TaggerError
from tagger.images import ImageLimits, decode_image, image_digest, read_image_bytes
from tagger.review import HeatmapUnavailable, attribute_with_label
from tagger.settings import Settings, env_name
from tagger.taxonomy.model import TaxonomySet

log = logging.getLogger("tagger.web.review")

GRID = 8
WINDOW = 2
# One heat map at a time per process: each is a batch of model inferences, and a second request for the same
# one then finds it in the cache.
_compute_lock = threading.Lock()


@dataclass(frozen=True)
class Heatmap:
    png: bytes
    base_score: float  # the label's probability on the uncovered image
    max_drop: float
    cached: bool
    seconds: float
    model_id: str


def load_product_image(settings: Settings, image_ref: str) -> tuple[bytes, Image.Image]:
    """The product's image bytes and decoded RGB image, read with the workers' safety rules."""
    limits = ImageLimits.from_settings(settings)
    try:
        data = read_image_bytes(image_ref, limits)
        return data, decode_image(data, limits)
    except ImageError as exc:
        raise HeatmapUnavailable(f"the product image cannot be read here: {exc} (the server reads images with "
                                 f"{env_name('image_roots')} like the workers do)") from exc
    except TaggerError as exc:  # unreachable image host
        raise HeatmapUnavailable(f"the product image cannot be fetched now: {exc}") from exc


def explain_tag(engine: Engine, settings: Settings, taxonomies: TaxonomySet, *, sku: str, attribute: str,
                label: str) -> Heatmap:
    """The occlusion heat map of ``label`` of ``attribute`` on ``sku``'s image (cached per image and model)."""
    spec = attribute_with_label(taxonomies, attribute, label)
    encoder = get_encoder(settings.model, settings.device)
    model_id = encoder.model_id
    with engine.connect() as conn:
        target = review_repo.explain_target(conn, sku, attribute, label, taxonomy=spec.taxonomy,
                                            current_version=taxonomies.versions[spec.taxonomy])
    data, image = load_product_image(settings, target.image_ref)
    image_hash = image_digest(data)
    with _compute_lock:
        with engine.connect() as conn:
            hit = review_repo.cached_heatmap(conn, sku, attribute, label, model_id, image_hash)
        if hit is not None:
            return Heatmap(hit[0], hit[1], hit[2], True, 0.0, model_id)
        with engine.connect() as conn:
            stored = repo.load_label_embeddings(conn, model_id, target.taxonomy, target.taxonomy_version)
        keys = [lab.key for lab in spec.scored_labels if (attribute, lab.key) in stored]
        if label not in keys:
            raise HeatmapUnavailable(
                f"no label embedding of {attribute}={label} for model {model_id} and taxonomy version "
                f"{target.taxonomy_version}: the workers have not tagged with this model and version yet (process "
                "the product, or run `tagger taxonomy apply`), or the label is not scored (a parent label)")
        prototypes = np.stack([stored[(attribute, key)] for key in keys]).astype(np.float32)
        index = keys.index(label)

        def score(images: Sequence[Image.Image]) -> np.ndarray:
            vectors = encoder.encode_images(list(images), batch_size=max(1, len(images)))
            return scoring.label_probabilities(vectors, prototypes, encoder.logit_scale)[:, index]

        try:
            encoder.load()  # the first heat map of a process loads the model: not part of the timing
        except ModelLoadError as exc:
            raise HeatmapUnavailable(f"the model {settings.model!r} cannot be loaded in the web process: {exc}") from exc
        started = time.monotonic()
        result = explain.occlusion_map(image, score, grid=GRID, window=WINDOW, fill="mean")
        png = explain.png_bytes(explain.overlay(image, result.heat))
        seconds = time.monotonic() - started
        with engine.begin() as conn:
            review_repo.store_heatmap(conn, sku=sku, attribute=attribute, label=label, model_id=model_id,
                                      image_hash=image_hash, png=png, base_score=result.base_score,
                                      max_drop=result.max_drop, grid=GRID, seconds=seconds)
    log.info("heat map of %s %s=%s computed in %.1fs", sku, attribute, label, seconds)
    return Heatmap(png, result.base_score, result.max_drop, False, seconds, model_id)


def thumbnail_jpeg(image: Image.Image, max_side: int = 480) -> bytes:
    """Re-encoded, never the stored bytes: whatever the source held, the browser gets a plain JPEG."""
    import io

    copy = image.copy()
    copy.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    copy.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
