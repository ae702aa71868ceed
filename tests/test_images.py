"""Intake: the hostile-image corpus, geometry, modes, local-path and URL safety (against real local
HTTP servers), byte caps and deadlines. Every failure must be an IntakeFailure with a code."""

from __future__ import annotations

import contextlib
import csv
import io
import ipaddress
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.images import DecodePolicy, ImageIntake, IntakeError, decode, forbidden_reason
from pipeline.settings import Settings, load_settings
from schemas.images import IntakeFailure, PreparedImage
from schemas.results import ErrorCode

# The corpus lives in ../shared beside the checkout; a copy rides in tests/corpus for clones elsewhere.
SHARED_CORPUS = Path(__file__).parents[2] / "shared" / "corpus" / "pillow-test-images"
CORPUS = SHARED_CORPUS if SHARED_CORPUS.exists() else Path(__file__).parent / "corpus" / "pillow-test-images"
REJECT_CODES = {ErrorCode.NOT_AN_IMAGE, ErrorCode.CORRUPT, ErrorCode.DECOMPRESSION_BOMB, ErrorCode.UNSUPPORTED_FORMAT}


def manifest() -> list[dict[str, str]]:
    if not (CORPUS / "MANIFEST.tsv").exists():
        return []
    with (CORPUS / "MANIFEST.tsv").open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def intake_for(root: Path, **overrides: Any) -> ImageIntake:
    return ImageIntake(load_settings(image_roots=[root], **overrides))


def jpeg_bytes(width: int, height: int, **save: Any) -> bytes:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=(20, 40, 220))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


# --- the corpus ------------------------------------------------------------------------------
@pytest.mark.parametrize("row", manifest(), ids=lambda row: row["file"])
def test_corpus_file_gets_its_manifest_outcome(row: dict[str, str]) -> None:
    started = time.monotonic()
    outcome = intake_for(CORPUS).prepare(str(CORPUS / row["file"]))
    assert time.monotonic() - started < 10
    if row["expect"] == "tag":
        assert isinstance(outcome, PreparedImage), getattr(outcome, "error", None)
        side = outcome.pixels.shape[0]
        assert outcome.pixels.shape == (side, side, 3) and outcome.pixels.dtype == np.uint8
    elif row["expect"] in {"reject", "reject-recommended"}:
        assert isinstance(outcome, IntakeFailure)
        assert outcome.error.code in REJECT_CODES, outcome.error
        assert outcome.error.message
    else:
        assert isinstance(outcome, PreparedImage | IntakeFailure)


def test_corpus_has_rows() -> None:
    assert len(manifest()) >= 40, f"corpus not found at {CORPUS}"


@pytest.mark.parametrize("row", manifest(), ids=lambda row: row["file"])
def test_no_corpus_file_crashes_with_every_safe_format_opted_in(row: dict[str, str]) -> None:
    # Opting formats in (everything but PostScript/PDF, which would reach Ghostscript) changes the
    # verdict for some files, never turns one into an exception or a hang.
    formats = sorted(set(Image.ID) - {"EPS", "PDF"})
    outcome = intake_for(CORPUS, image_formats=formats).prepare(str(CORPUS / row["file"]))
    assert isinstance(outcome, PreparedImage | IntakeFailure)
    if row["expect"] == "reject" and isinstance(outcome, IntakeFailure):
        assert outcome.error.code in REJECT_CODES


def test_exif_orientation_is_applied() -> None:
    intake = intake_for(CORPUS)
    upright = intake.prepare(str(CORPUS / "hopper.jpg"))
    assert isinstance(upright, PreparedImage)
    for name in ("hopper_orientation_3.jpg", "hopper_orientation_6.jpg", "hopper_orientation_8.jpg"):
        rotated = intake.prepare(str(CORPUS / name))
        assert isinstance(rotated, PreparedImage)
        difference = np.abs(rotated.pixels.astype(int) - upright.pixels.astype(int)).mean()
        assert difference < 12, (name, difference)


# --- geometry --------------------------------------------------------------------------------
def policy(
    fit: str = "crop", formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF"), max_pixels: int = 60_000_000
) -> DecodePolicy:
    return DecodePolicy(side=384, fit=fit, formats=formats, max_pixels=max_pixels)


def test_center_crop_keeps_the_middle_and_never_letterboxes() -> None:
    # A wide photo: red left third, green middle, blue right third.
    image = Image.new("RGB", (1800, 600), (255, 0, 0))
    image.paste((0, 255, 0), (600, 0, 1200, 600))
    image.paste((0, 0, 255), (1200, 0, 1800, 600))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    pixels, source_format, size = decode(buffer.getvalue(), policy())
    assert (source_format, size) == ("PNG", (1800, 600))
    assert pixels.shape == (600, 600, 3)
    assert (pixels.reshape(-1, 3).mean(axis=0).round() == [0, 255, 0]).all()  # no black bars, no sides


def test_pad_fit_keeps_the_whole_product_on_white() -> None:
    image = Image.new("RGB", (400, 1000), (10, 10, 10))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    pixels, _, _ = decode(buffer.getvalue(), policy(fit="pad"))
    assert pixels.shape == (500, 500, 3)  # reduced by 2 first: never more than twice the engine's side
    assert (pixels[:, :125] == 255).all() and (pixels[:, -125:] == 255).all()
    assert (pixels[:, 150:350] == 10).all()


def test_a_large_jpeg_is_decoded_dct_scaled() -> None:
    pixels, _, size = decode(jpeg_bytes(1600, 1200), policy())
    assert size == (1600, 1200)
    assert pixels.shape == (600, 600, 3)  # decoded at 1/2, never at full size
    pixels, _, _ = decode(jpeg_bytes(3200, 3200), policy())
    assert pixels.shape == (400, 400, 3)  # 1/8 would be 400 >= 384


def test_the_engine_input_is_always_384_squared(tiny_engine: Any) -> None:
    small = decode(jpeg_bytes(40, 20), policy())[0]
    wide = decode(jpeg_bytes(1600, 900), policy())[0]
    images = [PreparedImage("a", "0", small, "JPEG", (40, 20)), PreparedImage("b", "0", wide, "JPEG", (1600, 900))]
    values, grid = tiny_engine.batcher(images)
    assert grid.tolist() == [[1, 24, 24], [1, 24, 24]]
    assert tuple(values.shape) == (2 * 576, 3 * 2 * 16 * 16)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("P", "PNG"), ("P", "GIF"), ("L", "JPEG"), ("LA", "PNG"), ("RGBA", "PNG"), ("RGBA", "WEBP"), ("CMYK", "JPEG"),
     ("I;16", "PNG"), ("1", "PNG"), ("RGB", "WEBP"), ("PA", "PNG")],
)  # fmt: skip
def test_every_mode_becomes_rgb(mode: str, fmt: str) -> None:
    source = Image.new("RGB", (64, 48), (120, 60, 30)).convert(mode if mode not in {"PA", "I;16"} else "RGB")
    if mode == "PA":
        source = source.convert("RGBA").convert("PA") if hasattr(Image, "PA") else source.convert("P")
    if mode == "I;16":
        source = Image.fromarray(np.full((48, 64), 40000, dtype=np.uint16))
    buffer = io.BytesIO()
    source.save(buffer, fmt)
    pixels, _, _ = decode(buffer.getvalue(), policy())
    assert pixels.shape == (48, 48, 3) and pixels.dtype == np.uint8
    if mode == "I;16":
        assert abs(int(pixels[0, 0, 0]) - 40000 // 257) <= 1


def test_transparent_pixels_are_composited_on_white() -> None:
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (8, 8, 24, 24))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    pixels, _, _ = decode(buffer.getvalue(), policy())
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[16, 16]) == (0, 0, 255)


def test_pixel_cap_is_checked_before_decoding() -> None:
    with pytest.raises(IntakeError) as caught:
        decode(jpeg_bytes(300, 300), policy(max_pixels=10_000))
    error = caught.value.item_error
    assert error.code == ErrorCode.DECOMPRESSION_BOMB
    assert error.message == "300x300 is over the 10000 pixel cap"


# --- local paths -----------------------------------------------------------------------------
@pytest.fixture
def root(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(jpeg_bytes(500, 400))
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes(100, 100))
    return images


def failure_code(outcome: object) -> ErrorCode:
    assert isinstance(outcome, IntakeFailure), outcome
    return outcome.error.code


def test_paths_inside_the_root_are_read(root: Path) -> None:
    intake = intake_for(root)
    assert isinstance(intake.prepare(str(root / "ok.jpg")), PreparedImage)
    assert isinstance(intake.prepare("ok.jpg"), PreparedImage)  # relative to the first root
    assert isinstance(intake.prepare((root / "ok.jpg").as_uri()), PreparedImage)


@pytest.mark.parametrize("escape", ["../secret.jpg", "/etc/passwd", "sub/../../secret.jpg"])
def test_paths_escaping_the_root_are_refused(root: Path, escape: str) -> None:
    outcome = intake_for(root).prepare(escape)
    assert failure_code(outcome) == ErrorCode.FORBIDDEN_ADDRESS
    assert "outside the allowed image roots" in outcome.error.message  # type: ignore[union-attr]


def test_symlinks_may_not_lead_out(root: Path) -> None:
    (root / "inside.jpg").symlink_to(root / "ok.jpg")
    (root / "outside.jpg").symlink_to(root.parent / "secret.jpg")
    (root / "device").symlink_to("/dev/zero")
    intake = intake_for(root)
    assert isinstance(intake.prepare(str(root / "inside.jpg")), PreparedImage)
    assert failure_code(intake.prepare(str(root / "outside.jpg"))) == ErrorCode.FORBIDDEN_ADDRESS
    assert failure_code(intake.prepare(str(root / "device"))) == ErrorCode.FORBIDDEN_ADDRESS


def test_fifos_and_missing_files_fail_fast(root: Path) -> None:
    os.mkfifo(root / "pipe.jpg")
    intake = intake_for(root)
    started = time.monotonic()
    outcome = intake.prepare(str(root / "pipe.jpg"))
    assert failure_code(outcome) == ErrorCode.FORBIDDEN_ADDRESS
    assert outcome.error.message.endswith("is not a regular file")  # type: ignore[union-attr]
    assert time.monotonic() - started < 2
    assert failure_code(intake.prepare(str(root / "missing.jpg"))) == ErrorCode.NOT_FOUND


def test_local_byte_cap(root: Path) -> None:
    (root / "big.jpg").write_bytes(jpeg_bytes(500, 400) + b"\0" * 5000)
    assert failure_code(intake_for(root, max_image_bytes=4096).prepare(str(root / "big.jpg"))) == ErrorCode.TOO_LARGE


def test_other_schemes_and_remote_file_uris_are_refused(root: Path) -> None:
    intake = intake_for(root)
    assert failure_code(intake.prepare("ftp://example.com/a.jpg")) == ErrorCode.FORBIDDEN_ADDRESS
    assert failure_code(intake.prepare("file://fileserver/share/a.jpg")) == ErrorCode.FORBIDDEN_ADDRESS
    assert failure_code(intake.prepare("gopher://127.0.0.1:70/")) == ErrorCode.FORBIDDEN_ADDRESS


def test_not_an_image_and_unsupported_format(root: Path) -> None:
    (root / "notes.jpg").write_text("these are not pixels")
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, "BMP")
    (root / "icon.jpg").write_bytes(buffer.getvalue())
    intake = intake_for(root)
    assert failure_code(intake.prepare("notes.jpg")) == ErrorCode.NOT_AN_IMAGE
    outcome = intake.prepare("icon.jpg")
    assert failure_code(outcome) == ErrorCode.UNSUPPORTED_FORMAT
    assert outcome.error.message == "BMP images are not accepted"  # type: ignore[union-attr]


# --- addresses -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "224.0.0.1", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
     "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "240.0.0.1"],
)  # fmt: skip
def test_non_global_addresses_are_refused(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


# --- http ------------------------------------------------------------------------------------
class ImageServer(BaseHTTPRequestHandler):
    """Routes: /ok.jpg, /redirect?to=URL, /chunked (endless), /slow (1 byte/s), /missing, /error, /etag."""

    requests: ClassVar[list[str]] = []
    body = jpeg_bytes(640, 480)

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        route = self.path.split("?")[0]
        handler = getattr(self, "route_" + route.strip("/").replace(".", "_"), self.route_missing)
        handler()

    def route_ok_jpg(self) -> None:
        self._send(200, self.body, {"Content-Type": "image/jpeg", "ETag": '"v1"'})

    def route_etag(self) -> None:
        if self.headers.get("If-None-Match") == '"v1"':
            self._send(304, b"", {"ETag": '"v1"'})
        else:
            self.route_ok_jpg()

    def route_redirect(self) -> None:
        self._send(302, b"", {"Location": self.path.split("to=", 1)[1]})

    def route_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"\xff" * 65536
        try:
            for _ in range(1000):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def route_liar(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "10")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(b"\xff" * 200_000)

    def route_slow(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(0.3)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def route_error(self) -> None:
        self._send(503, b"busy", {})

    def route_missing(self) -> None:
        self._send(404, b"", {})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[str]:
    ImageServer.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def http_intake(*allowed: str, **overrides: Any) -> ImageIntake:
    settings: Settings = load_settings(allowed_hosts=list(allowed), **overrides)
    return ImageIntake(settings)


def test_private_hosts_are_refused_before_any_connection(server: str) -> None:
    outcome = http_intake().prepare(f"http://{server}/ok.jpg")
    assert failure_code(outcome) == ErrorCode.FORBIDDEN_ADDRESS
    assert "127.0.0.1 is a loopback address" in outcome.error.message  # type: ignore[union-attr]
    assert ImageServer.requests == []
    assert (
        failure_code(http_intake().prepare(f"http://localhost:{server.split(':')[1]}/ok.jpg"))
        == ErrorCode.FORBIDDEN_ADDRESS
    )
    assert ImageServer.requests == []


def test_an_allowed_host_is_fetched_and_hashed(server: str) -> None:
    outcome = http_intake(server).prepare(f"http://{server}/ok.jpg")
    assert isinstance(outcome, PreparedImage)
    assert outcome.etag == '"v1"'
    import hashlib

    assert outcome.sha256 == hashlib.sha256(ImageServer.body).hexdigest()


def test_redirects_are_checked_again(server: str) -> None:
    # Allowed host redirecting to a host that is not allowed (the same server on another name).
    port = server.split(":")[1]
    outcome = http_intake(server).prepare(f"http://{server}/redirect?to=http://localhost:{port}/ok.jpg")
    assert failure_code(outcome) == ErrorCode.FORBIDDEN_ADDRESS
    assert ImageServer.requests == [f"/redirect?to=http://localhost:{port}/ok.jpg"]
    metadata = http_intake(server).prepare(f"http://{server}/redirect?to=http://169.254.169.254/latest/meta-data")
    assert failure_code(metadata) == ErrorCode.FORBIDDEN_ADDRESS
    followed = http_intake(server).prepare(f"http://{server}/redirect?to=/ok.jpg")
    assert isinstance(followed, PreparedImage)


def test_the_byte_cap_holds_while_streaming(server: str) -> None:
    intake = http_intake(server, max_image_bytes=100_000)
    assert failure_code(intake.prepare(f"http://{server}/chunked")) == ErrorCode.TOO_LARGE
    liar = intake.prepare(f"http://{server}/liar")  # says 10 bytes, sends 200 kB
    assert failure_code(liar) in {ErrorCode.TOO_LARGE, ErrorCode.FETCH_FAILED, ErrorCode.NOT_AN_IMAGE}


def test_a_trickling_server_hits_the_total_deadline(server: str) -> None:
    intake = http_intake(server, fetch_total_timeout_s=1.5, fetch_read_timeout_s=1.0)
    started = time.monotonic()
    outcome = intake.prepare(f"http://{server}/slow")
    assert failure_code(outcome) == ErrorCode.TIMEOUT
    assert time.monotonic() - started < 4


def test_http_status_codes(server: str) -> None:
    intake = http_intake(server)
    assert failure_code(intake.prepare(f"http://{server}/missing")) == ErrorCode.NOT_FOUND
    error = intake.prepare(f"http://{server}/error")
    assert failure_code(error) == ErrorCode.FETCH_FAILED
    assert error.error.retryable  # type: ignore[union-attr]


def test_conditional_requests(server: str) -> None:
    fetcher = http_intake(server).fetcher
    fresh = fetcher.fetch(f"http://{server}/etag")
    assert fresh.etag == '"v1"' and fresh.data
    again = fetcher.fetch(f"http://{server}/etag", etag=fresh.etag)
    assert again.not_modified and again.data == b""


def test_unresolvable_host_is_a_fetch_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def no_such_name(host: str, *args: Any, **kwargs: Any) -> Any:  # a resolver stub: tests ask no DNS
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    outcome = http_intake().prepare("http://no-such-host.invalid/a.jpg")
    assert failure_code(outcome) == ErrorCode.FETCH_FAILED
