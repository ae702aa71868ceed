"""Image stores beyond plain HTTP: object stores through fsspec, per-host headers for private HTTP
servers, and proxies from the environment.

Object stores (s3://, gs://, az://, ... through fsspec):
- only schemes enabled in settings.image_stores are read; the store's package (s3fs, gcsfs,
  adlfs) is needed for its scheme, and its absence is a per-item error naming the package
- credentials come from the store's own chain (environment, config files, instance roles) or
  settings.storage_options, never from the catalog: a URI carrying user info ("key:secret@") or a
  query string is refused, and so is fsspec's URL chaining ("simplecache::s3://...")
- an image URI names a bucket and a key, never a host: requests go to the store's endpoint (its
  default, or storage_options' endpoint_url), which the operator configures
- the intake's caps hold: the size is checked from the object's metadata before reading and
  again while reading, chunk by chunk, each chunk under the read timeout and the whole read under
  the total deadline; the bytes then go through the same decoder, format allow-list and pixel cap
  as any other image, so a missing, huge or non-image object fails with the same error code as it
  would over HTTP (not_found, too_large, not_an_image)

Private HTTP servers: settings.http_headers_file names a YAML or JSON file mapping a host (or
host:port) to the headers sent to it, e.g. an Authorization token; values may be ${ENV_VAR}
references so the file holds no secret. Headers go only to that exact host (a redirect elsewhere
does not carry them) and are masked in every log line and error message.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from pipeline.addresses import DEFAULT_PORTS, normalize_host, parse_host_port
from pipeline.errors import ConfigError
from pipeline.settings import Settings
from schemas.images import FetchedImage
from schemas.results import ErrorCode, ItemError

# fsspec schemes that are object stores: a bucket and a key, served by the store's endpoint.
# Schemes that name a host or wrap other filesystems (http, ftp, sftp, smb, webdav, zip, cached...)
# are never read this way.
OBJECT_STORE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})
STORE_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                  "abfss": "adlfs", "oss": "ossfs"}  # fmt: skip
CHUNK_BYTES = 256 * 1024
MASK = "***"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_OPTION = re.compile(r"key|secret|token|password|credential|sas", re.IGNORECASE)


class StoreError(Exception):
    """Internal: one item's failure, turned into an IntakeError by the intake."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.item_error = ItemError(code=code, message=message[:1000])


# --- object stores ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StorePolicy:
    enabled: frozenset[str]
    storage_options: Mapping[str, Mapping[str, Any]]
    max_bytes: int
    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> StorePolicy:
        return cls(
            enabled=frozenset(scheme.lower() for scheme in settings.image_stores),
            storage_options=settings.storage_options,
            max_bytes=settings.max_image_bytes,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
            total_timeout_s=settings.fetch_total_timeout_s,
        )


def is_store_uri(image_uri: str) -> bool:
    return urlsplit(image_uri).scheme.lower() in OBJECT_STORE_SCHEMES


def masked_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """storage_options as they may be logged: secret-looking values masked, nested dicts too."""
    return {
        name: masked_options(value) if isinstance(value, Mapping) else (MASK if _SECRET_OPTION.search(name) else value)
        for name, value in options.items()
    }


class StoreReader:
    """Reads image bytes from object stores under a StorePolicy. Thread-safe (fsspec caches one
    filesystem instance per scheme and options)."""

    def __init__(self, policy: StorePolicy) -> None:
        self.policy = policy

    def fetch(self, image_uri: str, etag: str | None = None) -> FetchedImage:
        """Raises StoreError. With etag, an unchanged object comes back as not_modified."""
        scheme, path = self._checked(image_uri)
        deadline = time.monotonic() + self.policy.total_timeout_s
        filesystem = self._filesystem(scheme)
        with _translated(image_uri, self.policy.total_timeout_s):
            info = filesystem.info(path)
            if info.get("type") == "directory":
                raise StoreError(ErrorCode.NOT_FOUND, f"{image_uri}: is a directory, not an object")
            tag = _etag(info)
            if etag is not None and tag == etag:
                return FetchedImage(image_uri=image_uri, data=b"", sha256="", etag=tag, not_modified=True)
            size = info.get("size")
            if isinstance(size, int) and size > self.policy.max_bytes:
                raise StoreError(ErrorCode.TOO_LARGE, f"{image_uri}: {size} bytes, over {self.policy.max_bytes}")
            data = self._read(filesystem, path, image_uri, deadline)
        import hashlib

        return FetchedImage(
            image_uri=image_uri, data=data, sha256=hashlib.sha256(data).hexdigest(), etag=tag,
            last_modified=_last_modified(info),
        )  # fmt: skip

    def _checked(self, image_uri: str) -> tuple[str, str]:
        if "::" in image_uri:
            raise StoreError(ErrorCode.FORBIDDEN_ADDRESS, "chained fsspec URLs (a::b) are not read")
        parts = urlsplit(image_uri)
        scheme = parts.scheme.lower()
        if scheme not in self.policy.enabled:
            enabled = ", ".join(sorted(self.policy.enabled)) or "none"
            raise StoreError(
                ErrorCode.FORBIDDEN_ADDRESS, f"{scheme}:// images are not enabled (SKUTAG_IMAGE_STORES: {enabled})"
            )
        if "@" in parts.netloc or parts.query or parts.fragment:
            # A key in the catalog would end up in logs, exports and the results table.
            raise StoreError(
                ErrorCode.FORBIDDEN_ADDRESS,
                f"{scheme}:// URI with credentials or a query string; the store's own credentials are used",
            )
        if not parts.netloc or not parts.path.strip("/"):
            raise StoreError(ErrorCode.NOT_FOUND, f"{scheme}:// URI without a bucket and key")
        return scheme, f"{parts.netloc}{parts.path}"

    def _filesystem(self, scheme: str) -> Any:
        import fsspec

        options = {**_default_options(scheme, self.policy), **self.policy.storage_options.get(scheme, {})}
        try:
            return fsspec.filesystem(scheme, **options)
        except ImportError as exc:
            package = STORE_PACKAGES.get(scheme, "its fsspec implementation")
            raise StoreError(
                ErrorCode.FORBIDDEN_ADDRESS, f"{scheme}:// images need the {package} package (pip install {package})"
            ) from exc
        except (TypeError, ValueError) as exc:
            raise StoreError(ErrorCode.FORBIDDEN_ADDRESS, f"{scheme}:// store options rejected: {exc}") from exc

    def _read(self, filesystem: Any, path: str, image_uri: str, deadline: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        with filesystem.open(path, "rb", block_size=CHUNK_BYTES) as handle:
            while chunk := handle.read(CHUNK_BYTES):
                size += len(chunk)
                if size > self.policy.max_bytes:  # the metadata may be stale: count what arrives
                    raise StoreError(ErrorCode.TOO_LARGE, f"{image_uri}: over {self.policy.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise StoreError(
                        ErrorCode.TIMEOUT, f"{image_uri}: not read within {self.policy.total_timeout_s:g} s"
                    )
                chunks.append(chunk)
        return b"".join(chunks)


def _default_options(scheme: str, policy: StorePolicy) -> dict[str, Any]:
    """The intake's timeouts in the store's own terms (settings.storage_options may override)."""
    if STORE_PACKAGES.get(scheme) == "s3fs":
        return {
            "config_kwargs": {
                "connect_timeout": policy.connect_timeout_s,
                "read_timeout": policy.read_timeout_s,
                "retries": {"max_attempts": 2, "mode": "standard"},  # the ledger retries the job later
            }
        }
    return {}


def _etag(info: Mapping[str, Any]) -> str | None:
    value = info.get("ETag") or info.get("etag")
    return str(value) if value else None


def _last_modified(info: Mapping[str, Any]) -> str | None:
    value = info.get("LastModified") or info.get("last_modified") or info.get("updated")
    return str(value) if value else None


@contextmanager
def _translated(image_uri: str, total_timeout_s: float) -> Iterator[None]:
    """Store exceptions to item errors: the one boundary for fsspec and its backends' errors."""
    try:
        yield
    except StoreError:
        raise
    except FileNotFoundError as exc:
        raise StoreError(ErrorCode.NOT_FOUND, f"{image_uri}: no such object") from exc
    except PermissionError as exc:
        raise StoreError(ErrorCode.FORBIDDEN_ADDRESS, f"{image_uri}: access denied ({exc})") from exc
    except TimeoutError as exc:
        raise StoreError(ErrorCode.TIMEOUT, f"{image_uri}: timed out") from exc
    except Exception as exc:  # botocore, aiohttp, google-auth ...: a store we could not read now
        name = type(exc).__name__
        code = ErrorCode.TIMEOUT if "timeout" in name.lower() else ErrorCode.FETCH_FAILED
        raise StoreError(code, f"{image_uri}: {name}: {exc}") from exc


# --- private HTTP servers ---------------------------------------------------------------------
@dataclass(frozen=True)
class HostHeaders:
    """Headers per host (lower case; host or host:port) for private HTTP image servers."""

    by_host: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> HostHeaders:
        if settings.http_headers_file is None:
            return cls()
        return cls.load(settings.http_headers_file)

    @classmethod
    def load(cls, path: Path, environ: Mapping[str, str] | None = None) -> HostHeaders:
        """Raises ConfigError naming the file and the problem; never echoes a header value."""
        environ = os.environ if environ is None else environ
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"SKUTAG_HTTP_HEADERS_FILE {path}: cannot read: {exc.strerror}") from exc
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"SKUTAG_HTTP_HEADERS_FILE {path}: not valid YAML or JSON") from exc
        if not isinstance(document, dict):
            raise ConfigError(f"SKUTAG_HTTP_HEADERS_FILE {path}: must map host names to headers")
        by_host: dict[str, dict[str, str]] = {}
        for host, headers in document.items():
            if not isinstance(host, str) or not isinstance(headers, dict) or not headers:
                raise ConfigError(f"SKUTAG_HTTP_HEADERS_FILE {path}: {host!r} must map to a set of headers")
            try:
                parse_host_port(host)
            except ValueError as exc:
                raise ConfigError(f"SKUTAG_HTTP_HEADERS_FILE {path}: {exc}") from exc
            by_host[host.strip().lower()] = {
                str(name): _expand(str(value), environ, path, host, str(name)) for name, value in headers.items()
            }
        return cls(by_host)

    def for_host(self, host: str, port: int | None, default_port: int) -> dict[str, str]:
        """The headers for a request to host:port. An entry "host:port" matches that port, a bare
        "host" the default ports only (as SKUTAG_ALLOWED_HOSTS reads entries)."""
        name, wanted = normalize_host(host), port or default_port
        for entry, headers in self.by_host.items():
            entry_host, entry_port = parse_host_port(entry)
            if entry_host == name and (entry_port == wanted or (entry_port is None and wanted in DEFAULT_PORTS)):
                return dict(headers)
        return {}

    def describe(self) -> str:
        """For logs: which hosts get which headers, every value masked."""
        return "; ".join(
            f"{host}: {', '.join(f'{n}: {MASK}' for n in headers)}" for host, headers in self.by_host.items()
        )

    def mask(self, text: str) -> str:
        """text with every configured header value replaced (for error messages and logs)."""
        for headers in self.by_host.values():
            for value in headers.values():
                if value:
                    text = text.replace(value, MASK)
        return text


def _expand(value: str, environ: Mapping[str, str], path: Path, host: object, name: str) -> str:
    def lookup(match: re.Match[str]) -> str:
        variable = match.group(1)
        if variable not in environ:
            raise ConfigError(
                f"SKUTAG_HTTP_HEADERS_FILE {path}: {host}: header {name} needs ${{{variable}}}, which is not set"
            )
        return environ[variable]

    expanded = _ENV_REFERENCE.sub(lookup, value)
    if any(char in expanded for char in "\r\n\0"):
        raise ConfigError(f"SKUTAG_HTTP_HEADERS_FILE {path}: {host}: header {name} contains a line break")
    return expanded


# --- proxies ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proxies:
    """HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY from the environment, read only when
    settings.http_proxy_from_env is on. Read here rather than through httpx's trust_env, which
    would also pick up .netrc credentials and certificate settings. The intake still resolves and
    checks every host itself and the request names the checked address, so the proxy connects
    where the check allowed; the decision to use a proxy is made on the URL's host name."""

    http: str | None = None
    https: str | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> Proxies:
        return cls.from_env(environ) if settings.http_proxy_from_env else cls()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Proxies:
        environ = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return environ.get(name) or environ.get(name.lower()) or None

        everywhere = get("ALL_PROXY")
        bypass = tuple(
            entry.strip().lstrip("*").lstrip(".").lower() or "*"
            for entry in (get("NO_PROXY") or "").split(",")
            if entry.strip()
        )
        return cls(http=get("HTTP_PROXY") or everywhere, https=get("HTTPS_PROXY") or everywhere, no_proxy=bypass)

    def for_url(self, scheme: str, host: str) -> str | None:
        """The proxy URL for a request to scheme://host, or None to connect directly."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None:
            return None
        host = host.lower().strip("[]")
        for entry in self.no_proxy:
            if entry in ("*", host) or host.endswith("." + entry):
                return None
        return proxy

    def describe(self) -> str:
        """For logs: the proxies without any user:password they carry."""
        return ", ".join(
            f"{name}={_without_userinfo(url)}" for name, url in (("http", self.http), ("https", self.https)) if url
        )


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=f"{MASK}@{parts.netloc.rsplit('@', 1)[1]}").geturl()
