"""Applying a taxonomy edit to the whole catalog: re-tag only what changed, from the stored embeddings.

No image is ever encoded again. ``apply_taxonomies``:

1. compares the taxonomies on disk with the versions last applied (``taxonomy_state``; on a database never
   applied to, the version most machine tags carry) using ``tagger.taxonomy.diff``;
2. stores the new versions and their label text embeddings in ``label_embeddings`` (a label whose prompt
   texts did not change reuses its stored vector; only new or changed prompts are encoded);
3. re-scores the attributes that need it (and the attributes whose ``applies_to`` depends on them) from the
   stored image (and text) embeddings, streamed from Postgres in SKU order with keyset pagination and scored
   in NumPy with the pipeline's own functions (``scoring.tag_products``: ``label_probabilities``,
   ``applies``, ``decide``);
4. re-evaluates the statuses of threshold-only changes from the stored scores (``scoring.decide`` on them,
   no new scores);
5. deletes the machine tags of removed attributes;
6. writes each chunk in bulk (COPY into a temporary table, one INSERT ... ON CONFLICT and one DELETE) with the
   rules of ``repository.upsert_machine_tags``: manual, approved and rejected tags are never touched, and a
   row is rewritten only when one of its values changed. Re-running an apply therefore rewrites nothing.

Each chunk is its own transaction; an interrupted apply is finished by running it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine

from tagger import fewshot, scoring
from tagger.db import exemplar_repository as exrepo
from tagger.db import repository as repo
from tagger.encoders.base import Encoder
from tagger.errors import TaggerError
from tagger.settings import Settings
from tagger.taxonomy.diff import TaxonomyDiff, condition_closure, diff_taxonomies, subset
from tagger.taxonomy.model import Taxonomy, TaxonomySet

log = logging.getLogger("tagger.retag")

DEFAULT_CHUNK = 5_000


class ApplyInProgress(TaggerError):
    """Another ``tagger taxonomy apply`` holds the database's apply lock."""


@dataclass(frozen=True)
class Base:
    """The taxonomies a database's tags were made with: the applied ones, else those most tags carry."""

    taxonomies: tuple[Taxonomy, ...]
    source: str  # "applied" | "tagged" | "none"
    applied_at: dict[str, Any] = field(default_factory=dict)

    @property
    def versions(self) -> dict[str, str]:
        return {t.name: t.version for t in self.taxonomies}


@dataclass
class ApplyResult:
    diff: TaxonomyDiff
    base_source: str
    products: int = 0  # products re-scored or re-decided
    rows_written: int = 0  # tag rows inserted or updated
    rows_deleted: int = 0
    encoded_texts: int = 0  # prompt texts encoded (0 when every label embedding was reused)
    seconds: float = 0.0
    recorded: bool = False  # whether the versions were (re)recorded as applied

    @property
    def noop(self) -> bool:
        return not self.recorded and self.rows_written == 0 and self.rows_deleted == 0

    def summary(self) -> str:
        if self.noop:
            return "nothing to apply: the database already has these taxonomy versions"
        plan = self.diff.plan()
        parts = [f"{k} {', '.join(v)}" for k, v in plan.items() if v]
        return (f"applied {', '.join(f'{k} {v}' for k, v in sorted(self.diff.new_versions.items()))}; "
                f"{'; '.join(parts) or 'no re-tagging needed'}; {self.products} product(s), "
                f"{self.rows_written} tag row(s) written, {self.rows_deleted} deleted, "
                f"{self.encoded_texts} prompt text(s) encoded, {self.seconds:.1f} s")


def load_base(conn: Connection) -> Base:
    versions = repo.applied_taxonomy_versions(conn)
    source = "applied"
    if not versions:
        versions = repo.tagged_taxonomy_versions(conn)
        source = "tagged" if versions else "none"
    taxonomies = []
    for name, version in sorted(versions.items()):
        content = repo.load_taxonomy_content(conn, name, version)
        if content is not None:
            taxonomies.append(Taxonomy.from_json(content, source=f"{name}@{version}"))
    return Base(tuple(taxonomies), source if taxonomies else "none")


def plan(engine: Engine, taxonomies: TaxonomySet) -> tuple[TaxonomyDiff, Base]:
    """What applying ``taxonomies`` would change (nothing is written)."""
    with engine.connect() as conn:
        base = load_base(conn)
    return diff_taxonomies(base.taxonomies, taxonomies), base


def ensure_label_embeddings(conn: Connection, taxonomies: Sequence[Taxonomy], encoder: Encoder
                            ) -> tuple[dict[str, scoring.LabelPrototypes], int]:
    """Prototypes of every attribute of ``taxonomies`` at their current versions, cached in ``label_embeddings``
    exactly as the pipeline caches them. Returns the prototypes and how many prompt texts were encoded."""
    model_id = encoder.model_id
    result: dict[str, scoring.LabelPrototypes] = {}
    encoded = 0
    for taxonomy in taxonomies:
        stored = repo.load_label_embeddings(conn, model_id, taxonomy.name, taxonomy.version)
        if all((a.name, label.key) in stored for a in taxonomy.attributes for label in a.scored_labels):
            for attribute in taxonomy.attributes:
                keys = tuple(label.key for label in attribute.scored_labels)
                result[attribute.name] = scoring.LabelPrototypes(
                    attribute.name, keys, np.stack([stored[(attribute.name, k)] for k in keys]))
            repo.store_taxonomy(conn, taxonomy)
            continue
        reusable = repo.reusable_label_embeddings(conn, model_id, [a.name for a in taxonomy.attributes])
        # Labels whose prompt texts are unchanged reuse their stored vector; the others are encoded in one call.
        missing: list[tuple[str, str, list[str]]] = []
        for attribute in taxonomy.attributes:
            for label in attribute.scored_labels:
                texts = label.prompt_texts(attribute.templates)
                if (attribute.name, label.key, tuple(texts)) not in reusable:
                    missing.append((attribute.name, label.key, texts))
        if missing:
            vectors = encoder.encode_texts([t for _, _, texts in missing for t in texts])
            encoded += len(vectors)
            start = 0
            for name, key, texts in missing:
                chunk = vectors[start : start + len(texts)]
                start += len(texts)
                owners = np.zeros(len(texts), dtype=np.int64)
                reusable[(name, key, tuple(texts))] = scoring.ensemble(chunk, owners, 1)[0]
        for attribute in taxonomy.attributes:
            keys = tuple(label.key for label in attribute.scored_labels)
            result[attribute.name] = scoring.LabelPrototypes(attribute.name, keys, np.stack([
                reusable[(attribute.name, label.key, tuple(label.prompt_texts(attribute.templates)))]
                for label in attribute.scored_labels]))
        repo.store_prototypes(conn, model_id, taxonomy, {a.name: result[a.name] for a in taxonomy.attributes})
    return result, encoded


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="product", disable=not enabled, leave=True, mininterval=0.5)


def _score_chunk(scoring_set: TaxonomySet, prototypes: dict[str, scoring.LabelPrototypes], images: np.ndarray,
                 texts: np.ndarray | None, has_text: np.ndarray | None, logit_scale: float, settings: Settings,
                 attributes: Sequence[str], features: np.ndarray | None = None,
                 exemplars: Mapping[str, fewshot.AttributeExemplars] | None = None) -> list[list[scoring.TagDecision]]:
    """The pipeline's decisions for a chunk of products (products without a text vector scored on the image)."""

    def run(rows: np.ndarray | slice, with_text: bool) -> list[list[scoring.TagDecision]]:
        return scoring.tag_products(
            scoring_set, prototypes, images[rows], logit_scale,
            text_vectors=texts[rows] if with_text and texts is not None else None,
            text_weight=settings.text_weight, default_threshold=settings.review_threshold,
            default_top_k=settings.top_k, attributes=attributes,
            image_features=features[rows] if features is not None else None, exemplars=exemplars,
            fewshot_params=fewshot.FewShotParams.from_settings(settings))

    if texts is None or has_text is None or has_text.all():
        return run(slice(None), texts is not None)
    result: list[list[scoring.TagDecision]] = [[] for _ in range(len(images))]
    for mask, with_text in ((has_text, True), (~has_text, False)):
        index = np.flatnonzero(mask)
        if len(index):
            for i, decisions in zip(index, run(index, with_text), strict=True):
                result[int(i)] = decisions
    return result


def rescore(engine: Engine, taxonomies: TaxonomySet, prototypes: dict[str, scoring.LabelPrototypes],
            attributes: Sequence[str], *, encoder: Encoder, settings: Settings, chunk_size: int = DEFAULT_CHUNK,
            progress: bool = False, exemplars: Mapping[str, fewshot.AttributeExemplars] | None = None
            ) -> tuple[int, int, int]:
    """Re-score ``attributes`` for every product from its stored embeddings. Returns (products, written, deleted).

    Attributes with exemplars (``exemplars``, else those stored for the model) are scored with them, reading the
    stored backbone features too; products without features are scored zero-shot."""
    if not attributes:
        return 0, 0, 0
    needed = condition_closure(taxonomies, attributes)
    scoring_set = subset(taxonomies, needed)
    protos = {name: prototypes[name] for name in needed}
    versions = taxonomies.versions
    model_id = encoder.model_id
    logit_scale = float(encoder.logit_scale)
    with_text = settings.text_weight > 0.0
    with engine.connect() as conn:
        total = repo.embedding_count(conn, model_id)
        if exemplars is None:
            exemplars = exrepo.load_exemplars(conn, model_id, list(needed))
    exemplars = {name: ex for name, ex in exemplars.items() if name in needed and len(ex)}
    products = written = deleted = 0
    after: str | None = None
    with _progress(total, f"re-scoring {', '.join(attributes)}", progress) as bar:
        while True:
            with engine.begin() as conn:
                skus, images, texts, has_text = repo.embeddings_page(conn, model_id, after=after, limit=chunk_size,
                                                                      with_text=with_text)
                if not skus:
                    break
                features = _features(conn, model_id, after, skus, exemplars) if exemplars else None
                decisions = _score_chunk(scoring_set, protos, images, texts, has_text, logit_scale, settings,
                                         attributes, features, exemplars)
                rows = [(sku, d.taxonomy, d.attribute, d.value, round(d.score, 6), d.rank, d.path, model_id,
                         versions[d.taxonomy], d.status, d.exemplars)
                        for sku, product in zip(skus, decisions, strict=True) for d in product]
                w, d = repo.write_machine_tags_bulk(conn, rows, skus, attributes)
            written += w
            deleted += d
            products += len(skus)
            after = skus[-1]
            bar.update(len(skus))
    return products, written, deleted


def _features(conn: Connection, model_id: str, after: str | None, skus: Sequence[str],
              exemplars: Mapping[str, fewshot.AttributeExemplars]) -> np.ndarray:
    """Stored backbone features of one page of products, a NaN row where a product has none."""
    dim = next(iter(exemplars.values())).features.shape[1]
    stored_skus, stored = exrepo.features_page(conn, model_id, after=after, last=skus[-1])
    features = np.full((len(skus), dim), np.nan, dtype=np.float32)
    if len(stored_skus) and stored.shape[1] == dim:  # features of another size belong to another model
        position = {sku: i for i, sku in enumerate(skus)}
        features[[position[sku] for sku in stored_skus]] = stored
    return features


def _padded(attribute: Any, group: list[tuple[Any, ...]]) -> tuple[list[str], np.ndarray]:
    """Stored (value, score) rows of one product in rank order, as the ``keys``/``probabilities`` that make
    ``scoring.decide`` give each row its stored rank again. A rank whose machine row is missing (a person's tag
    holds that value) gets a stand-in label tied with the next row, so that later ranks keep their number."""
    by_rank = {int(r[5]): r for r in group}
    spare = iter([label.key for label in attribute.scored_labels if label.key not in {r[3] for r in group}]
                 + [label.key for label in attribute.labels])
    keys: list[str] = []
    scores: list[float] = []
    for rank in range(1, max(by_rank) + 1):
        if rank in by_rank:
            keys.append(str(by_rank[rank][3]))
            scores.append(float(by_rank[rank][4]))
        else:
            following = next(by_rank[r] for r in range(rank + 1, max(by_rank) + 1) if r in by_rank)
            keys.append(next(spare))
            scores.append(float(following[4]))
    return keys, np.asarray(scores, dtype=np.float64)


def redecide(engine: Engine, taxonomies: TaxonomySet, attributes: Sequence[str], *, settings: Settings,
             chunk_size: int = DEFAULT_CHUNK, progress: bool = False) -> tuple[int, int]:
    """Re-evaluate the statuses of ``attributes`` from their stored scores (threshold or kind changes).
    Scores, ranks and rows stay; status and taxonomy version change. Returns (products, rows written)."""
    if not attributes:
        return 0, 0
    versions = taxonomies.versions
    with engine.connect() as conn:
        total, _ = repo.tag_counts(conn, attributes)
    products = written = 0
    after: str | None = None
    with _progress(sum(total.values()), f"re-deciding {', '.join(attributes)}", progress) as bar:
        while True:
            with engine.begin() as conn:
                rows, bound = repo.machine_tags_page(conn, attributes, after=after, limit=chunk_size * 3)
                if bound is None:
                    break
                groups: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
                for row in rows:
                    groups.setdefault((row[0], row[2]), []).append(row)
                out = []
                for (sku, name), group in groups.items():
                    attribute = taxonomies.attribute(name)
                    keys, scores = _padded(attribute, group)
                    decisions = scoring.decide(attribute, keys, scores, settings.review_threshold, len(keys))
                    status = {d.rank: d.status for d in decisions}
                    for r in group:
                        out.append((sku, attribute.taxonomy, name, r[3], r[4], r[5], r[6], r[7],
                                    versions[attribute.taxonomy], status[int(r[5])], r[8]))
                skus = sorted({row[0] for row in rows})
                w, _ = repo.write_machine_tags_bulk(conn, out, skus, attributes, delete_missing=False)
            written += w
            products += len(skus)
            after = bound
            bar.update(len({(k[0], k[1]) for k in groups}))
    return products, written


def apply_taxonomies(engine: Engine, taxonomies: TaxonomySet, *, encoder: Encoder, settings: Settings,
                     chunk_size: int = DEFAULT_CHUNK, progress: bool = False, lock_timeout_s: float = 600.0,
                     sleep: Callable[[float], None] = time.sleep) -> ApplyResult:
    """Make the database's tags follow ``taxonomies``, re-tagging only what changed (see the module doc)."""
    started = time.perf_counter()
    with engine.connect() as lock_conn:
        deadline = time.monotonic() + lock_timeout_s
        while not repo.try_apply_lock(lock_conn):
            lock_conn.commit()
            if time.monotonic() > deadline:
                raise ApplyInProgress(f"another taxonomy apply has held the lock for over {lock_timeout_s:.0f} s; "
                                      "wait for it to finish, then run apply again")
            sleep(1.0)
        lock_conn.commit()
        try:
            result = _apply_locked(engine, taxonomies, encoder=encoder, settings=settings, chunk_size=chunk_size,
                                   progress=progress)
        finally:
            repo.release_apply_lock(lock_conn)
            lock_conn.commit()
    result.seconds = time.perf_counter() - started
    if not result.noop and result.diff.changes:
        with engine.begin() as conn:
            repo.record_taxonomy_apply(
                conn, from_versions=result.diff.old_versions, to_versions=result.diff.new_versions,
                model_id=encoder.model_id, plan=result.diff.plan(),
                changes=[c.to_json() for c in result.diff.changes], products=result.products,
                rows_written=result.rows_written, rows_deleted=result.rows_deleted, seconds=round(result.seconds, 3))
    log.info("%s", result.summary())
    return result


def _apply_locked(engine: Engine, taxonomies: TaxonomySet, *, encoder: Encoder, settings: Settings,
                  chunk_size: int, progress: bool) -> ApplyResult:
    with engine.connect() as conn:
        base = load_base(conn)
    diff = diff_taxonomies(base.taxonomies, taxonomies)
    result = ApplyResult(diff=diff, base_source=base.source)
    if diff.empty and base.source == "applied":
        return result
    changed = [t for t in taxonomies.taxonomies if diff.old_versions.get(t.name) != t.version]
    needed = set(condition_closure(taxonomies, diff.rescore)) if diff.rescore else set()
    scored_taxonomies = [t for t in taxonomies.taxonomies if t in changed or any(a.name in needed for a in t.attributes)]
    with engine.begin() as conn:
        prototypes, result.encoded_texts = ensure_label_embeddings(conn, scored_taxonomies, encoder)
    if diff.rescore:
        encoder.load()  # CLIP reads its temperature (logit_scale) from the checkpoint
        products, written, deleted = rescore(engine, taxonomies, prototypes, diff.rescore, encoder=encoder,
                                             settings=settings, chunk_size=chunk_size, progress=progress)
        result.products += products
        result.rows_written += written
        result.rows_deleted += deleted
    if diff.redecide:
        products, written = redecide(engine, taxonomies, diff.redecide, settings=settings, chunk_size=chunk_size,
                                     progress=progress)
        result.products = max(result.products, products)
        result.rows_written += written
    with engine.begin() as conn:
        if diff.drop:
            result.rows_deleted += repo.delete_machine_tags(conn, diff.drop)
        removed = [name for name in diff.old_versions if name not in diff.new_versions]
        repo.mark_taxonomies_applied(conn, taxonomies.versions, removed)
    result.recorded = True
    return result
