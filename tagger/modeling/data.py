"""Reading the KAGL product-photo dataset (Parquet: JPEG bytes + styles metadata). Read-only."""

from __future__ import annotations

import glob
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tagger.modeling.captions import Item, item_from_row


@dataclass
class Record:
    item: Item
    jpeg: bytes

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.jpeg)).convert("RGB")


def load_split(data_dir: Path, split: str, limit: int | None = None) -> list[Record]:
    """Records of one split that have an image, sorted by id (deterministic order)."""
    import pandas as pd
    import pyarrow.dataset as ds

    styles = pd.read_parquet(data_dir / "styles.parquet")
    styles = styles[(styles["split"] == split) & styles["has_image"]]
    meta = {int(r["id"]): r for r in styles.astype(object).where(styles.notna(), None).to_dict("records")}
    shards = sorted(glob.glob(str(data_dir / "images-*.parquet")))
    if not shards:
        raise FileNotFoundError(f"no images-*.parquet under {data_dir}")
    table = ds.dataset(shards, format="parquet").to_table(
        columns=["id", "image"], filter=ds.field("split") == split
    )
    ids = table.column("id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    if limit is not None:
        order = order[:limit]
    images = table.column("image")
    return [Record(item_from_row(meta[ids[i]]), images[i].as_py()) for i in order if ids[i] in meta]
