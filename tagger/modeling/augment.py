"""Augmented views of packshots that look like other shops' catalogues (Pillow + NumPy only).

The training data are centred products on white; users send model shots, odd crops, low-res
thumbnails, greyscale scans, textured backgrounds. Heads trained on clean packshots alone lose
much of the backbone's robustness, so features of these views are cached and trained on too.
None of the transforms changes hue, so the colour label stays true (except greyscale, whose
captions drop colour words).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from tagger.encoders.preprocess import border_colour, foreground_mask


@dataclass
class View:
    image: Image.Image
    grey: bool  # colour information removed: captions must not mention colour


def random_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A solid, gradient, noisy or striped background (stand-in for rooms, streets, studio sets)."""
    w, h = size
    kind = int(rng.integers(4))
    base = rng.integers(0, 256, size=3).astype(np.float32)
    if kind == 0:  # solid colour
        arr = np.broadcast_to(base, (h, w, 3)).copy()
    elif kind == 1:  # linear gradient between two colours
        other = rng.integers(0, 256, size=3).astype(np.float32)
        t = np.linspace(0, 1, h if rng.random() < 0.5 else w, dtype=np.float32)
        ramp = base + (other - base) * t[:, None]
        arr = np.broadcast_to(ramp[:, None, :], (h, w, 3)).copy() if len(t) == h else np.broadcast_to(
            ramp[None, :, :], (h, w, 3)).copy()
    elif kind == 2:  # blurred noise texture (fabric, wall, asphalt)
        small = rng.normal(0, 40, size=(max(2, h // 8), max(2, w // 8), 3)).astype(np.float32)
        noise = np.asarray(Image.fromarray(np.clip(small + 128, 0, 255).astype(np.uint8)).resize(
            (w, h), Image.Resampling.BICUBIC), dtype=np.float32) - 128
        arr = base + noise + rng.normal(0, 10, size=(h, w, 3))
    else:  # stripes / planks
        period = int(rng.integers(6, 40))
        other = rng.integers(0, 256, size=3).astype(np.float32)
        idx = (np.arange(w if rng.random() < 0.5 else h) // period) % 2
        line = np.where(idx[:, None] == 0, base, other)
        arr = np.broadcast_to(line[None], (h, w, 3)).copy() if len(idx) == w else np.broadcast_to(
            line[:, None], (h, w, 3)).copy()
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def composite_on_background(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Replace a near-uniform packshot background by a random one (soft-edged mask)."""
    mask = foreground_mask(image)
    if mask.all():
        return image
    alpha = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
    bg = random_background(image.size, rng)
    bg.paste(image, (0, 0), alpha)
    return bg


def random_resized_crop(image: Image.Image, rng: np.random.Generator, scale: tuple[float, float] = (0.35, 1.0)) -> Image.Image:
    """Crop a random region (zoom-in, partial product, off-centre like a model shot)."""
    w, h = image.size
    area = w * h * rng.uniform(*scale)
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.66))))
    cw = int(min(w, max(8, round(np.sqrt(area * aspect)))))
    ch = int(min(h, max(8, round(np.sqrt(area / aspect)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return image.crop((x0, y0, x0 + cw, y0 + ch))


def odd_aspect_pad(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Pad to a tall or wide canvas (banner thumbnails, 1000x100 strips) with a random fill."""
    w, h = image.size
    ratio = float(np.exp(rng.uniform(np.log(1.3), np.log(3.0))))
    fill = tuple(int(v) for v in rng.integers(0, 256, size=3)) if rng.random() < 0.5 else border_colour(image)[0]
    if rng.random() < 0.5:
        canvas = Image.new("RGB", (int(w * ratio), h), fill)
    else:
        canvas = Image.new("RGB", (w, int(h * ratio)), fill)
    cw, ch = canvas.size
    canvas.paste(image, (int(rng.integers(0, cw - w + 1)), int(rng.integers(0, ch - h + 1))))
    return canvas


def low_resolution(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Downscale to 24-64 px on the long side, then back up (thumbnails, old catalogues)."""
    w, h = image.size
    side = int(rng.integers(24, 65))
    s = side / max(w, h)
    small = image.resize((max(1, int(w * s)), max(1, int(h * s))), Image.Resampling.BILINEAR)
    return small.resize((w, h), Image.Resampling.BILINEAR)


def rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = float(rng.uniform(-12, 12))
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=border_colour(image)[0])


def brightness_contrast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Exposure and contrast changes that keep hue (the colour label stays valid)."""
    arr = np.asarray(image, dtype=np.float32)
    gain, contrast = rng.uniform(0.75, 1.25), rng.uniform(0.75, 1.25)
    mean = arr.mean()
    arr = (arr - mean) * contrast + mean * gain
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def augmented_view(image: Image.Image, rng: np.random.Generator) -> View:
    """One random combination of the shifts above; probabilities favour realistic mixes."""
    img = image.convert("RGB")
    if rng.random() < 0.4:
        img = composite_on_background(img, rng)
    if rng.random() < 0.25:
        img = rotate(img, rng)
    if rng.random() < 0.5:
        img = random_resized_crop(img, rng)
    if rng.random() < 0.2:
        img = odd_aspect_pad(img, rng)
    if rng.random() < 0.4:
        img = brightness_contrast(img, rng)
    if rng.random() < 0.2:
        img = low_resolution(img, rng)
    if rng.random() < 0.2:
        img = ImageOps.mirror(img)
    grey = bool(rng.random() < 0.15)
    if grey:
        img = ImageOps.grayscale(img).convert("RGB")
    return View(img, grey)


# Fixed single shifts for the shifted-val evaluation (each applied alone, seeded per image).
def shift(image: Image.Image, kind: str, rng: np.random.Generator) -> View:
    img = image.convert("RGB")
    if kind == "grey":
        return View(ImageOps.grayscale(img).convert("RGB"), True)
    if kind == "lowres":
        w, h = img.size
        s = 40 / max(w, h)
        small = img.resize((max(1, int(w * s)), max(1, int(h * s))), Image.Resampling.BILINEAR)
        return View(small, False)  # the encoder must cope with a 40 px input itself
    if kind == "crop":
        return View(random_resized_crop(img, rng, scale=(0.4, 0.6)), False)
    if kind == "background":
        return View(composite_on_background(img, rng), False)
    raise ValueError(kind)


SHIFTS = ("grey", "lowres", "crop", "background")
