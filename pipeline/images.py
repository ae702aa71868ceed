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

import contextlib
import hashlib
import ipaddress
import logging
import math
import os
import re
import socket
import stat
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from pipeline import deadline
from pipeline.addresses import AllowedHosts, IPAddress, forbidden_reason
from pipeline.pixel_budget import CONVERTED_BEFORE_REDUCE, PixelBudget, decoded_bytes
from pipeline.settings import Settings
from pipeline.stores import OBJECT_STORE_SCHEMES, HostHeaders, Proxies, StoreError, StorePolicy, StoreReader
from schemas.images import FetchedImage, IntakeFailure, IntakeOutcome, PreparedImage
from schemas.results import ErrorCode, ItemError, JobSpec

REDIRECTS = frozenset({301, 302, 303, 307, 308})
IMAGE_STATUSES = frozenset({200, 203})  # a full representation; 206 or 204 is not an image
HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")  # what DNS can carry (IDNA-encoded)
NUMERIC_HOST = re.compile(r"(?:.*\.)?(?:[0-9]+|0[xX][0-9a-fA-F]*)\.?")  # ends in a number
# The smallest well-formed file of any accepted format is longer than this (a GIF is 26+ bytes):
# shorter data is refused before any decoder or format probe sees it.
MIN_IMAGE_BYTES = 8
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
PILLOW_BLOCK_BYTES = 64 * 2**20  # over glibc's largest mmap threshold (32 MB on 64-bit)

log = logging.getLogger("skutag.intake")


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
    # Pillow allocates a large image in blocks (16 MB by default). glibc serves blocks under its
    # mmap threshold (which grows to 32 MB) from per-thread arenas and keeps them when freed, so
    # eight intake threads each kept a few hundred MB of freed pixels. Blocks above the threshold
    # are mapped and unmapped, and go back to the system as soon as the image is reduced.
    from PIL import _imaging  # the C core that Image.core names; its block size has no public setter

    _imaging.set_block_size(PILLOW_BLOCK_BYTES)


# --- addresses -------------------------------------------------------------------------------
def resolve(host: str, port: int, resolver: deadline.Resolver = socket.getaddrinfo) -> list[IPAddress]:
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        return [literal]
    if NUMERIC_HOST.fullmatch(host):
        # WHATWG URL parsing: a host ending in a number is an IPv4 address, and this one is not a
        # valid one (256.1.1.1). Never hand it to the resolver, which would send it to DNS.
        raise IntakeError(ErrorCode.INVALID_URI, f"{host!r} is not a valid IPv4 address")
    try:
        infos = deadline.resolve_within(host, port, resolver)  # a slow DNS server counts against the fetch
    except TimeoutError as exc:
        raise IntakeError(ErrorCode.TIMEOUT, f"cannot resolve host {host!r} in time: {exc}") from exc
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
    allowed_hosts: AllowedHosts
    max_bytes: int
    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float
    max_redirects: int
    stores: StorePolicy | None = None  # object stores (pipeline.stores); None: none enabled
    host_headers: HostHeaders = field(default_factory=HostHeaders)
    proxies: Proxies = field(default_factory=Proxies)

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchPolicy:
        return cls(
            roots=tuple(Path(os.path.realpath(root)) for root in settings.image_roots),
            allowed_hosts=AllowedHosts.parse(settings.allowed_hosts),
            max_bytes=settings.max_image_bytes,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
            total_timeout_s=settings.fetch_total_timeout_s,
            max_redirects=settings.fetch_max_redirects,
            stores=StorePolicy.from_settings(settings),
            host_headers=HostHeaders.from_settings(settings),
            proxies=Proxies.from_settings(settings),
        )


class Fetcher:
    """Reads image bytes from a local path, file:// or http(s):// under a FetchPolicy."""

    def __init__(
        self, policy: FetchPolicy, client: httpx.Client | None = None, resolver: deadline.Resolver = socket.getaddrinfo
    ) -> None:
        self.policy = policy
        self.resolver = resolver  # tests hand in a stub: they never ask DNS
        self.client = client or deadline.deadline_client()
        self._proxied: dict[str, httpx.Client] = {}  # one client per proxy URL, made on first use
        self._stores = StoreReader(policy.stores) if policy.stores else None

    def close(self) -> None:
        self.client.close()
        for client in self._proxied.values():
            client.close()

    def fetch(self, image_uri: str, etag: str | None = None, last_modified: str | None = None) -> FetchedImage:
        """Raises IntakeError; a conditional request (etag / last_modified) may return not_modified."""
        started = time.perf_counter()
        if "\0" in image_uri:
            raise IntakeError(ErrorCode.INVALID_URI, "the URI contains a NUL byte")
        try:
            scheme = urlsplit(image_uri).scheme.lower()
        except ValueError as exc:
            raise IntakeError(ErrorCode.INVALID_URI, f"not a valid URI: {exc}") from exc
        if scheme in {"http", "https"}:
            with deadline.within(self.policy.total_timeout_s):
                fetched = self._fetch_http(image_uri, etag, last_modified)
        elif scheme == "file":
            fetched = self._fetch_local(image_uri, _file_uri_path(image_uri))
        elif scheme == "" or (len(scheme) == 1 and os.name == "nt"):
            fetched = self._fetch_local(image_uri, image_uri)
        elif scheme in OBJECT_STORE_SCHEMES:
            fetched = self._fetch_store(image_uri, etag)
        else:
            raise IntakeError(
                ErrorCode.FORBIDDEN_ADDRESS, f"URI scheme {scheme!r} is not allowed (http, https, file, s3, gs, ...)"
            )
        return replace(fetched, fetch_ms=(time.perf_counter() - started) * 1000)

    # -- local files --
    def _fetch_local(self, image_uri: str, raw_path: str) -> FetchedImage:
        if "\0" in raw_path:  # file:///a.jpg%00 decodes to one; the OS would refuse it with a ValueError
            raise IntakeError(ErrorCode.INVALID_URI, f"{raw_path!r} contains a NUL byte")
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
        except IsADirectoryError as exc:
            raise IntakeError(ErrorCode.NOT_FOUND, f"{raw_path} is a directory, not an image file") from exc
        except OSError as exc:
            raise IntakeError(ErrorCode.FETCH_FAILED, f"{raw_path}: {exc.strerror}") from exc
        try:
            self._check_file(raw_path, os.fstat(descriptor))
        except IntakeError:
            os.close(descriptor)
            raise
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read(self.policy.max_bytes + 1)
        if len(data) > self.policy.max_bytes:
            raise IntakeError(ErrorCode.TOO_LARGE, f"{raw_path}: over {self.policy.max_bytes} bytes")
        return FetchedImage(image_uri=image_uri, data=data, sha256=hashlib.sha256(data).hexdigest())

    def _check_file(self, raw_path: str, info: os.stat_result) -> None:
        if stat.S_ISDIR(info.st_mode):
            raise IntakeError(ErrorCode.NOT_FOUND, f"{raw_path} is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise IntakeError(ErrorCode.FORBIDDEN_ADDRESS, f"{raw_path} is not a regular file")
        if info.st_size > self.policy.max_bytes:
            raise IntakeError(ErrorCode.TOO_LARGE, f"{raw_path}: {info.st_size} bytes, over {self.policy.max_bytes}")

    # -- object stores --
    def _fetch_store(self, image_uri: str, etag: str | None) -> FetchedImage:
        if self._stores is None:
            raise IntakeError(ErrorCode.FORBIDDEN_ADDRESS, "object store images are not enabled (SKUTAG_IMAGE_STORES)")
        try:
            return self._stores.fetch(image_uri, etag)
        except StoreError as exc:
            raise IntakeError(exc.item_error.code, exc.item_error.message) from exc

    # -- http(s) --
    def _fetch_http(self, image_uri: str, etag: str | None, last_modified: str | None) -> FetchedImage:
        url = _parse_url(image_uri)
        headers = {"Accept": "image/*", "User-Agent": "skutag/0.1"}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        for _hop in range(self.policy.max_redirects + 1):
            location = self._request(url, headers, image_uri)
            if isinstance(location, FetchedImage):
                return location
            url = location
        raise IntakeError(ErrorCode.FETCH_FAILED, f"more than {self.policy.max_redirects} redirects")

    def _target(self, url: httpx.URL) -> tuple[httpx.URL, dict[str, Any]]:
        """The URL with the host replaced by the address we checked, and the TLS server name."""
        if url.scheme not in {"http", "https"} or not url.host:
            raise IntakeError(ErrorCode.FORBIDDEN_ADDRESS, f"redirect to {url} is not an http(s) URL")
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = resolve(url.host, port, self.resolver)
        if not addresses:
            raise IntakeError(ErrorCode.FETCH_FAILED, f"host {url.host!r} has no address")
        if not self.policy.allowed_hosts.allows(url.host, port):
            for address in addresses:
                reason = forbidden_reason(address)
                if reason:
                    raise IntakeError(ErrorCode.FORBIDDEN_ADDRESS, f"{url.host} resolves to {reason}")
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        return url.copy_with(host=str(addresses[0])), extensions

    def _request(self, url: httpx.URL, headers: dict[str, str], image_uri: str) -> FetchedImage | httpx.URL:
        target, extensions = self._target(url)
        remaining = deadline.remaining()
        if remaining <= 0:
            raise IntakeError(ErrorCode.TIMEOUT, f"no answer within {self.policy.total_timeout_s:g} s")
        timeout = httpx.Timeout(
            connect=min(self.policy.connect_timeout_s, remaining),
            read=min(self.policy.read_timeout_s, remaining),
            write=min(self.policy.read_timeout_s, remaining),
            pool=min(self.policy.connect_timeout_s, remaining),
        )
        default_port = 443 if url.scheme == "https" else 80
        private = self.policy.host_headers.for_host(url.host, url.port, default_port)  # this hop's host only
        request_headers = {**headers, **private, "Host": url.netloc.decode("ascii")}
        try:
            with self._client_for(url).stream(
                "GET", target, headers=request_headers, extensions=extensions, timeout=timeout
            ) as response:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    return _join_location(url, response.headers["location"])
                conditional = "If-None-Match" in headers or "If-Modified-Since" in headers
                return self._read_body(response, url, image_uri, conditional)
        except httpx.TimeoutException as exc:
            raise IntakeError(ErrorCode.TIMEOUT, f"{url.host}: timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            # httpx parses a redirect's Location itself (even with redirects off) and reports a bad one so
            code = ErrorCode.INVALID_URI if "Invalid URL in location" in str(exc) else ErrorCode.FETCH_FAILED
            message = self.policy.host_headers.mask(f"{url.host}: {type(exc).__name__}: {exc}")
            raise IntakeError(code, message) from exc
        except (httpx.InvalidURL, ValueError) as exc:  # ... or lets idna's ValueError through
            raise IntakeError(ErrorCode.INVALID_URI, f"{url.host} answered with an invalid URL: {exc}") from exc

    def _client_for(self, url: httpx.URL) -> httpx.Client:
        """The direct client, or the one through the proxy the environment names for url's host."""
        proxy = self.policy.proxies.for_url(url.scheme, url.host)
        if proxy is None:
            return self.client
        if proxy not in self._proxied:
            self._proxied[proxy] = deadline.deadline_client(proxy=proxy)
        return self._proxied[proxy]

    def _read_body(self, response: httpx.Response, url: httpx.URL, image_uri: str, conditional: bool) -> FetchedImage:
        status = response.status_code
        if status == 304 and not conditional:
            raise IntakeError(ErrorCode.FETCH_FAILED, f"{url}: HTTP 304 to a request that was not conditional")
        if status == 304:
            return FetchedImage(
                image_uri=image_uri, data=b"", sha256="", not_modified=True,
                etag=response.headers.get("etag"), last_modified=response.headers.get("last-modified"),
            )  # fmt: skip
        if status in {404, 410}:
            raise IntakeError(ErrorCode.NOT_FOUND, f"{url}: HTTP {status}")
        if status >= 400:
            raise IntakeError(ErrorCode.FETCH_FAILED, f"{url}: HTTP {status}")
        if status == 204:
            raise IntakeError(ErrorCode.NOT_AN_IMAGE, f"{url}: HTTP 204 No Content")
        if status not in IMAGE_STATUSES:
            raise IntakeError(ErrorCode.FETCH_FAILED, f"{url}: HTTP {status} is not an image response")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.policy.max_bytes:
            raise IntakeError(ErrorCode.TOO_LARGE, f"{url}: Content-Length {declared}, over {self.policy.max_bytes}")
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.policy.max_bytes:  # the header may lie or be absent: count what arrives
                raise IntakeError(ErrorCode.TOO_LARGE, f"{url}: body over {self.policy.max_bytes} bytes")
            if deadline.remaining() <= 0:
                raise IntakeError(
                    ErrorCode.TIMEOUT, f"{url}: body not complete within {self.policy.total_timeout_s:g} s"
                )
            chunks.append(chunk)
        data = b"".join(chunks)
        return FetchedImage(
            image_uri=image_uri, data=data, sha256=hashlib.sha256(data).hexdigest(),
            etag=response.headers.get("etag"), last_modified=response.headers.get("last-modified"),
        )  # fmt: skip


def _parse_url(image_uri: str) -> httpx.URL:
    try:
        url = httpx.URL(image_uri)
        _ = url.host, url.port  # decoded lazily: an invalid IDNA label (xn--) raises only here
    except (httpx.InvalidURL, ValueError) as exc:  # idna's errors are ValueErrors
        raise IntakeError(ErrorCode.INVALID_URI, f"not a valid URL: {exc}") from exc
    host = url.raw_host.decode("ascii", "replace")
    if host and not HOST_NAME.fullmatch(host) and ":" not in host:  # ':' only in an IPv6 literal
        raise IntakeError(ErrorCode.INVALID_URI, f"{host!r} is not a valid host name")
    return url


def _join_location(url: httpx.URL, location: str) -> httpx.URL:
    try:
        joined = url.join(location)
        return _parse_url(str(joined)) if joined.host else joined  # validates the new host (IDNA too)
    except IntakeError as exc:
        raise IntakeError(ErrorCode.INVALID_URI, f"{url.host} redirects to an invalid URL: {exc}") from exc
    except (httpx.InvalidURL, ValueError) as exc:
        raise IntakeError(ErrorCode.INVALID_URI, f"{url.host} redirects to an invalid URL: {exc}") from exc


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
    budget: PixelBudget | None = None  # shared by the threads of one ImageIntake


def identify_format(data: bytes) -> str | None:
    """The format Pillow's plugins claim by magic bytes alone: no decoder runs."""
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a plugin's probe may raise on short or odd input: it does not claim it
            continue
    return None


def decode(data: bytes, policy: DecodePolicy) -> tuple[np.ndarray, str, tuple[int, int]]:
    """The square to resize, its source format and size. Raises IntakeError."""
    if len(data) < MIN_IMAGE_BYTES:
        # Too short for any format; some plugins' probes raise struct.error on a few bytes.
        raise IntakeError(ErrorCode.NOT_AN_IMAGE, f"{len(data)} bytes: too short to be an image")
    try:
        with Image.open(BytesIO(data), formats=list(policy.formats)) as image:
            source_size, source_format = image.size, str(image.format)  # before draft scales it
            bits = _sample_bits(image)
            small, orientation = _decode_reduced(image, policy)
        return _finish_square(small, orientation, bits, policy), source_format, source_size
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


def _decode_reduced(image: Image.Image, policy: DecodePolicy) -> tuple[Image.Image, int]:
    """The part of the image the engine will see, reduced to under twice its input side, and the
    EXIF orientation. The full-size pixels exist only inside this call, under the pixel budget."""
    width, height = image.size
    if width * height > policy.max_pixels:
        raise IntakeError(ErrorCode.DECOMPRESSION_BOMB, f"{width}x{height} is over the {policy.max_pixels} pixel cap")
    if width < 1 or height < 1:
        raise IntakeError(ErrorCode.CORRUPT, f"{width}x{height} image")
    image.seek(0)  # animated formats: the first frame
    if image.format in {"JPEG", "MPO"}:
        _draft(image, policy)
    hold = policy.budget.hold(decoded_bytes(image)) if policy.budget else contextlib.nullcontext()
    with hold:
        image.load()
        orientation = _orientation(image)  # after load: reading EXIF may load (PNG), hiding a decode error
        small = _reduce(image, policy)
        image.close()  # frees the full-size pixels now, inside the budget, not when the caller lets go
    return small, orientation


def _reduce(image: Image.Image, policy: DecodePolicy) -> Image.Image:
    """Box-reduce by the largest whole factor that keeps the needed side >= policy.side: the
    result is under 2 x side per side (under 1.8 MB at 384), whatever the source's size. The
    engine's exact resize to its input stays on the device, batched."""
    box = _center_square(image.size) if policy.fit == "crop" else (0, 0, *image.size)
    needed = max(box[2] - box[0], box[3] - box[1])
    factor = needed // policy.side
    if factor <= 1:
        return image.crop(box)
    if image.mode in CONVERTED_BEFORE_REDUCE:
        image = image.convert(_reducible_mode(image))
    return image.reduce(factor, box=box)


def _reducible_mode(image: Image.Image) -> str:
    if image.mode.startswith("I;16"):
        return "I"  # keeps the 16-bit values; _to_rgb scales them
    if image.mode == "1":
        return "L"
    transparent = image.mode == "PA" or "transparency" in image.info
    return "RGBA" if transparent else "RGB"


def _sample_bits(image: Image.Image) -> int | None:
    """The depth the file declares for integer gray samples, when Pillow's mode does not say it
    (a 16-bit PNG may hold only small values: a dark image, not an 8-bit one)."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        return 16
    return None


def _finish_square(image: Image.Image, orientation: int, bits: int | None, policy: DecodePolicy) -> np.ndarray:
    rgb = _to_rgb(image, bits)
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


def _to_rgb(image: Image.Image, bits: int | None = None) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}:
        return _high_depth_to_rgb(image, bits)
    has_alpha = mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*WHITE, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image, bits: int | None) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if bits == 16 or (bits is None and peak > 255):  # 16-bit samples; unknown depth: guess from the data
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
            budget=PixelBudget(settings.decode_budget_mb * 2**20),
        )

    def close(self) -> None:
        self.fetcher.close()

    def prepare(self, image_uri: str, owner: str | None = None) -> IntakeOutcome:
        """The prepared image or its failure; never raises. This is the per-item boundary that the
        workers, local mode and tag-image share: whatever goes wrong with one image ends as that
        image's IntakeFailure, so it cannot fail a neighbour or a queue message. owner names the
        item (job id and sku) in the log, where an unexpected error's traceback goes, once."""
        try:
            return self._prepare(image_uri)
        except MemoryError:
            return IntakeFailure(image_uri, ItemError(code=ErrorCode.TOO_LARGE, message="out of memory decoding it"))
        except Exception as exc:
            log.error("intake of %s (%s) failed unexpectedly", owner or "an image", image_uri, exc_info=True)
            message = f"internal error ({type(exc).__name__}); the traceback is in the log"
            return IntakeFailure(image_uri, ItemError(code=ErrorCode.INTERNAL_ERROR, message=message))

    def _prepare(self, image_uri: str) -> IntakeOutcome:
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

    def prepare_jobs(self, jobs: Sequence[JobSpec], executor: Executor | None = None) -> list[IntakeOutcome]:
        """prepare() for each job, in order; a failure is logged with the job's id and sku."""

        def one(job: JobSpec) -> IntakeOutcome:
            return self.prepare(job.image_uri, owner=f"job {job.job_id} sku {job.sku!r}")

        if executor is None or len(jobs) <= 1:
            return [one(job) for job in jobs]
        return list(executor.map(one, jobs))
