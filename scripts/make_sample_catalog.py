#!/usr/bin/env python3
"""Build the sample catalog that ships in the repo (``samples/catalog``) and the bad-input fixtures (``samples/bad``).

The catalog is drawn only from the ``val`` split of the KAGL data (Fashion Product Images (Small), by Param
Aggarwal), so that ``tagger demo`` never reports accuracy on images a model may have been tuned on. It is
stratified over the most common article types and, inside each type, spread over colours, genders and usages.
A dozen mildly altered copies of sampled images are added under new SKUs, with the ground truth recorded in
``attributes.duplicate_of``, so the near-duplicate detector has something to find.

Everything is seeded: running it twice on the same data gives byte-identical files (given the same Pillow/libjpeg).

    python scripts/make_sample_catalog.py --data ../shared/data/kagl
    python scripts/make_sample_catalog.py --bad-only
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import random
import shutil
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

REPO_ROOT = Path(__file__).resolve().parent.parent

# Provenance, from the KAGL README; repeated in ATTRIBUTION.md.
IMAGE_SOURCES: tuple[tuple[str, str], ...] = (
    ("GaneshNeupane01/Fashion-Recommendation-System", "7cf263426a1a818fbcab19006b87c924b4dd0fa1"),
    ("RuturajChitale/Fassion-Recommendation-System", "8229bfd9dadcec71d6313bcf126b43b82a0c98ef"),
)
METADATA_SOURCE = ("knowrohit/recommendation-using-ResNet50", "45ce40e1a9ea04712319cc33a5eb8c05523db50d")

ATTRIBUTE_COLUMNS: tuple[str, ...] = (
    "articleType", "baseColour", "gender", "usage", "season", "masterCategory", "subCategory", "year",
)

# Words that end the brand part of a display name ("Lino Perros Women Red Handbag" -> "Lino Perros").
GENDER_WORDS = frozenset({
    "men", "women", "men's", "women's", "mens", "womens", "woman", "unisex", "boys", "girls", "boy's", "girl's",
    "kids", "kid's", "boy", "girl", "infant", "infants",
})
MAX_BRAND_WORDS = 4

# Article types whose plural name reads naturally in a sentence, or whose singular is irregular.
SINGULAR: dict[str, str] = {
    "Tshirts": "t-shirt", "Watches": "watch", "Dresses": "dress", "Kurtis": "kurti", "Bra": "bra",
    "Innerwear Vests": "innerwear vest", "Perfume and Body Mist": "perfume and body mist",
    "Track Pants": "track pants", "Jeans": "jeans", "Shorts": "shorts", "Trousers": "trousers", "Briefs": "briefs",
    "Socks": "socks", "Sunglasses": "sunglasses", "Flip Flops": "flip flops", "Heels": "heels",
    "Sandals": "sandals", "Flats": "flats", "Casual Shoes": "casual shoes", "Sports Shoes": "sports shoes",
    "Formal Shoes": "formal shoes", "Leggings": "leggings", "Capris": "capris", "Boxers": "boxers",
}
GENDER_PHRASE: dict[str, str] = {
    "Men": "for men", "Women": "for women", "Boys": "for boys", "Girls": "for girls", "Unisex": "(unisex)",
}


# --------------------------------------------------------------------------------------------------- data access

def load_val_styles(data_dir: Path) -> pd.DataFrame:
    styles = pd.read_parquet(data_dir / "styles.parquet")
    # Only val ids with a picture: the demo must not be scored on train data, and needs images.
    val = styles[(styles["split"] == "val") & styles["has_image"]].copy()
    return val.sort_values("id").reset_index(drop=True)


def load_images(data_dir: Path, ids: list[int]) -> dict[int, bytes]:
    shards = sorted(glob.glob(str(data_dir / "images-*.parquet")))
    if not shards:
        raise SystemExit(f"no images-*.parquet under {data_dir}")
    table = ds.dataset(shards, format="parquet").to_table(
        columns=["id", "image", "split"], filter=ds.field("id").isin(ids)
    )
    out: dict[int, bytes] = {}
    for row in table.to_pylist():
        if row["split"] != "val":  # belt and braces: styles and images agree on the split, check anyway
            raise SystemExit(f"id {row['id']} is not in the val split")
        out[int(row["id"])] = bytes(row["image"])
    missing = set(ids) - set(out)
    if missing:
        raise SystemExit(f"images missing for ids {sorted(missing)[:10]}")
    return out


# ------------------------------------------------------------------------------------------------------ sampling

def allocate(counts: dict[str, int], total: int, floor: int) -> dict[str, int]:
    """Split ``total`` over types: ``floor`` each, the rest by sqrt(size), so big types get more but not all."""
    alloc = {t: min(floor, c) for t, c in counts.items()}
    rest = total - sum(alloc.values())
    weights = {t: math.sqrt(c) for t, c in counts.items()}
    wsum = sum(weights.values())
    shares = {t: rest * w / wsum for t, w in weights.items()}
    for t, s in shares.items():
        alloc[t] += int(s)
    # Largest remainder, ties broken by name, for a total that is exact and deterministic.
    leftover = total - sum(alloc.values())
    for t in sorted(shares, key=lambda k: (-(shares[k] - int(shares[k])), k))[:leftover]:
        alloc[t] += 1
    return {t: min(n, counts[t]) for t, n in alloc.items()}


def pick_diverse(group: pd.DataFrame, n: int, rng: random.Random, seen: Counter[tuple[str, str]]) -> list[int]:
    """Greedy pick: each step takes the candidate whose colour/gender/usage/season are least used so far."""
    rows = group.to_dict("records")
    rng.shuffle(rows)  # random tie-breaking, seeded
    chosen: list[int] = []
    for _ in range(n):
        best = min(
            range(len(rows)),
            key=lambda i: sum(seen[(k, str(rows[i][k]))] * w for k, w in
                              (("baseColour", 3), ("gender", 2), ("usage", 2), ("season", 1))),
        )
        row = rows.pop(best)
        chosen.append(int(row["id"]))
        for k in ("baseColour", "gender", "usage", "season"):
            seen[(k, str(row[k]))] += 1
    return chosen


def select_products(val: pd.DataFrame, n_types: int, total: int, seed: int) -> list[int]:
    counts = val["articleType"].value_counts()
    # Sort by (-count, name) so equal counts at the cut-off do not depend on pandas' ordering.
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_types]
    alloc = allocate(dict(top), total, floor=3)
    rng = random.Random(seed)
    seen: Counter[tuple[str, str]] = Counter()
    ids: list[int] = []
    for article_type, _ in top:
        ids += pick_diverse(val[val["articleType"] == article_type], alloc[article_type], rng, seen)
    return sorted(ids)


# ------------------------------------------------------------------------------------------------------ records

def clean(value: Any) -> Any:
    """pandas NA/NaN -> None, numpy scalars -> Python, so json.dumps is happy and nulls are explicit."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, np.integer):
        return int(value)
    return value


def brand_of(name: str | None) -> str | None:
    if not name:
        return None
    words = name.split()
    for i, word in enumerate(words[: MAX_BRAND_WORDS + 1]):
        if word.lower() in GENDER_WORDS:
            return " ".join(words[:i]) or None
    # No gender word early on: the first word is the brand in most of the data.
    return words[0]


def describe(attrs: dict[str, Any]) -> str:
    article: str | None = attrs.get("articleType")
    if not article:
        noun = "product"
    elif article in SINGULAR:
        noun = SINGULAR[article]
    else:  # regular plural ("Shirts" -> "shirt"), but not "Dress"-like words
        noun = (article[:-1] if article.endswith("s") and not article.endswith("ss") else article).lower()
    words: list[str] = []
    usage = attrs.get("usage")
    if usage and usage.lower() not in noun:  # avoid "Casual casual shoes"
        words.append(usage.lower())
    if attrs.get("baseColour"):
        words.append(attrs["baseColour"].lower())
    words.append(noun)
    if attrs.get("gender") in GENDER_PHRASE:
        words.append(GENDER_PHRASE[attrs["gender"]])
    sentence = " ".join(words)
    if attrs.get("season"):
        sentence += f", {attrs['season'].lower()} season"
    return sentence[0].upper() + sentence[1:] + "."


def record(row: dict[str, Any], sku: str, image: str, title: str | None = None, **extra: Any) -> dict[str, Any]:
    attrs = {k: clean(row[k]) for k in ATTRIBUTE_COLUMNS}
    name = clean(row["productDisplayName"])
    return {
        "sku": sku,
        "title": title if title is not None else name,
        "description": describe(attrs),
        "brand": brand_of(name),
        "image": image,
        "attributes": {**attrs, **extra},
    }


# ----------------------------------------------------------------------------------------------------- altering

def _open_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def recompress(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str, int]:
    q = rng.randint(45, 65)
    return img, f"JPEG recompression at quality {q}", q


def resize_down_up(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str, int]:
    f = rng.uniform(0.55, 0.75)
    small = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BILINEAR)
    return small.resize(img.size, Image.Resampling.BICUBIC), f"resized down to {f:.0%} and back up", 0


def crop(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str, int]:
    p = rng.uniform(0.02, 0.05)
    dx, dy = round(img.width * p), round(img.height * p)
    return img.crop((dx, dy, img.width - dx, img.height - dy)), f"cropped {p:.0%} off each edge", 0


def pad(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str, int]:
    p = rng.uniform(0.04, 0.08)
    border = max(2, round(max(img.size) * p))
    return ImageOps.expand(img, border=border, fill="white"), f"white border of {border}px", 0


def brightness(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str, int]:
    f = rng.choice((rng.uniform(0.94, 0.97), rng.uniform(1.03, 1.06)))
    return ImageEnhance.Brightness(img).enhance(f), f"brightness x{f:.2f}", 0


def watermark(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str, int]:
    text = rng.choice(("SAMPLE", "(c) SHOP", "NEW IN", "outlet"))
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    # Pillow's built-in bitmap font: no font file needed, and small, as a shop watermark usually is.
    x, y = img.width - 8 - draw.textlength(text), img.height - 16
    draw.text((x, y), text, fill=(90, 90, 90, 150))
    out = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    return out, f"small '{text}' watermark, bottom right", 0


ALTERATIONS: tuple[Callable[[Image.Image, random.Random], tuple[Image.Image, str, int]], ...] = (
    recompress, resize_down_up, crop, pad, brightness, watermark,
)

APPLY_ORDER = (crop, pad, resize_down_up, brightness, watermark, recompress)

TITLE_EDITS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("same title", lambda t: t),
    ("same title", lambda t: t),
    ("' - New' appended", lambda t: t + " - New"),
    ("upper-cased", lambda t: t.upper()),
    ("'Men'/'Women' -> possessive", lambda t: t.replace(" Women ", " Women's ").replace(" Men ", " Men's ")),
    ("trailing word dropped", lambda t: " ".join(t.split()[:-1]) if len(t.split()) > 3 else t),
)


@dataclass
class Copy:
    source_id: int
    n: int
    sku: str
    image_name: str
    data: bytes
    alterations: list[str]
    title_edit: str
    title: str | None


def make_copies(
    ids: list[int], images: dict[int, bytes], titles: dict[int, str | None], n_copies: int, rng: random.Random
) -> list[Copy]:
    # Two sources get a second copy, so the demo also shows a group of three SKUs.
    n_sources = max(1, n_copies - 2) if n_copies > 3 else n_copies
    sources = sorted(rng.sample(ids, n_sources))
    plan = sources + sorted(rng.sample(sources, n_copies - n_sources))
    copies: list[Copy] = []
    per_source: Counter[int] = Counter()
    for i, src in enumerate(plan):
        per_source[src] += 1
        n = per_source[src]
        img = _open_rgb(images[src])
        # Cycle through the alteration kinds so every kind is present, then maybe add a second one.
        kinds = [ALTERATIONS[i % len(ALTERATIONS)]]
        if rng.random() < 0.5:
            kinds.append(rng.choice([a for a in ALTERATIONS if a is not kinds[0]]))
        # Geometry first, the watermark on the final frame (a crop must not cut it), quality last.
        kinds.sort(key=APPLY_ORDER.index)
        notes: list[str] = []
        quality = 90  # high enough that the final save is not itself a visible alteration
        for kind in kinds:
            img, note, q = kind(img, rng)
            notes.append(note)
            quality = q or quality
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        edit_note, edit = TITLE_EDITS[rng.randrange(len(TITLE_EDITS))]
        title = titles[src]
        new_title = edit(title) if title else title
        if new_title == title:  # e.g. no "Men" to make possessive: say what really happened
            edit_note = "same title"
        copies.append(Copy(
            source_id=src, n=n, sku=f"KAGL-{src}-copy{n}", image_name=f"{src}-copy{n}.jpg", data=buf.getvalue(),
            alterations=notes, title_edit=edit_note, title=new_title,
        ))
    return copies


def ahash_distance(a: bytes, b: bytes) -> int:
    """Hamming distance of 8x8 average hashes: a cheap check that a copy still looks like its source."""
    def bits(data: bytes) -> np.ndarray:
        px = np.asarray(_open_rgb(data).convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
        return px > px.mean()
    return int((bits(a) != bits(b)).sum())


# ------------------------------------------------------------------------------------------------- bad fixtures

def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(side: int) -> bytes:
    """A complete, valid 1-bit PNG of side x side black pixels, about 110 KB at side=30000.

    1-bit greyscale keeps the raw data at side*(side/8+1) bytes; deflate squeezes zeros ~1000:1. Decoded by
    Pillow it would need side*side bytes (900 MB at 30000), which is exactly what the service must refuse.
    """
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale, no interlace
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte 0 + packed bits
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) + \
        _png_chunk(b"IEND", b"")


def write_bad(out: Path, jpeg: bytes) -> None:
    """The bad-input fixtures, all derived from one catalog image (``jpeg``) or made from nothing."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    img = _open_rgb(jpeg)

    # Cut in the middle of the entropy-coded data: the header parses, decoding fails.
    (out / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 55 // 100])
    (out / "not-an-image.jpg").write_text("This is a text file with a .jpg name, not an image.\n")
    (out / "bomb.png").write_bytes(bomb_png(30000))

    img.convert("CMYK").save(out / "cmyk.jpg", "JPEG", quality=90)
    # 16-bit greyscale: scale 8-bit grey to the full 16-bit range (x257) so it looks the same once converted.
    grey16 = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype("<u2")
    Image.frombytes("I;16", img.size, grey16.tobytes()).save(out / "grey16.png")
    # Transparent background: near-white pixels become fully transparent, as in a cut-out product shot.
    rgba = img.convert("RGBA")
    arr = np.asarray(rgba).copy()
    arr[..., 3] = np.where(arr[..., :3].min(axis=2) > 235, 0, 255)
    Image.fromarray(arr).save(out / "transparent.png")

    (out / "README.md").write_text(BAD_README)


BAD_README = """\
# Bad and awkward inputs, for the tests

Generated by `scripts/make_sample_catalog.py` (all of them, every run; `--bad-only` makes just these).
The valid ones are derived from one image of the sample catalog.

| file | what it is | what the service must do |
| --- | --- | --- |
| `truncated.jpg` | a catalog JPEG cut at 55 % of its bytes: the header parses, decoding fails | fail that product cleanly (bad image, no retry), keep going |
| `not-an-image.jpg` | a text file with a `.jpg` name | fail cleanly: unidentified image, no retry |
| `bomb.png` | a complete, valid 1-bit PNG declaring 30000 x 30000 pixels (900 Mpx), ~110 KB on disk | refuse before decoding (`max_image_pixels`), never allocate the pixels |
| `cmyk.jpg` | a valid CMYK JPEG (Adobe marker) | **accept**: convert to RGB and tag it |
| `grey16.png` | a valid 16-bit greyscale PNG (Pillow mode `I;16`) | **accept**: scale to 8 bits, convert to RGB, tag it |
| `transparent.png` | an RGBA PNG whose white background is fully transparent | **accept**: composite onto white (not black) before embedding |
"""


# ------------------------------------------------------------------------------------------------------- output

def write_catalog(out: Path, val: pd.DataFrame, ids: list[int], images: dict[int, bytes],
                  copies: list[Copy]) -> list[dict[str, Any]]:
    if out.exists():
        shutil.rmtree(out)  # no stale images from an earlier run
    (out / "images").mkdir(parents=True)
    rows = val.set_index("id").loc[ids].reset_index().to_dict("records")
    by_id = {int(r["id"]): r for r in rows}
    records: list[dict[str, Any]] = []
    for row in rows:
        pid = int(row["id"])
        data = images[pid]
        assert data[:2] == b"\xff\xd8", f"{pid} is not a JPEG"
        (out / "images" / f"{pid}.jpg").write_bytes(data)  # original bytes, no re-encoding
        records.append(record(row, f"KAGL-{pid}", f"images/{pid}.jpg"))
    for c in copies:
        (out / "images" / c.image_name).write_bytes(c.data)
        records.append(record(by_id[c.source_id], c.sku, f"images/{c.image_name}", title=c.title,
                              duplicate_of=f"KAGL-{c.source_id}"))
    with (out / "catalog.jsonl").open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return records


def attribution(records: list[dict[str, Any]], copies: list[Copy], seed: int, n_types: int,
                images: dict[int, bytes]) -> str:
    originals = [r for r in records if "duplicate_of" not in r["attributes"]]
    types = Counter(r["attributes"]["articleType"] for r in originals)
    def spread(key: str) -> str:
        return ", ".join(f"{k} {v}" for k, v in Counter(str(r["attributes"][key]) for r in originals).most_common())
    lines = [
        "# Sample catalog: attribution and provenance",
        "",
        "## Source",
        "",
        "- Dataset: **Fashion Product Images (Small)** on Kaggle, by **Param Aggarwal**.",
        "- License: listed as **MIT** on its Kaggle page. The two image repositories below include no license file",
        "  of their own; the metadata repository is MIT-licensed.",
        "- Images, taken from two public GitHub repositories that committed subsets of the dataset (files named by",
        "  the Kaggle id):",
        *[f"  - `{repo}` at commit `{commit}`" for repo, commit in IMAGE_SOURCES],
        f"- Metadata (`styles.csv`): `{METADATA_SOURCE[0]}` at commit `{METADATA_SOURCE[1]}`.",
        "- Read here from the team's partial copy (`shared/data/kagl`, see its README), which splits ids into",
        "  train / val by id.",
        "",
        "## What was selected",
        "",
        f"- {len(originals)} products, **all from the `val` split** (so the demo is never scored on training",
        f"  data), covering the {n_types} most common article types that have images: 3 each at least, the rest",
        "  in proportion to the square root of the type's size. Inside a type the products were picked greedily",
        "  to spread base colour, gender, usage and season. Seed: " + str(seed) + ".",
        "- Images are the **original JPEG bytes**, not re-encoded: `images/<id>.jpg`.",
        "- `catalog.jsonl`: one product event per line. `title` is the Kaggle `productDisplayName`; `description`",
        "  is a sentence composed from the metadata; `brand` is the part of the name before the first gender word",
        "  (\"Lino Perros Women ...\" -> \"Lino Perros\"), else its first word; `attributes` holds the Kaggle",
        "  metadata (null where missing).",
        "",
        "Article types: " + ", ".join(f"{k} {v}" for k, v in sorted(types.items(), key=lambda kv: (-kv[1], kv[0])))
        + ".",
        "",
        "Genders: " + spread("gender") + ".  ",
        "Usages: " + spread("usage") + ".  ",
        "Base colours: " + spread("baseColour") + ".",
        "",
        "## Near-duplicates (altered copies)",
        "",
        f"{len(copies)} extra SKUs `KAGL-<id>-copy<N>` are mildly altered copies of sampled images (one or two",
        "alterations each; they stay near-identical to the eye), re-encoded as JPEG. Each carries",
        "`attributes.duplicate_of` = the source SKU: that is the ground truth for the duplicate detector.",
        "The 8x8 average-hash distance to the source (out of 64) is given as a sanity check.",
        "",
        "| copy | alterations | title | aHash dist |",
        "| --- | --- | --- | ---: |",
        *[f"| `{c.sku}` | {'; '.join(c.alterations)} | {c.title_edit} | "
          f"{ahash_distance(images[c.source_id], c.data)} |" for c in copies],
        "",
        "## Regenerate",
        "",
        "From the repository root:",
        "",
        "```",
        "python scripts/make_sample_catalog.py --data ../shared/data/kagl",
        "```",
        "",
        "It is seeded (`--seed`, default 7) and rewrites `samples/catalog/` and `samples/bad/` completely.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "kagl",
                    help="folder holding styles.parquet and images-*.parquet")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "samples", help="samples folder to (re)write")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--products", type=int, default=200)
    ap.add_argument("--types", type=int, default=30, help="number of most common articleTypes to cover")
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--bad-only", action="store_true", help="only (re)write samples/bad")
    args = ap.parse_args(argv)

    val = load_val_styles(args.data)
    if args.bad_only:
        # Same seed and selection as a full run, so the fixtures are derived from the same image.
        ids = select_products(val, args.types, args.products, args.seed)
        write_bad(args.out / "bad", load_images(args.data, ids[:1])[ids[0]])
        print(f"wrote {args.out / 'bad'}")
        return

    ids = select_products(val, args.types, args.products, args.seed)
    images = load_images(args.data, ids)
    titles = {int(r["id"]): clean(r["productDisplayName"]) for r in val[val["id"].isin(ids)].to_dict("records")}
    copies = make_copies(ids, images, titles, args.copies, random.Random(args.seed + 1))
    catalog = args.out / "catalog"
    records = write_catalog(catalog, val, ids, images, copies)
    (catalog / "ATTRIBUTION.md").write_text(attribution(records, copies, args.seed, args.types, images))
    write_bad(args.out / "bad", images[ids[0]])

    size = sum(p.stat().st_size for p in catalog.rglob("*") if p.is_file())
    print(f"wrote {len(ids)} products + {len(copies)} copies to {catalog} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
