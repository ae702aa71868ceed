"""Image stores: s3:// through a local S3-compatible server (moto, on loopback) with the intake's
error codes; private HTTP servers' per-host headers (masked); proxies from the environment."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.db import make_engine
from pipeline.errors import ConfigError
from pipeline.images import ImageIntake
from pipeline.settings import load_settings
from pipeline.stores import HostHeaders, Proxies, masked_options
from schemas.images import IntakeFailure, PreparedImage
from schemas.results import ErrorCode

MAX_BYTES = 4096
BUCKET = "catalog-images"


def jpeg(side: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


# Each object with the code it must get, the same as the same bytes from a local file.
OBJECTS: dict[str, tuple[bytes | None, ErrorCode | None]] = {
    "shirts/good.jpg": (jpeg(), None),
    "shirts/huge.jpg": (b"\xff\xd8\xff" + bytes(MAX_BYTES * 2), ErrorCode.TOO_LARGE),
    "shirts/notes.jpg": (b"this is a text file, not an image\n" * 4, ErrorCode.NOT_AN_IMAGE),
    "shirts/missing.jpg": (None, ErrorCode.NOT_FOUND),
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback with the test objects; credentials from the environment, the
    way a store's own chain supplies them."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
            patch.setenv(name, value)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        for key, (data, _code) in OBJECTS.items():
            if data is not None:
                client.put_object(Bucket=BUCKET, Key=key, Body=data)
        yield endpoint
    server.stop()


def s3_intake(endpoint: str, root: Path, **overrides: Any) -> ImageIntake:
    options = {"s3": {"endpoint_url": endpoint, "skip_instance_cache": True}}
    settings = load_settings(image_roots=[root], max_image_bytes=MAX_BYTES, storage_options=options, **overrides)
    return ImageIntake(settings)


@pytest.mark.parametrize("key", sorted(OBJECTS))
def test_s3_objects_get_the_codes_local_files_get(key: str, s3_endpoint: str, tmp_path: Path) -> None:
    data, expected = OBJECTS[key]
    local = tmp_path / Path(key).name
    if data is not None:
        local.write_bytes(data)
    intake = s3_intake(s3_endpoint, tmp_path)
    from_s3 = intake.prepare(f"s3://{BUCKET}/{key}")
    from_file = intake.prepare(str(local))
    if expected is None:
        assert isinstance(from_s3, PreparedImage), getattr(from_s3, "error", None)
        assert isinstance(from_file, PreparedImage)
        assert from_s3.sha256 == from_file.sha256 and from_s3.etag
    else:
        assert isinstance(from_s3, IntakeFailure) and isinstance(from_file, IntakeFailure)
        assert from_s3.error.code == from_file.error.code == expected, from_s3.error.message


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        (f"s3://AKIAXXXX:secret@{BUCKET}/shirts/good.jpg", "credentials"),
        (f"s3://{BUCKET}/shirts/good.jpg?versionId=1", "query string"),
        (f"simplecache::s3://{BUCKET}/shirts/good.jpg", "not allowed"),
        ("gs://bucket/a.jpg", "not enabled"),
    ],
)
def test_object_store_uris_that_could_leak_or_escape_are_refused(
    uri: str, why: str, s3_endpoint: str, tmp_path: Path
) -> None:
    outcome = s3_intake(s3_endpoint, tmp_path, image_stores=["s3"]).prepare(uri)
    assert isinstance(outcome, IntakeFailure)
    assert outcome.error.code in {ErrorCode.FORBIDDEN_ADDRESS, ErrorCode.INVALID_URI}, outcome.error
    assert why in outcome.error.message
    assert "secret" not in outcome.error.message


def test_an_unchanged_object_is_not_read_again(s3_endpoint: str, tmp_path: Path) -> None:
    intake = s3_intake(s3_endpoint, tmp_path)
    first = intake.fetcher.fetch(f"s3://{BUCKET}/shirts/good.jpg")
    again = intake.fetcher.fetch(f"s3://{BUCKET}/shirts/good.jpg", etag=first.etag)
    assert again.not_modified and again.data == b""


def test_secret_storage_options_are_masked() -> None:
    options = {"s3": {"endpoint_url": "https://minio", "key": "AKIA", "secret": "s3cr3t", "client_kwargs": {
        "aws_session_token": "tok"}}}  # fmt: skip
    assert masked_options(options) == {"s3": {"endpoint_url": "https://minio", "key": "***", "secret": "***",
                                              "client_kwargs": {"aws_session_token": "***"}}}  # fmt: skip


# --- private HTTP servers and proxies ----------------------------------------------------------
class Recorder(BaseHTTPRequestHandler):
    """Serves one JPEG at any path; records each request's path and headers. Redirects /hop."""

    seen: ClassVar[list[tuple[str, dict[str, str]]]] = []
    redirect_to: ClassVar[str] = ""

    def do_GET(self) -> None:
        self.seen.append((self.path, dict(self.headers.items())))
        if self.path.endswith("/hop"):
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
            return
        body = jpeg()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class Proxy(BaseHTTPRequestHandler):
    """A forward proxy for plain http: records the absolute URL, fetches it directly."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        request = urllib.request.Request(self.path, headers={k: v for k, v in self.headers.items() if k != "Host"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=5) as answer:
            body = answer.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_private_servers_get_their_headers_and_only_they(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Recorder.seen.clear()
    with serving(Recorder) as private, serving(Recorder) as other:
        Recorder.redirect_to = f"http://127.0.0.1:{other}/elsewhere.jpg"
        headers_file = tmp_path / "headers.yaml"
        headers_file.write_text(f'"127.0.0.1:{private}":\n  Authorization: "Bearer ${{IMAGE_TOKEN}}"\n')
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("IMAGE_TOKEN", "t0ken-value")
            allowed = [f"127.0.0.1:{private}", f"127.0.0.1:{other}"]
            settings = load_settings(image_roots=[tmp_path], allowed_hosts=allowed, http_headers_file=headers_file)
            intake = ImageIntake(settings)
        with caplog.at_level(logging.DEBUG):
            assert isinstance(intake.prepare(f"http://127.0.0.1:{private}/a.jpg"), PreparedImage)
            assert isinstance(intake.prepare(f"http://127.0.0.1:{private}/hop"), PreparedImage)
            assert isinstance(intake.prepare(f"http://127.0.0.1:{other}/b.jpg"), PreparedImage)
    auth = {path: headers.get("Authorization") for path, headers in Recorder.seen}
    assert auth == {"/a.jpg": "Bearer t0ken-value", "/hop": "Bearer t0ken-value", "/elsewhere.jpg": None,
                    "/b.jpg": None}  # fmt: skip
    assert "t0ken-value" not in caplog.text
    assert intake.fetcher.policy.host_headers.describe() == f"127.0.0.1:{private}: Authorization: ***"


def test_a_headers_file_naming_an_unset_variable_stops_with_its_name(tmp_path: Path) -> None:
    headers_file = tmp_path / "headers.yaml"
    headers_file.write_text('images.internal:\n  X-Api-Key: "${NOT_SET_ANYWHERE}"\n')
    with pytest.raises(ConfigError, match=r"X-Api-Key needs \$\{NOT_SET_ANYWHERE\}"):
        HostHeaders.load(headers_file, environ={})


def test_proxies_come_from_the_environment_only_when_enabled(tmp_path: Path) -> None:
    Proxy.seen.clear()
    with serving(Recorder) as origin, serving(Proxy) as proxy:
        environment = {"HTTP_PROXY": f"http://127.0.0.1:{proxy}", "NO_PROXY": "bypass.example"}
        with pytest.MonkeyPatch.context() as patch:
            for name, value in environment.items():
                patch.setenv(name, value)
            allowed = [f"127.0.0.1:{origin}"]
            direct = ImageIntake(load_settings(image_roots=[tmp_path], allowed_hosts=allowed))
            proxied = ImageIntake(
                load_settings(image_roots=[tmp_path], allowed_hosts=allowed, http_proxy_from_env=True)
            )
        assert isinstance(direct.prepare(f"http://127.0.0.1:{origin}/direct.jpg"), PreparedImage)
        assert Proxy.seen == []
        assert isinstance(proxied.prepare(f"http://127.0.0.1:{origin}/via.jpg"), PreparedImage)
    # The proxy was asked for the address the intake checked, not a name it would resolve again.
    assert Proxy.seen == [f"http://127.0.0.1:{origin}/via.jpg"]
    assert Proxies.from_env(environment).for_url("http", "img.bypass.example") is None


def test_proxy_credentials_are_masked_in_descriptions() -> None:
    proxies = Proxies.from_env({"HTTPS_PROXY": "http://user:pw@proxy.internal:3128"})
    assert proxies.describe() == "https=http://***@proxy.internal:3128"


def test_a_catalog_of_s3_uris_is_tagged_with_the_same_codes(
    s3_endpoint: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    # End to end in local mode: catalog -> ledger -> intake from the S3 server -> tiny model -> writer.
    catalog = tmp_path / "catalog.csv"
    rows = [f"S3-{index},s3://{BUCKET}/{key}" for index, key in enumerate(sorted(OBJECTS))]
    catalog.write_text("sku,image_uri\n" + "\n".join(rows) + "\n")
    url = f"sqlite:///{tmp_path}/s3.db"
    env = {"SKUTAG_STORAGE_OPTIONS": json.dumps({"s3": {"endpoint_url": s3_endpoint}}),
           "SKUTAG_MAX_IMAGE_BYTES": str(MAX_BYTES), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    arguments = ["--database-url", url, "run", str(catalog), "--model", str(tiny_model_dir), "--quantization", "fp32"]
    result = CliRunner().invoke(main, arguments, env=env, catch_exceptions=False)
    assert result.exit_code == 4, result.output  # partial: three objects are bad
    engine = make_engine(url)
    with engine.connect() as conn:
        jobs = dict(conn.execute(sa.text("SELECT image_uri, coalesce(last_error_code, state) FROM jobs")).all())
    engine.dispose()
    expected = {f"s3://{BUCKET}/{key}": code.value if code else "tagged" for key, (_data, code) in OBJECTS.items()}
    assert {uri: ("tagged" if state in {"done", "needs_review"} else state) for uri, state in jobs.items()} == expected
