"""Loading a labelled product set for ``tagger eval``, and embedding its images and texts.

Accepted inputs (``--data``):

* a ``.parquet`` file, a ``.csv`` file, or a ``.jsonl`` file (nested objects such as
  ``{"attributes": {"articleType": ...}}`` become ``attributes.articleType`` columns);
* a directory in the KAGL layout: ``styles.parquet`` (metadata) plus ``images-*.parquet``
  (image bytes), joined on ``id``; any other directory: every ``*.parquet`` in it, concatenated.

The image column holds either encoded image bytes (JPEG/PNG/...; a Hugging Face style
``{"bytes": ..., "path": ...}`` struct works too) or a path, relative to ``--image-root`` (default:
the folder of the data file).
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The evaluation data cannot be used as given; the message says what to change."""


@dataclass
class EvalData:
    """Products to evaluate: metadata rows and, index-aligned, each row's image reference."""

    frame: pd.DataFrame  # metadata, index 0..n-1, without the image column
    images: list[object]  # bytes or a path per row
    image_root: Path | None
    source: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped while loading

    def __len__(self) -> int:
        return len(self.frame)

    def open_image(self, index: int) -> Image.Image:
        return open_image(self.images[index], self.image_root)

    def subset(self, rows: Sequence[int] | np.ndarray) -> EvalData:
        rows = [int(r) for r in rows]
        return EvalData(self.frame.iloc[rows].reset_index(drop=True), [self.images[r] for r in rows],
                        self.image_root, self.source, dict(self.skipped))

    def column(self, name: str) -> pd.Series:
        if name not in self.frame.columns:
            columns = ", ".join(map(str, self.frame.columns))
            raise DataError(f"column {name!r} is not in {self.source}; columns are: {columns}")
        return self.frame[name]


def open_image(ref: object, root: Path | None = None) -> Image.Image:
    """An RGB image from encoded bytes, an HF-style struct, or a file path (relative to ``root``)."""
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        handle: object = io.BytesIO(bytes(ref))
    elif isinstance(ref, (str, Path)):
        path = Path(ref)
        if not path.is_absolute() and root is not None:
            path = root / path
        handle = path
    else:
        raise DataError(f"cannot read an image from a value of type {type(ref).__name__}")
    with Image.open(handle) as image:  # type: ignore[arg-type]
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix in (".jsonl", ".ndjson"):
        import json

        with path.open(encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        return pd.json_normalize(records)
    raise DataError(f"{path}: unsupported data file; use .parquet, .csv or .jsonl (or a directory of parquet files)")


def _read_kagl_dir(directory: Path, image_column: str, join_column: str, split_column: str | None,
                   split: str | None) -> pd.DataFrame:
    import pyarrow.dataset as ds

    styles = pd.read_parquet(directory / "styles.parquet")
    if split is not None and split_column and split_column in styles.columns:
        styles = styles[styles[split_column].astype(str) == split]
    shards = sorted(directory.glob("images-*.parquet"))
    dataset = ds.dataset([str(p) for p in shards], format="parquet")
    if image_column not in dataset.schema.names:
        raise DataError(f"{directory}: the image shards have no column {image_column!r}; "
                        f"columns are: {', '.join(dataset.schema.names)}")
    wanted = styles[join_column].tolist()
    table = dataset.to_table(columns=[join_column, image_column], filter=ds.field(join_column).isin(wanted))
    images = table.to_pandas()
    return styles.merge(images, on=join_column, how="inner", validate="one_to_one")


def load_eval_data(data: str | Path, *, image_column: str = "image", image_root: str | Path | None = None,
                   split_column: str | None = "split", split: str | None = None, limit: int | None = None,
                   seed: int = 0, join_column: str = "id") -> EvalData:
    """Read, filter (split), drop rows without an image, and subsample (``limit`` rows drawn with ``seed``).

    The subsample is a uniform random draw, kept in the file's order, so ``--limit`` gives a fair
    estimate even when the file is sorted (by id, category, ...).
    """
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    filtered_early = False
    if path.is_dir():
        if (path / "styles.parquet").is_file() and any(path.glob("images-*.parquet")):
            frame = _read_kagl_dir(path, image_column, join_column, split_column, split)
            filtered_early = True
        else:
            files = sorted(path.glob("*.parquet"))
            if not files:
                raise DataError(f"{path}: no *.parquet files (nor styles.parquet + images-*.parquet) in this directory")
            frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        default_root = path
    else:
        frame = _read_table(path)
        default_root = path.parent
    root = Path(image_root) if image_root is not None else default_root
    skipped: dict[str, int] = {}
    if split is not None and not filtered_early:
        if not split_column or split_column not in frame.columns:
            raise DataError(f"--split {split!r} given but {path} has no split column {split_column!r}")
        frame = frame[frame[split_column].astype(str) == split]
    if len(frame) == 0:
        raise DataError(f"{path}: no rows" + (f" in split {split!r}" if split else ""))
    if image_column not in frame.columns:
        raise DataError(f"{path}: no image column {image_column!r}; pick one with --image-column "
                        f"(columns: {', '.join(map(str, frame.columns))})")
    missing = frame[image_column].isna()
    if missing.any():
        skipped["no image"] = int(missing.sum())
        frame = frame[~missing]
    frame = frame.reset_index(drop=True)
    if limit is not None and limit < len(frame):
        rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=limit, replace=False))
        frame = frame.iloc[rows].reset_index(drop=True)
    images = frame[image_column].tolist()
    frame = frame.drop(columns=[image_column])
    return EvalData(frame, images, root, str(path), skipped)


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def progress(total: int, desc: str, unit: str = "img"):  # noqa: ANN201 - tqdm type
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)


def embed_images(encoder, data: EvalData, batch_size: int = 32, desc: str = "embedding images"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors and an (n,) bool mask of rows whose image could be decoded (others are zero)."""
    vectors = np.zeros((len(data), encoder.dim), dtype=np.float32)
    ok = np.ones(len(data), dtype=bool)
    with progress(len(data), desc) as bar:
        for rows in _batches(len(data), batch_size):
            images, good = [], []
            for row in rows:
                try:
                    images.append(data.open_image(row))
                    good.append(row)
                except (OSError, ValueError, Image.DecompressionBombError) as exc:
                    log.warning("row %d: cannot decode its image: %s", row, exc)
                    ok[row] = False
            if images:
                vectors[good] = encoder.encode_images(images, batch_size=batch_size)
            bar.update(len(rows))
    return vectors, ok


def embed_pil(encoder, images: Sequence[Image.Image], batch_size: int = 32, desc: str = "embedding images"
              ) -> np.ndarray:
    out = []
    with progress(len(images), desc) as bar:
        for rows in _batches(len(images), batch_size):
            out.append(encoder.encode_images([images[i] for i in rows], batch_size=batch_size))
            bar.update(len(rows))
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), dtype=np.float32)


def embed_texts(encoder, texts: Sequence[str], batch_size: int = 64, desc: str = "embedding texts") -> np.ndarray:
    out = []
    with progress(len(texts), desc, unit="text") as bar:
        for rows in _batches(len(texts), batch_size):
            out.append(encoder.encode_texts([texts[i] for i in rows], batch_size=batch_size))
            bar.update(len(rows))
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), dtype=np.float32)


# ---- label mappings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelMapping:
    """Dataset values to taxonomy label keys for one attribute. ``None`` means "deliberately not evaluated"."""

    values: dict[str, str | None]
    attribute: str | None = None
    column: str | None = None
    source: str = ""

    def lookup(self, value: str) -> tuple[bool, str | None]:
        """(found, key): case- and space-insensitive lookup."""
        wanted = _norm(value)
        for raw, key in self._normalised.items():
            if raw == wanted:
                return True, key
        return False, None

    @property
    def _normalised(self) -> dict[str, str | None]:
        return {_norm(k): v for k, v in self.values.items()}


def _norm(value: str) -> str:
    return " ".join(str(value).strip().lower().split())


def load_mapping(path: str | Path) -> LabelMapping:
    """A YAML or JSON mapping file.

    Either a plain ``{dataset value: label key}`` object, or ``{attribute: ..., column: ..., values: {...}}``.
    A value of ``null`` excludes that dataset value from the evaluation (counted as unmapped on purpose).
    """
    import json

    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot parse the mapping file: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a mapping file is an object of dataset value -> label key")
    attribute = column = None
    values = raw
    if "values" in raw and isinstance(raw["values"], dict):
        attribute = raw.get("attribute")
        column = raw.get("column")
        values = raw["values"]
    out: dict[str, str | None] = {}
    for key, value in values.items():
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}: value for {key!r} must be a label key (text) or null, not {value!r}")
        out[str(key)] = value
    return LabelMapping(out, str(attribute) if attribute else None, str(column) if column else None, str(path))
