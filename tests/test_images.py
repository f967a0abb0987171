"""Reading and decoding product images: image roots, the SSRF guard, HTTP failures and awkward files.

HTTP tests run a real ``ThreadingHTTPServer`` on 127.0.0.1 (port 0) in a thread; nothing else is contacted.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from tagger.errors import (
    ImageDecodeError,
    ImageError,
    ImageNotAllowed,
    ImageNotFound,
    ImageTooLarge,
    ImageUnreachable,
    TransientError,
)
from tagger.images import MAX_REDIRECTS, ImageLimits, decode_image, image_digest, read_image_bytes, to_rgb
from tagger.settings import REPO_ROOT

SAMPLES = REPO_ROOT / "samples"
BAD = SAMPLES / "bad"
CATALOG_IMAGES = SAMPLES / "catalog" / "images"
BODY = b"\xff\xd8 not really a jpeg but bytes all the same"


def limits(*roots: Path, max_bytes: int = 1_000_000, max_pixels: int = 50_000_000, timeout_s: float = 2.0,
           allow_private_urls: bool = False) -> ImageLimits:
    return ImageLimits(max_bytes=max_bytes, max_pixels=max_pixels, timeout_s=timeout_s,
                       allow_private_urls=allow_private_urls, roots=tuple(roots))


def a_catalog_image() -> Path:
    return sorted(CATALOG_IMAGES.glob("*.jpg"))[0]


# ---- local files ----------------------------------------------------------------------------------------------


def test_reads_a_file_inside_a_root_absolute_relative_and_file_url():
    image = a_catalog_image()
    expected = image.read_bytes()
    assert read_image_bytes(str(image), limits(SAMPLES)) == expected
    assert read_image_bytes(f"catalog/images/{image.name}", limits(SAMPLES)) == expected
    assert read_image_bytes(image.as_uri(), limits(SAMPLES)) == expected
    assert image_digest(expected) == image_digest(read_image_bytes(str(image), limits(SAMPLES)))
    assert len(image_digest(expected)) == 64


def test_relative_path_with_several_roots(tmp_path):
    # the first root holds the file: found there
    image = a_catalog_image()
    assert read_image_bytes(image.name, limits(CATALOG_IMAGES, tmp_path)) == image.read_bytes()


def test_relative_path_found_only_in_a_later_root(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    image = a_catalog_image()
    assert read_image_bytes(image.name, limits(empty, CATALOG_IMAGES)) == image.read_bytes()


@pytest.mark.parametrize("ref", ["../../etc/passwd", "catalog/../../../etc/passwd", "/etc/passwd",
                                 "file:///etc/passwd"])
def test_paths_outside_the_roots_are_not_allowed(ref):
    with pytest.raises(ImageNotAllowed, match="outside the configured image roots"):
        read_image_bytes(ref, limits(SAMPLES))


def test_sibling_folder_with_a_common_prefix_is_outside(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    sibling = tmp_path / "img-private"
    sibling.mkdir()
    (sibling / "secret.jpg").write_bytes(BODY)
    with pytest.raises(ImageNotAllowed):
        read_image_bytes(str(sibling / "secret.jpg"), limits(root))
    with pytest.raises(ImageNotAllowed):
        read_image_bytes("../img-private/secret.jpg", limits(root))


def test_symlink_inside_a_root_pointing_outside(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(BODY)
    (root / "link.jpg").symlink_to(outside)
    (root / "linkdir").symlink_to(tmp_path)
    for ref in ("link.jpg", str(root / "link.jpg"), "linkdir/outside.jpg"):
        with pytest.raises(ImageNotAllowed):
            read_image_bytes(ref, limits(root))


def test_symlink_inside_a_root_pointing_inside_is_fine(tmp_path):
    (tmp_path / "real.jpg").write_bytes(BODY)
    (tmp_path / "alias.jpg").symlink_to(tmp_path / "real.jpg")
    assert read_image_bytes("alias.jpg", limits(tmp_path)) == BODY


def test_no_roots_configured():
    with pytest.raises(ImageNotAllowed, match="TAGGER_IMAGE_ROOTS"):
        read_image_bytes(str(a_catalog_image()), limits())


def test_nul_in_the_path():
    with pytest.raises(ImageNotAllowed, match="NUL"):
        read_image_bytes("a\x00.jpg", limits(SAMPLES))


def test_missing_file(tmp_path):
    with pytest.raises(ImageNotFound, match="does not exist"):
        read_image_bytes("nope.jpg", limits(tmp_path))
    with pytest.raises(ImageNotFound):
        read_image_bytes(str(tmp_path / "nope.jpg"), limits(tmp_path))
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageNotFound):
        read_image_bytes("folder.jpg", limits(tmp_path))


def test_file_over_max_bytes(tmp_path):
    (tmp_path / "exact.jpg").write_bytes(b"x" * 100)
    (tmp_path / "big.jpg").write_bytes(b"x" * 101)
    assert read_image_bytes("exact.jpg", limits(tmp_path, max_bytes=100)) == b"x" * 100
    with pytest.raises(ImageTooLarge, match="TAGGER_MAX_IMAGE_BYTES"):
        read_image_bytes("big.jpg", limits(tmp_path, max_bytes=100))


@pytest.mark.parametrize("ref", ["ftp://example.com/a.jpg", "javascript:alert(1)", "data:image/png;base64,AAAA",
                                 "gopher://127.0.0.1:6379/_INFO"])
def test_unsupported_schemes(ref):
    with pytest.raises(ImageNotAllowed, match="unsupported scheme"):
        read_image_bytes(ref, limits(SAMPLES, allow_private_urls=True))


def test_errors_are_permanent_except_unreachable():
    for error in (ImageNotAllowed, ImageNotFound, ImageTooLarge, ImageDecodeError):
        assert issubclass(error, ImageError) and not issubclass(error, TransientError)
    assert issubclass(ImageUnreachable, TransientError)


# ---- decoding -------------------------------------------------------------------------------------------------


def decode_file(path: Path, **kw) -> Image.Image:
    return decode_image(path.read_bytes(), limits(**kw))


def test_decodes_a_catalog_jpeg():
    image = decode_file(a_catalog_image())
    assert image.mode == "RGB" and image.size[0] > 0 and image.size[1] > 0


def test_truncated_jpeg():
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_file(BAD / "truncated.jpg")


def test_not_an_image():
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        decode_file(BAD / "not-an-image.jpg")
    with pytest.raises(ImageDecodeError):
        decode_image(b"", limits())


def test_bomb_is_refused_quickly():
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge):
        decode_file(BAD / "bomb.png")
    assert time.perf_counter() - start < 1.0


def test_configured_pixel_limit(tmp_path):
    buffer = io.BytesIO()
    Image.new("1", (2000, 1000)).save(buffer, format="PNG")  # 2 Mpx: under Pillow's own bomb limit
    data = buffer.getvalue()
    with pytest.raises(ImageTooLarge, match="2000x1000.*TAGGER_MAX_IMAGE_PIXELS"):
        decode_image(data, limits(max_pixels=1_999_999))
    assert decode_image(data, limits(max_pixels=2_000_000)).size == (2000, 1000)


def test_cmyk_becomes_rgb():
    image = decode_file(BAD / "cmyk.jpg")
    assert image.mode == "RGB" and image.size == (225, 300)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # CMYK (0,0,0,0) is white


def test_16_bit_grey_becomes_rgb():
    image = decode_file(BAD / "grey16.png")
    assert image.mode == "RGB" and image.size == (225, 300)
    r, g, b = image.split()
    assert r.tobytes() == g.tobytes() == b.tobytes()
    assert image.getextrema() == ((0, 255), (0, 255), (0, 255))  # scaled to the full 8-bit range
    assert image.getpixel((0, 0)) == (255, 255, 255)  # 65535 -> 255


def test_transparent_sample_becomes_rgb():
    image = decode_file(BAD / "transparent.png")
    assert image.mode == "RGB" and image.size == (225, 300)
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_transparency_is_composited_on_white_not_black():
    rgba = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # fully transparent *black*
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 255, 128))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    image = decode_image(buffer.getvalue(), limits())
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (255, 0, 0)
    r, g, b = image.getpixel((2, 0))
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255
    palette = rgba.convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (1, 1), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotated_jpeg_comes_out_rotated():
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    image = decode_image(buffer.getvalue(), limits())
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


# ---- HTTP -----------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    hits: list[str]
    release: threading.Event

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_length: bool = True) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if content_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        path = self.path
        if path == "/ok":
            self._send(200, BODY, {"Content-Type": "image/jpeg"})
        elif path == "/image.jpg":
            self._send(200, a_catalog_image().read_bytes(), {"Content-Type": "image/jpeg"})
        elif path == "/missing":
            self._send(404, b"no")
        elif path == "/busy":
            self._send(503, b"later")
        elif path == "/forbidden":
            self._send(403, b"no")
        elif path == "/a":
            self._send(302, headers={"Location": "/b"})
        elif path == "/b":
            self._send(301, headers={"Location": "/a"})
        elif path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            if left > 0:
                self._send(302, headers={"Location": f"/chain/{left - 1}"})
            else:
                self._send(200, b"END")
        elif path == "/to-ftp":
            self._send(302, headers={"Location": "ftp://127.0.0.1/x.jpg"})
        elif path == "/no-location":
            self._send(302)
        elif path == "/declared-big":
            self._send(200, b"x" * 2000)
        elif path == "/undeclared-big":
            self.close_connection = True
            self._send(200, b"x" * 5000, content_length=False)
        elif path == "/undeclared-small":
            self.close_connection = True
            self._send(200, b"y" * 1000, content_length=False)
        elif path == "/slow":
            self.release.wait(timeout=5)  # bounded: the fixture releases it at teardown
            self._send(200, BODY)
        else:
            self._send(500, b"unexpected path")


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, list[str]]]:
    handler = type("Handler", (_Handler,), {"hits": [], "release": threading.Event()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.hits
    finally:
        handler.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def http_limits(**kw) -> ImageLimits:
    kw.setdefault("allow_private_urls", True)
    kw.setdefault("max_bytes", 1500)
    kw.setdefault("timeout_s", 2.0)
    return limits(**kw)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_private_urls_are_refused_before_any_request(server, host):
    base, hits = server
    port = base.rsplit(":", 1)[1]
    before = len(hits)
    with pytest.raises(ImageNotAllowed, match="TAGGER_ALLOW_PRIVATE_URLS"):
        read_image_bytes(f"http://{host}:{port}/ok", http_limits(allow_private_urls=False))
    assert len(hits) == before  # the guard runs before the request


def test_url_without_host():
    with pytest.raises(ImageNotAllowed, match="no host"):
        read_image_bytes("http:///ok.jpg", http_limits())


def test_200_returns_the_bytes(server):
    base, _ = server
    assert read_image_bytes(f"{base}/ok", http_limits()) == BODY


def test_404_is_not_found(server):
    base, _ = server
    with pytest.raises(ImageNotFound, match="404"):
        read_image_bytes(f"{base}/missing", http_limits())
    with pytest.raises(ImageNotFound, match="403"):
        read_image_bytes(f"{base}/forbidden", http_limits())


def test_503_is_unreachable(server):
    base, _ = server
    with pytest.raises(ImageUnreachable, match="503"):
        read_image_bytes(f"{base}/busy", http_limits())


def test_redirect_loop(server):
    base, hits = server
    before = len(hits)
    with pytest.raises(ImageNotFound, match="loop"):
        read_image_bytes(f"{base}/a", http_limits())
    assert hits[before:] == ["/a", "/b"]


def test_redirects_up_to_the_limit_are_followed(server):
    base, _ = server
    assert read_image_bytes(f"{base}/chain/{MAX_REDIRECTS}", http_limits()) == b"END"


def test_too_many_redirects(server):
    base, hits = server
    before = len(hits)
    with pytest.raises(ImageNotFound, match=f"more than {MAX_REDIRECTS}"):
        read_image_bytes(f"{base}/chain/{MAX_REDIRECTS + 1}", http_limits())
    assert len(hits) - before == MAX_REDIRECTS + 1
    with pytest.raises(ImageNotFound):
        read_image_bytes(f"{base}/chain/50", http_limits())


def test_redirect_to_another_scheme_or_nowhere(server):
    base, _ = server
    with pytest.raises(ImageNotAllowed, match="non-HTTP"):
        read_image_bytes(f"{base}/to-ftp", http_limits())
    with pytest.raises(ImageNotFound, match="without a Location"):
        read_image_bytes(f"{base}/no-location", http_limits())


def test_declared_content_length_over_the_limit(server):
    base, _ = server
    with pytest.raises(ImageTooLarge, match="2000 bytes"):
        read_image_bytes(f"{base}/declared-big", http_limits(max_bytes=1500))
    assert read_image_bytes(f"{base}/declared-big", http_limits(max_bytes=2000)) == b"x" * 2000


def test_body_over_the_limit_without_content_length(server):
    base, _ = server
    with pytest.raises(ImageTooLarge, match="over the limit of 1500"):
        read_image_bytes(f"{base}/undeclared-big", http_limits(max_bytes=1500))
    assert read_image_bytes(f"{base}/undeclared-small", http_limits(max_bytes=1000)) == b"y" * 1000


def test_server_that_never_answers(server):
    base, _ = server
    start = time.perf_counter()
    with pytest.raises(ImageUnreachable):
        read_image_bytes(f"{base}/slow", http_limits(timeout_s=0.5))
    assert time.perf_counter() - start < 3.0


def test_listener_that_never_accepts():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel completes the handshake; nobody ever reads or answers
        port = listener.getsockname()[1]
        start = time.perf_counter()
        with pytest.raises(ImageUnreachable):
            read_image_bytes(f"http://127.0.0.1:{port}/x.jpg", http_limits(timeout_s=0.5))
        assert time.perf_counter() - start < 3.0
    finally:
        listener.close()


def test_closed_port():
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(ImageUnreachable, match="unreachable"):
        read_image_bytes(f"http://127.0.0.1:{port}/x.jpg", http_limits(timeout_s=0.5))


def test_fetched_image_decodes(server):
    base, _ = server
    image = a_catalog_image()
    data = read_image_bytes(f"{base}/image.jpg", http_limits(max_bytes=1_000_000))
    assert data == image.read_bytes()
    assert decode_image(data, limits()).size == Image.open(image).size
