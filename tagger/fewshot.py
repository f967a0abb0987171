"""Few-shot scoring from a shop's own labelled examples (exemplars). Pure NumPy, no I/O.

A merchandiser's approvals and corrections are labelled examples. For one attribute, each label's exemplars
are summarised by the centroid of their image features, and a product's cosine to each centroid is added to
the zero-shot logits, weighted by how many exemplars the label has (see MODEL_CARD.md, "Learning from
exemplars")::

    f~      = unit(f - m)                         # product features, centred on m, L2-normalised
    mu_c    = unit(mean_i unit(x_i - m))          # centroid of label c's exemplars x_i, same centring
    w_c     = n_c / (n_c + k0)                    # trust in label c's exemplars grows with their number n_c
    l_c     = z_c + w_c * s_e * cos(f~, mu_c)     # z_c: the zero-shot logit (logit_scale * cosine to prompts)
    p       = softmax(l / T)                      # T (temperature) keeps confidences calibrated

``m`` is the mean feature of the attribute's exemplars (the features are post-ReLU CNN activations; without
centring every cosine is dominated by their common mean direction). A label with no prompt (``exemplar_only``)
has no zero-shot logit: it gets the product's mean zero-shot logit over the prompted labels as a neutral prior.
With no usable exemplar the zero-shot probabilities are returned unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FewShotParams:
    """The few-shot formula's parameters (``TAGGER_EXEMPLAR_*``; defaults measured in MODEL_CARD.md)."""

    scale: float = 5.0  # s_e: logit scale of the cosine to a label's exemplar centroid
    prior: float = 4.0  # k0: a label's exemplars weigh half their full weight when it has k0 of them
    temperature: float = 1.0  # T: divides the combined logits (1: none)
    fit: bool = True  # fit scale and temperature to the exemplars (leave-one-out) when there are enough

    def __post_init__(self) -> None:
        if self.scale < 0 or self.prior < 0 or self.temperature <= 0:
            raise ValueError("few-shot parameters: scale and prior must be >= 0 and temperature > 0")

    @classmethod
    def from_settings(cls, settings: Any) -> FewShotParams:
        """From ``tagger.settings.Settings`` (``TAGGER_EXEMPLAR_SCALE``, ``_PRIOR``, ``_TEMPERATURE``)."""
        return cls(settings.exemplar_scale, settings.exemplar_prior, settings.exemplar_temperature,
                   settings.exemplar_fit)


@dataclass(frozen=True)
class AttributeExemplars:
    """The exemplars of one attribute: one label key and one feature row per exemplar."""

    attribute: str
    labels: tuple[str, ...]
    features: np.ndarray  # (n, d) float32 backbone image features (not normalised)
    skus: tuple[str, ...] = ()
    # The exemplar products' own embeddings (image; text with NaN rows where a product has none): with them the
    # scale and temperature are fitted to the shop (``fit``), else the configured ones are used.
    embeddings: np.ndarray | None = None
    text_embeddings: np.ndarray | None = None
    # The catalog's mean feature vector, subtracted before cosines. Without it the exemplars' own mean is used,
    # which cancels the evidence while only one label has exemplars (a shop's first approvals).
    centre: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.features.shape[0] != len(self.labels):
            raise ValueError(f"exemplars of {self.attribute!r}: {len(self.labels)} labels but features of shape "
                             f"{self.features.shape}")

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.labels))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ExemplarCentroids:
    """One attribute's exemplars, prepared for scoring against the attribute's label order ``keys``."""

    keys: tuple[str, ...]
    centre: np.ndarray  # (d,) the mean subtracted from every feature vector
    centroids: np.ndarray  # (labels, d) unit vectors; a zero row for a label without exemplars
    counts: np.ndarray  # (labels,) exemplars per label
    rows: np.ndarray  # indices of the exemplars used (those of current labels with finite features)
    owners: np.ndarray  # label index of each used exemplar

    @property
    def used(self) -> int:
        """Exemplars that take part in scoring (those of the attribute's current labels)."""
        return int(self.counts.sum())


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def prepare(exemplars: AttributeExemplars, keys: Sequence[str]) -> ExemplarCentroids | None:
    """Centroids of the exemplars whose label is one of ``keys`` (others, e.g. of a removed label, are ignored);
    ``None`` when no exemplar is usable."""
    index = {key: i for i, key in enumerate(keys)}
    features = np.asarray(exemplars.features, dtype=np.float64)
    rows = [i for i, label in enumerate(exemplars.labels) if label in index and np.isfinite(features[i]).all()]
    if not rows:
        return None
    kept = features[rows]
    reference = exemplars.centre
    usable = reference is not None and np.shape(reference) == (features.shape[1],) and np.isfinite(reference).all()
    centre = np.asarray(reference, dtype=np.float64) if usable else kept.mean(axis=0)
    unit = _unit(kept - centre)
    owners = np.array([index[exemplars.labels[i]] for i in rows], dtype=np.int64)
    sums = np.zeros((len(keys), features.shape[1]), dtype=np.float64)
    np.add.at(sums, owners, unit)
    counts = np.bincount(owners, minlength=len(keys))
    return ExemplarCentroids(tuple(keys), centre, _unit(sums), counts, np.asarray(rows, dtype=np.int64), owners)


def feature_mask(features: np.ndarray | None, n: int) -> np.ndarray:
    """Products that have stored features (rows with NaN stand for products encoded before they were kept)."""
    if features is None:
        return np.zeros(n, dtype=bool)
    return np.isfinite(features).all(axis=1)


def exemplar_cosines(prepared: ExemplarCentroids, features: np.ndarray) -> np.ndarray:
    """(products, labels) cosine of each centred product feature to each label's centroid (0 without exemplars).

    Expanded as ((f - m)·mu) / |f - m| with |f - m|^2 = f·f - 2 f·m + m·m, so a page of 5,000 products is three
    float32 matrix products and no centred copy of the features (re-tagging 100k products reads them all)."""
    # float64: a product's score must not depend on how many products are scored with it (see scoring.cosines).
    f = np.asarray(features, dtype=np.float64)
    centre = prepared.centre.astype(np.float64)
    centroids = prepared.centroids.astype(np.float64)
    dots = f @ centroids.T - (centre @ centroids.T)
    squared = np.einsum("ij,ij->i", f, f) - 2.0 * (f @ centre) + float(centre @ centre)
    return dots / np.sqrt(np.maximum(squared, 1e-12))[:, None]


def label_weights(counts: np.ndarray, prior: float) -> np.ndarray:
    """w_c = n_c / (n_c + k0): 0 for a label without exemplars, towards 1 as they accumulate."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts / np.maximum(counts + prior, 1e-12)


def combine(zero_shot_logits: np.ndarray, cosines: np.ndarray, counts: np.ndarray, params: FewShotParams,
            prompted: np.ndarray | None = None) -> np.ndarray:
    """(products, labels) combined logits; ``prompted`` marks labels that have prompts (default: all).
    ``counts`` is per label (labels,) or per product and label (products, labels)."""
    logits = np.array(zero_shot_logits, dtype=np.float64, copy=True)
    n_labels = logits.shape[1]
    prompted = np.ones(n_labels, dtype=bool) if prompted is None else np.asarray(prompted, dtype=bool)
    if not prompted.all():
        # A label defined by exemplars alone starts from the product's average zero-shot logit: no evidence
        # for or against it until its exemplars speak.
        prior = logits[:, prompted].mean(axis=1, keepdims=True) if prompted.any() else np.zeros((len(logits), 1))
        logits[:, ~prompted] = prior
    logits = logits + label_weights(counts, params.prior) * params.scale * cosines
    # An exemplar-only label with no exemplar yet cannot be predicted at all.
    impossible = np.broadcast_to(~prompted & ~(np.asarray(counts) > 0), logits.shape)
    logits = np.where(impossible, -np.inf, logits)
    return logits / params.temperature


SCALE_GRID = (0.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
MIN_FIT_EXEMPLARS = 10  # fewer held-out exemplars than this: the configured scale and temperature are kept


def leave_one_out_cosines(prepared: ExemplarCentroids, features: np.ndarray, owners: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Each exemplar's cosines to the label centroids with itself left out of its own label's centroid, and the
    label counts it sees (its own label's one fewer): how the exemplars would score a product like it."""
    unit = _unit(np.asarray(features, dtype=np.float64) - prepared.centre)
    sums = np.zeros((len(prepared.keys), unit.shape[1]))
    np.add.at(sums, owners, unit)
    cosines = unit @ _unit(sums).T
    rows = np.arange(len(owners))
    own = sums[owners] - unit
    cosines[rows, owners] = np.einsum("ij,ij->i", unit, own) / np.maximum(np.linalg.norm(own, axis=1), 1e-12)
    counts = np.tile(prepared.counts, (len(owners), 1))
    counts[rows, owners] -= 1
    cosines[counts == 0] = 0.0
    return cosines, counts


def fit(zero_shot_logits: np.ndarray, prepared: ExemplarCentroids, features: np.ndarray, owners: np.ndarray,
        params: FewShotParams, prompted: np.ndarray | None = None) -> FewShotParams:
    """The scale that best predicts each exemplar's label from the others (leave-one-out negative log-likelihood
    over ``SCALE_GRID``), with the zero-shot logits of the exemplars themselves.

    Where the prompts already find a shop's labels the exemplars get a small scale; where its photos defeat the
    prompts (worn, flat-lay, street shots) a large one. The temperature is not fitted here: held-out exemplars
    (their label's centroid one short, every label equally represented) are harder than the catalog, and a
    temperature fitted on them left accepted tags underconfident on the rest of the catalog; the configured one
    was chosen on held-out data (MODEL_CARD.md, "Learning from exemplars"). Exemplars whose label has no other
    exemplar cannot be held out; with fewer than ``MIN_FIT_EXEMPLARS`` held-out ones, ``params`` is returned
    unchanged."""
    owners = np.asarray(owners, dtype=np.int64)
    held_out = prepared.counts[owners] >= 2
    if held_out.sum() < MIN_FIT_EXEMPLARS or len(set(owners[held_out].tolist())) < 2:
        return params
    cosines, counts = leave_one_out_cosines(prepared, features, owners)
    rows = np.flatnonzero(held_out)
    z, cos, cnt, truth = zero_shot_logits[rows], cosines[rows], counts[rows], owners[rows]
    best: tuple[float, float] | None = None
    for scale in SCALE_GRID:
        logits = combine(z, cos, cnt, FewShotParams(scale, params.prior, params.temperature), prompted)
        top = np.max(np.where(np.isfinite(logits), logits, -1e300), axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(np.where(np.isfinite(logits), logits - top, -np.inf)).sum(axis=1))
        nll = float(np.mean(log_norm - logits[np.arange(len(rows)), truth]))
        if best is None or nll < best[0] - 1e-9:
            best = (nll, scale)
    assert best is not None
    return FewShotParams(best[1], params.prior, params.temperature, params.fit)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def probabilities(zero_shot_logits: np.ndarray, prepared: ExemplarCentroids | None, features: np.ndarray | None,
                  params: FewShotParams, prompted: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities (products, labels), exemplars used per product, and which products could be scored.

    Products without features (NaN rows, or ``features is None``) get zero-shot probabilities and 0 exemplars
    used; exemplar-only labels have probability 0 for them. When every label is exemplar-only, products that
    cannot use exemplars are not scored (their rows are zero and ``scored`` is False)."""
    n, n_labels = zero_shot_logits.shape
    prompted = np.ones(n_labels, dtype=bool) if prompted is None else np.asarray(prompted, dtype=bool)
    has = feature_mask(features, n) if prepared is not None else np.zeros(n, dtype=bool)
    scored = np.ones(n, dtype=bool) if prompted.any() else has.copy()
    out = np.zeros((n, n_labels), dtype=np.float64)
    if prompted.any():
        base = np.array(zero_shot_logits, dtype=np.float64, copy=True)
        base[:, ~prompted] = -np.inf
        out[:] = softmax(base)
    used = np.zeros(n, dtype=np.int64)
    if has.any() and prepared is not None:
        assert features is not None
        cosines = exemplar_cosines(prepared, features[has])
        out[has] = softmax(combine(zero_shot_logits[has], cosines, prepared.counts, params, prompted))
        used[has] = prepared.used
    return out, used, scored
