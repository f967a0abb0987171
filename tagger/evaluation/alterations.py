"""Image alterations that a near-duplicate detector must see through (same product, re-uploaded).

Each alteration takes an RGB image and a ``numpy.random.Generator`` and returns a new RGB image;
the strength is drawn from a small range so a run is reproducible from its seed.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

Alteration = Callable[[Image.Image, np.random.Generator], Image.Image]


def jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Recompress as a low-quality JPEG (quality 30-50)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(rng.integers(30, 51)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def resize(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Downscale to 40-60 % then back up to the original size (a thumbnail re-enlarged)."""
    scale = float(rng.uniform(0.4, 0.6))
    small = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.BILINEAR)
    return small.resize(image.size, Image.BICUBIC)


def crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Cut 3-8 % off each side (independently), keeping the crop's own size."""
    w, h = image.size
    left, top, right, bottom = (float(rng.uniform(0.03, 0.08)) for _ in range(4))
    box = (round(w * left), round(h * top), w - round(w * right), h - round(h * bottom))
    return image.crop(box)


def pad(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Add a white border of 5-12 % of the size (a re-framed catalogue shot)."""
    border = max(1, round(min(image.size) * float(rng.uniform(0.05, 0.12))))
    return ImageOps.expand(image.convert("RGB"), border=border, fill=(255, 255, 255))


def colour_shift(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each changed by up to +-10 %."""
    out = image.convert("RGB")
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(float(rng.uniform(0.9, 1.1)))
    return out


def hflip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mirror left-right."""
    return ImageOps.mirror(image.convert("RGB"))


def text_overlay(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A small sticker-like text ("SALE", "NEW", a price) in a corner."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    text = str(rng.choice(["SALE", "NEW", "-20%", "BESTSELLER", "$19.99"]))
    size = max(8, round(min(out.size) * 0.07))
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    margin = max(2, round(min(out.size) * 0.03))
    corner = int(rng.integers(4))
    x = margin if corner in (0, 2) else out.width - tw - margin * 2
    y = margin if corner in (0, 1) else out.height - th - margin * 2
    colour = (200, 20, 20) if rng.random() < 0.5 else (20, 20, 20)
    draw.rectangle((x - 2, y - 2, x + tw + 4, y + th + 4), fill=(255, 255, 255))
    draw.text((x - left, y - top), text, fill=colour, font=font)
    return out


ALTERATIONS: dict[str, Alteration] = {
    "jpeg": jpeg,
    "resize": resize,
    "crop": crop,
    "pad": pad,
    "colour": colour_shift,
    "hflip": hflip,
    "text": text_overlay,
}


def alter_all(image: Image.Image, rng: np.random.Generator, names: list[str] | None = None) -> dict[str, Image.Image]:
    """Every alteration (or those named) of one image, by name."""
    image = image.convert("RGB")
    return {name: ALTERATIONS[name](image, rng) for name in (names or list(ALTERATIONS))}
