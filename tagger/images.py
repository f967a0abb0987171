"""Reading product images safely: local files inside configured roots, or HTTP(S) URLs behind an SSRF guard.

Every refusal is a specific error from ``tagger.errors`` whose message says what to change.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from tagger.errors import ImageDecodeError, ImageNotAllowed, ImageNotFound, ImageTooLarge, ImageUnreachable
from tagger.settings import Settings

MAX_REDIRECTS = 5


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    timeout_s: float
    allow_private_urls: bool
    roots: tuple[Path, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(settings.max_image_bytes, settings.max_image_pixels, settings.fetch_timeout_s,
                   settings.allow_private_urls, settings.image_roots)


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_image_bytes(ref: str, limits: ImageLimits) -> bytes:
    """The raw bytes behind an event's ``image`` reference (URL or file path)."""
    scheme = urllib.parse.urlsplit(ref).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_url(ref, limits)
    if scheme == "file":
        ref = urllib.parse.unquote(urllib.parse.urlsplit(ref).path)
    elif scheme and len(scheme) > 1:  # one letter would be a Windows drive
        raise ImageNotAllowed(f"image reference {ref!r} uses the unsupported scheme {scheme!r}: use http(s) or a file path")
    return _read_file(ref, limits)


def _read_file(ref: str, limits: ImageLimits) -> bytes:
    if "\x00" in ref:
        raise ImageNotAllowed("image path contains a NUL byte")
    if not limits.roots:
        raise ImageNotAllowed(
            f"image path {ref!r} refused: no image roots are configured; set TAGGER_IMAGE_ROOTS to the folders "
            "that product images may be read from"
        )
    candidate = Path(ref)
    options = [candidate] if candidate.is_absolute() else [root / candidate for root in limits.roots]
    inside_a_root = False
    for option in options:
        resolved = option.resolve()
        # Resolve symlinks and '..' first, then insist the real path is inside a root.
        if not any(resolved.is_relative_to(root.resolve()) for root in limits.roots):
            continue
        inside_a_root = True
        if resolved.is_file():
            size = resolved.stat().st_size
            if size > limits.max_bytes:
                raise ImageTooLarge(f"image file {ref!r} is {size} bytes, over the limit of {limits.max_bytes} "
                                    "(TAGGER_MAX_IMAGE_BYTES)")
            return resolved.read_bytes()
    if inside_a_root:
        raise ImageNotFound(f"image file {ref!r} does not exist under the image roots")
    raise ImageNotAllowed(
        f"image path {ref!r} lies outside the configured image roots "
        f"({', '.join(str(r) for r in limits.roots)}); move the file there or add its folder to TAGGER_IMAGE_ROOTS"
    )


def _check_host(url: str, allow_private: bool) -> None:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host:
        raise ImageNotAllowed(f"image URL {url!r} has no host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImageUnreachable(f"image host {host!r} could not be resolved: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise ImageNotAllowed(
                f"image URL {url!r} points to the non-public address {address}; such URLs are refused to protect "
                "internal services (set TAGGER_ALLOW_PRIVATE_URLS=true if your image host is internal)"
            )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Redirects are followed by hand so that every hop passes the SSRF guard.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


_opener = urllib.request.build_opener(_NoRedirect())


def _fetch_url(url: str, limits: ImageLimits) -> bytes:
    seen: set[str] = set()
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        if current in seen:
            raise ImageNotFound(f"image URL {url!r} redirects in a loop (at {current!r})")
        seen.add(current)
        _check_host(current, limits.allow_private_urls)
        request = urllib.request.Request(current, headers={"User-Agent": "tagger/0.1"})
        try:
            with _opener.open(request, timeout=limits.timeout_s) as response:
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise ImageTooLarge(f"image at {url!r} is {declared} bytes, over the limit of {limits.max_bytes}")
                return _read_body(response, url, limits)
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307, 308):
                location = exc.headers.get("Location")
                if not location:
                    raise ImageNotFound(f"image URL {current!r} redirects without a Location") from None
                current = urllib.parse.urljoin(current, location)
                if urllib.parse.urlsplit(current).scheme not in ("http", "https"):
                    raise ImageNotAllowed(f"image URL {url!r} redirects to a non-HTTP location {current!r}") from None
                continue
            if exc.code in (408, 429) or exc.code >= 500:
                raise ImageUnreachable(f"image host answered HTTP {exc.code} for {current!r}") from None
            raise ImageNotFound(f"image URL {current!r} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, socket.timeout) as exc:
            reason = getattr(exc, "reason", exc)
            raise ImageUnreachable(f"image host for {current!r} is unreachable: {reason}") from None
    raise ImageNotFound(f"image URL {url!r} redirects more than {MAX_REDIRECTS} times")


def _read_body(response: object, url: str, limits: ImageLimits) -> bytes:
    """Read at most max_bytes, within a total deadline: a server trickling bytes cannot hold a worker."""
    deadline = time.monotonic() + 3 * limits.timeout_s
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = response.read(64 * 1024)  # type: ignore[attr-defined]
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limits.max_bytes:
            raise ImageTooLarge(f"image at {url!r} is over the limit of {limits.max_bytes} bytes")
        if time.monotonic() > deadline:
            raise ImageUnreachable(f"image at {url!r} downloads too slowly (over {3 * limits.timeout_s:.0f}s)")
        chunks.append(chunk)


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode bytes to an RGB image, refusing bombs and broken files; odd modes are converted, not failed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageTooLarge(f"image declares {width}x{height} pixels, over the limit of {limits.max_pixels} "
                                    "(TAGGER_MAX_IMAGE_PIXELS)")
            image.load()
    except ImageTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError...) for bad files
        kind = "truncated or corrupt" if "truncated" in str(exc).lower() else "not a decodable image"
        raise ImageDecodeError(f"image is {kind}: {exc}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode: EXIF rotation applied, alpha composited on white, 16-bit scaled, CMYK converted."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")
