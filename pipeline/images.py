"""Intake: fetch a SKU's image safely, decode it safely and cut the square the model will see.

Every failure comes back as data (IntakeFailure with an ErrorCode), so one bad item never fails or
delays its batch. The CPU does only what must happen on the CPU: fetching, entropy decoding (JPEGs
DCT-scaled by Pillow's draft, so a 1600x1200 photo is decoded at 800x600), EXIF orientation, mode
conversion and an integer crop. The resize to the model's 384x384 happens on the device, batched,
in the engine (pipeline.inference.ImageBatcher).

Safety, in the order it is checked:
- local paths only under the configured roots, after resolving symlinks and '..'; regular files
  only (no devices, FIFOs); read at most max_image_bytes
- http(s) hosts are resolved here and refused when any address is not globally routable
  (loopback, private, link-local incl. 169.254.169.254, CGNAT, multicast, reserved, and the IPv4
  inside IPv4-mapped / 6to4 / Teredo / NAT64 IPv6 addresses); the request goes to the checked
  address (no DNS rebinding), every redirect is checked again, the byte cap is enforced while
  streaming, and connect / read / total deadlines apply. settings.allowed_hosts opens named hosts.
- decoding only the allowed formats (JPEG, PNG, WebP, GIF by default), a pixel cap checked from
  the header before any pixel is decoded, truncated files refused.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import socket
import stat
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from pipeline.settings import Settings
from schemas.images import FetchedImage, IntakeFailure, IntakeOutcome, PreparedImage
from schemas.results import ErrorCode, ItemError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

REDIRECTS = frozenset({301, 302, 303, 307, 308})
NAT64 = ipaddress.ip_network("64:ff9b::/96")
TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
WHITE = (255, 255, 255)


class IntakeError(Exception):
    """Internal: carries an ItemError up to the one place that turns it into an IntakeFailure."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.item_error = ItemError(code=code, message=message[:1000])


def configure_pillow(max_image_pixels: int) -> None:
    """Process-wide Pillow policy: a bomb is an error, never a warning; truncated files fail."""
    Image.init()  # register every plugin, so a refused format can still be named
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    # Pillow warns about recoverable oddities (corrupt EXIF, a malformed MPO header read as JPEG);
    # the image is still good, and a warning raised as an error would reject it.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


# --- addresses -------------------------------------------------------------------------------
def forbidden_reason(address: IPAddress) -> str | None:
    """Why connecting to address is refused, or None when it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = forbidden_reason(embedded)
            return f"{reason} (inside {address})" if reason else None
    checks = (
        (address.is_multicast, "a multicast address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_private, "a private address"),
        (not address.is_global, "not a globally routable address"),
    )
    return next((f"{address} is {what}" for failed, what in checks if failed), None)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise IntakeError(ErrorCode.FETCH_FAILED, f"cannot resolve host {host!r}: {exc}") from exc
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


# --- fetching --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FetchPolicy:
    roots: tuple[Path, ...]
    allowed_hosts: frozenset[str]
    max_bytes: int
    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float
    max_redirects: int

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchPolicy:
        return cls(
            roots=tuple(Path(os.path.realpath(root)) for root in settings.image_roots),
            allowed_hosts=frozenset(host.lower() for host in settings.allowed_hosts),
            max_bytes=settings.max_image_bytes,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
            total_timeout_s=settings.fetch_total_timeout_s,
            max_redirects=settings.fetch_max_redirects,
        )


class Fetcher:
    """Reads image bytes from a local path, file:// or http(s):// under a FetchPolicy."""

    def __init__(self, policy: FetchPolicy, client: httpx.Client | None = None) -> None:
        self.policy = policy
        # trust_env=False: a proxy from the environment would connect to hosts we never checked.
        self.client = client or httpx.Client(trust_env=False, follow_redirects=False)

    def close(self) -> None:
        self.client.close()

    def fetch(self, image_uri: str, etag: str | None = None, last_modified: str | None = None) -> FetchedImage:
        """Raises IntakeError; a conditional request (etag / last_modified) may return not_modified."""
        started = time.perf_counter()
        scheme = urlsplit(image_uri).scheme.lower()
        if scheme in {"http", "https"}:
            fetched = self._fetch_http(image_uri, etag, last_modified)
        elif scheme == "file":
            fetched = self._fetch_local(image_uri, _file_uri_path(image_uri))
        elif scheme == "" or (len(scheme) == 1 and os.name == "nt"):
            fetched = self._fetch_local(image_uri, image_uri)
        else:
            raise IntakeError(ErrorCode.FORBIDDEN_ADDRESS, f"URI scheme {scheme!r} is not allowed (http, https, file)")
        return replace(fetched, fetch_ms=(time.perf_counter() - started) * 1000)

    # -- local files --
    def _fetch_local(self, image_uri: str, raw_path: str) -> FetchedImage:
        path = Path(raw_path)
        if not path.is_absolute():
            path = self.policy.roots[0] / path if self.policy.roots else path
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in self.policy.roots):
            raise IntakeError(ErrorCode.FORBIDDEN_ADDRESS, f"{raw_path} is outside the allowed image roots")
        try:
            # O_NONBLOCK: opening a FIFO must not hang; O_NOFOLLOW: no symlink swapped in after the check.
            descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError as exc:
            raise IntakeError(ErrorCode.NOT_FOUND, f"{raw_path}: no such file") from exc
        except OSError as exc:
            raise IntakeError(ErrorCode.FETCH_FAILED, f"{raw_path}: {exc.strerror}") from exc
        with os.fdopen(descriptor, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise IntakeError(ErrorCode.FORBIDDEN_ADDRESS, f"{raw_path} is not a regular file")
            if info.st_size > self.policy.max_bytes:
                raise IntakeError(
                    ErrorCode.TOO_LARGE, f"{raw_path}: {info.st_size} bytes, over {self.policy.max_bytes}"
                )
            data = handle.read(self.policy.max_bytes + 1)
        if len(data) > self.policy.max_bytes:
            raise IntakeError(ErrorCode.TOO_LARGE, f"{raw_path}: over {self.policy.max_bytes} bytes")
        return FetchedImage(image_uri=image_uri, data=data, sha256=hashlib.sha256(data).hexdigest())

    # -- http(s) --
    def _fetch_http(self, image_uri: str, etag: str | None, last_modified: str | None) -> FetchedImage:
        deadline = time.monotonic() + self.policy.total_timeout_s
        url = httpx.URL(image_uri)
        headers = {"Accept": "image/*", "User-Agent": "skutag/0.1"}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        for _hop in range(self.policy.max_redirects + 1):
            location = self._request(url, headers, deadline, image_uri)
            if isinstance(location, FetchedImage):
                return location
            url = location
        raise IntakeError(ErrorCode.FETCH_FAILED, f"more than {self.policy.max_redirects} redirects")

    def _target(self, url: httpx.URL) -> tuple[httpx.URL, dict[str, Any]]:
        """The URL with the host replaced by the address we checked, and the TLS server name."""
        if url.scheme not in {"http", "https"} or not url.host:
            raise IntakeError(ErrorCode.FORBIDDEN_ADDRESS, f"redirect to {url} is not an http(s) URL")
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = resolve(url.host, port)
        allowed = (
            url.host.lower() in self.policy.allowed_hosts or f"{url.host.lower()}:{port}" in self.policy.allowed_hosts
        )
        if not allowed:
            for address in addresses:
                reason = forbidden_reason(address)
                if reason:
                    raise IntakeError(ErrorCode.FORBIDDEN_ADDRESS, f"{url.host} resolves to {reason}")
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        return url.copy_with(host=str(addresses[0])), extensions

    def _request(
        self, url: httpx.URL, headers: dict[str, str], deadline: float, image_uri: str
    ) -> FetchedImage | httpx.URL:
        target, extensions = self._target(url)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise IntakeError(ErrorCode.TIMEOUT, f"no answer within {self.policy.total_timeout_s:g} s")
        timeout = httpx.Timeout(
            connect=min(self.policy.connect_timeout_s, remaining),
            read=min(self.policy.read_timeout_s, remaining),
            write=min(self.policy.read_timeout_s, remaining),
            pool=min(self.policy.connect_timeout_s, remaining),
        )
        request_headers = {**headers, "Host": url.netloc.decode("ascii")}
        try:
            with self.client.stream(
                "GET", target, headers=request_headers, extensions=extensions, timeout=timeout
            ) as response:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    return url.join(response.headers["location"])
                return self._read_body(response, url, deadline, image_uri)
        except httpx.TimeoutException as exc:
            raise IntakeError(ErrorCode.TIMEOUT, f"{url.host}: timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise IntakeError(ErrorCode.FETCH_FAILED, f"{url.host}: {type(exc).__name__}: {exc}") from exc

    def _read_body(self, response: httpx.Response, url: httpx.URL, deadline: float, image_uri: str) -> FetchedImage:
        status = response.status_code
        if status == 304:
            return FetchedImage(
                image_uri=image_uri, data=b"", sha256="", not_modified=True,
                etag=response.headers.get("etag"), last_modified=response.headers.get("last-modified"),
            )  # fmt: skip
        if status in {404, 410}:
            raise IntakeError(ErrorCode.NOT_FOUND, f"{url}: HTTP {status}")
        if status >= 400:
            raise IntakeError(ErrorCode.FETCH_FAILED, f"{url}: HTTP {status}")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.policy.max_bytes:
            raise IntakeError(ErrorCode.TOO_LARGE, f"{url}: Content-Length {declared}, over {self.policy.max_bytes}")
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.policy.max_bytes:  # the header may lie or be absent: count what arrives
                raise IntakeError(ErrorCode.TOO_LARGE, f"{url}: body over {self.policy.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise IntakeError(
                    ErrorCode.TIMEOUT, f"{url}: body not complete within {self.policy.total_timeout_s:g} s"
                )
            chunks.append(chunk)
        data = b"".join(chunks)
        return FetchedImage(
            image_uri=image_uri, data=data, sha256=hashlib.sha256(data).hexdigest(),
            etag=response.headers.get("etag"), last_modified=response.headers.get("last-modified"),
        )  # fmt: skip


def _file_uri_path(image_uri: str) -> str:
    parts = urlsplit(image_uri)
    if parts.netloc not in {"", "localhost"}:
        raise IntakeError(ErrorCode.FORBIDDEN_ADDRESS, f"file URI with a remote host {parts.netloc!r}")
    return unquote(parts.path)


# --- decoding --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodePolicy:
    side: int
    fit: str  # "crop" | "pad"
    formats: tuple[str, ...]
    max_pixels: int
    min_decode_ratio: float = 1.0


def identify_format(data: bytes) -> str | None:
    """The format Pillow's plugins claim by magic bytes alone: no decoder runs."""
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if accept is not None and accept(prefix):
            return name
    return None


def decode(data: bytes, policy: DecodePolicy) -> tuple[np.ndarray, str, tuple[int, int]]:
    """The square to resize, its source format and size. Raises IntakeError."""
    try:
        with Image.open(BytesIO(data), formats=list(policy.formats)) as image:
            source_size, source_format = image.size, str(image.format)  # before draft scales it
            return _square(image, policy), source_format, source_size
    except IntakeError:
        raise
    except UnidentifiedImageError as exc:
        claimed = identify_format(data)
        if claimed and claimed not in policy.formats:
            raise IntakeError(ErrorCode.UNSUPPORTED_FORMAT, f"{claimed} images are not accepted") from exc
        if claimed:
            raise IntakeError(ErrorCode.CORRUPT, f"not a readable {claimed} image") from exc
        raise IntakeError(ErrorCode.NOT_AN_IMAGE, "not an image in an accepted format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise IntakeError(
            ErrorCode.DECOMPRESSION_BOMB, f"declares more pixels than the cap of {policy.max_pixels:,}"
        ) from exc
    except Exception as exc:  # hostile files make decoders raise anything: this is the boundary
        raise IntakeError(ErrorCode.CORRUPT, f"image data is corrupt ({type(exc).__name__}: {exc})") from exc


def _square(image: Image.Image, policy: DecodePolicy) -> np.ndarray:
    width, height = image.size
    if width * height > policy.max_pixels:
        raise IntakeError(ErrorCode.DECOMPRESSION_BOMB, f"{width}x{height} is over the {policy.max_pixels} pixel cap")
    if width < 1 or height < 1:
        raise IntakeError(ErrorCode.CORRUPT, f"{width}x{height} image")
    image.seek(0)  # animated formats: the first frame
    if image.format in {"JPEG", "MPO"}:
        _draft(image, policy)
    image.load()
    orientation = _orientation(image)  # after load: reading EXIF may load (PNG), hiding a decode error
    if policy.fit == "crop":
        image = image.crop(_center_square(image.size))
    rgb = _to_rgb(image)
    if policy.fit == "pad":
        rgb = _pad_square(rgb)
    if orientation in TRANSPOSE_FOR_ORIENTATION:
        rgb = rgb.transpose(TRANSPOSE_FOR_ORIENTATION[orientation])
    return np.array(rgb, dtype=np.uint8)  # a writable copy: torch.from_numpy shares its memory


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a corrupt EXIF block: the pixels are still fine
        return 1


def _draft(image: Image.Image, policy: DecodePolicy) -> None:
    """DCT-scaled decoding: decode at 1/2, 1/4 or 1/8 while the side we need stays >= policy.side."""
    width, height = image.size
    reference = min(width, height) if policy.fit == "crop" else max(width, height)
    wanted = policy.side * policy.min_decode_ratio
    if reference <= wanted:
        return
    scale = wanted / reference
    requested = (math.ceil(width * scale), math.ceil(height * scale))
    image.draft("RGB" if image.mode in {"RGB", "YCbCr"} else image.mode, requested)


def _center_square(size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}:
        return _high_depth_to_rgb(image)
    has_alpha = mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*WHITE, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if peak > 255:  # 16-bit samples
        values = values / 257.0
    elif image.mode == "F" and peak <= 1.0:
        values = values * 255.0
    gray = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _pad_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# --- the intake stage ------------------------------------------------------------------------
class ImageIntake:
    """Fetch + hash + decode, as one call per image; many images through a caller's thread pool
    (Pillow and hashlib release the GIL, so threads scale with cores)."""

    def __init__(self, settings: Settings, fetcher: Fetcher | None = None) -> None:
        configure_pillow(settings.max_image_pixels)
        self.fetcher = fetcher or Fetcher(FetchPolicy.from_settings(settings))
        self.policy = DecodePolicy(
            side=settings.image_size,
            fit=settings.image_fit,
            formats=tuple(settings.image_formats),
            max_pixels=settings.max_image_pixels,
            min_decode_ratio=settings.image_decode_min_ratio,
        )

    def close(self) -> None:
        self.fetcher.close()

    def prepare(self, image_uri: str) -> IntakeOutcome:
        sha256 = None
        try:
            fetched = self.fetcher.fetch(image_uri)
            sha256 = fetched.sha256
            started = time.perf_counter()
            pixels, source_format, source_size = decode(fetched.data, self.policy)
        except IntakeError as exc:
            return IntakeFailure(image_uri=image_uri, error=exc.item_error, sha256=sha256)
        return PreparedImage(
            image_uri=image_uri,
            sha256=fetched.sha256,
            pixels=pixels,
            source_format=source_format,
            source_size=source_size,
            fetch_ms=fetched.fetch_ms,
            decode_ms=(time.perf_counter() - started) * 1000,
            etag=fetched.etag,
            last_modified=fetched.last_modified,
        )

    def prepare_many(self, image_uris: Sequence[str], executor: Executor | None = None) -> list[IntakeOutcome]:
        if executor is None or len(image_uris) <= 1:
            return [self.prepare(uri) for uri in image_uris]
        return list(executor.map(self.prepare, image_uris))
