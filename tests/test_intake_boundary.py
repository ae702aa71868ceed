"""The per-item boundary: whatever one item does ends as that item's failed result with a specific
code, in intake alone, in a worker's JobHandler, in local mode (`skutag run`) and through a real
`skutag worker`; a message never fails jobs it did not process. No test resolves a name via DNS."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from PIL import Image

from pipeline import images as images_module
from pipeline.cli import main
from pipeline.db import make_engine
from pipeline.images import ImageIntake
from pipeline.inference import TaggingEngine
from pipeline.settings import load_settings
from pipeline.worker import JobHandler
from pipeline.writer import ResultWriter, WriterSink
from schemas.images import IntakeFailure, PreparedImage
from schemas.results import ErrorCode, JobSpec
from schemas.taxonomy import Taxonomy
from tests.conftest import engine_settings, make_jobs

TINY_BODIES = [b"", b"\x00", b"BM", b"\xff\xd8\xff", b"GIF", b"\x89PN", b"II*", b"RIF"]


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hermetic: any name outside an IP literal reaching the resolver fails the test."""
    real = socket.getaddrinfo

    def literal_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in {"127.0.0.1", "::1", "localhost"}:
            raise AssertionError(f"intake tried to resolve {host!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", literal_only)


def code_of(outcome: object) -> ErrorCode:
    assert isinstance(outcome, IntakeFailure), outcome
    assert outcome.error.message
    return outcome.error.code


def png_bytes(side: int = 64) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (30, 160, 90)).save(buffer, "PNG")
    return buffer.getvalue()


# --- local files -----------------------------------------------------------------------------
@pytest.fixture
def root(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    return populate(images)


def populate(images: Path) -> Path:
    (images / "good.png").write_bytes(png_bytes())
    (images / "folder.jpg").mkdir()
    for index, body in enumerate(TINY_BODIES):
        (images / f"tiny-{index}.jpg").write_bytes(body)
    return images


def bad_local_uris(root: Path) -> dict[str, ErrorCode]:
    uris: dict[str, ErrorCode] = {f"tiny-{i}.jpg": ErrorCode.NOT_AN_IMAGE for i in range(len(TINY_BODIES))}
    uris |= {
        "folder.jpg": ErrorCode.NOT_FOUND,
        str(root / "folder.jpg") + "/": ErrorCode.NOT_FOUND,
        str(root): ErrorCode.NOT_FOUND,
        (root / "good.png").as_uri() + "%00": ErrorCode.INVALID_URI,
        (root / "good.png").as_uri() + "%00.jpg": ErrorCode.INVALID_URI,
        "good.png\0.jpg": ErrorCode.INVALID_URI,
        "file:///%00": ErrorCode.INVALID_URI,
        "http://[::1/x.jpg": ErrorCode.INVALID_URI,
    }
    return uris


def test_every_bad_local_item_is_its_own_failure_with_a_specific_code(root: Path) -> None:
    intake = ImageIntake(load_settings(image_roots=[root]))
    for uri, expected in bad_local_uris(root).items():
        assert code_of(intake.prepare(uri)) == expected, uri
    assert isinstance(intake.prepare("good.png"), PreparedImage)


BAD_URLS = {
    "http://256.1.1.1/x.jpg": ErrorCode.INVALID_URI,
    "http://1.2.3.256/x.jpg": ErrorCode.INVALID_URI,
    "http://0x100000000/x.jpg": ErrorCode.INVALID_URI,
    "http://shop.123/x.jpg": ErrorCode.INVALID_URI,
    "http://xn--/x.jpg": ErrorCode.INVALID_URI,
    "http://xn--zz-/x.jpg": ErrorCode.INVALID_URI,
    "https://[::1/x.jpg": ErrorCode.INVALID_URI,
    "http://[fe80::1%25eth0]/x.jpg": ErrorCode.FORBIDDEN_ADDRESS,
    "http://exa mple.com/x.jpg": ErrorCode.INVALID_URI,
    "http:///x.jpg": ErrorCode.FORBIDDEN_ADDRESS,
}


@pytest.mark.parametrize(("uri", "expected"), BAD_URLS.items(), ids=list(BAD_URLS))
def test_bad_urls_fail_with_a_code_and_no_dns(uri: str, expected: ErrorCode) -> None:
    outcome = ImageIntake(load_settings()).prepare(uri)
    assert isinstance(outcome, IntakeFailure), outcome
    assert outcome.error.code in {expected, ErrorCode.INVALID_URI, ErrorCode.FORBIDDEN_ADDRESS}, outcome.error
    assert outcome.error.code != ErrorCode.INTERNAL_ERROR


# --- http answers ----------------------------------------------------------------------------
class OddServer(BaseHTTPRequestHandler):
    """/status/N: status N, empty; /body/K: 200 with the K-th tiny body; /redirect?to=X; /ok.png."""

    routes: ClassVar[dict[str, tuple[int, bytes, dict[str, str]]]] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path
        if path.startswith("/redirect?to="):
            self._send(302, b"", {"Location": path.split("to=", 1)[1]})
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"", {})
        elif path.startswith("/body/"):
            self._send(200, TINY_BODIES[int(path.rsplit("/", 1)[1])], {"Content-Type": "image/jpeg"})
        else:
            self._send(200, png_bytes(), {"Content-Type": "image/png"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if status not in {204, 304}:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)


@contextlib.contextmanager
def running_odd_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), OddServer)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def odd_server() -> Iterator[str]:
    with running_odd_server() as address:
        yield address


def bad_http_uris(server: str) -> dict[str, ErrorCode]:
    base = f"http://{server}"
    uris = {f"{base}/body/{i}": ErrorCode.NOT_AN_IMAGE for i in range(len(TINY_BODIES))}
    uris |= {
        f"{base}/status/204": ErrorCode.NOT_AN_IMAGE,
        f"{base}/status/304": ErrorCode.FETCH_FAILED,  # unprompted: we sent no conditional request
        f"{base}/status/206": ErrorCode.FETCH_FAILED,
        f"{base}/status/302": ErrorCode.FETCH_FAILED,  # a redirect without a Location
        f"{base}/status/418": ErrorCode.FETCH_FAILED,
        f"{base}/redirect?to=http://xn--/x.jpg": ErrorCode.INVALID_URI,
        f"{base}/redirect?to=http://256.1.1.1/x.jpg": ErrorCode.INVALID_URI,
        f"{base}/redirect?to=http://[::1/x.jpg": ErrorCode.INVALID_URI,
        f"{base}/redirect?to=gopher://{server}/": ErrorCode.FORBIDDEN_ADDRESS,
    }
    return uris


def test_every_odd_http_answer_is_its_own_failure_with_a_specific_code(odd_server: str) -> None:
    intake = ImageIntake(load_settings(allowed_hosts=[odd_server]))
    for uri, expected in bad_http_uris(odd_server).items():
        assert code_of(intake.prepare(uri)) == expected, uri
    assert isinstance(intake.prepare(f"http://{odd_server}/ok.png"), PreparedImage)


def test_an_unexpected_error_is_internal_error_logged_once_with_the_job(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_decode(data: bytes, policy: Any) -> Any:
        raise KeyError("a bug in a decoder")

    monkeypatch.setattr(images_module, "decode", broken_decode)
    intake = ImageIntake(load_settings(image_roots=[root]))
    jobs = [JobSpec(job_id=7, run_id=1, sku="SKU-7", image_uri="good.png")]
    with caplog.at_level(logging.ERROR, logger="skutag.intake"):
        (outcome,) = intake.prepare_jobs(jobs)
    assert code_of(outcome) == ErrorCode.INTERNAL_ERROR
    assert "KeyError" in outcome.error.message and "Traceback" not in outcome.error.message  # type: ignore[union-attr]
    records = [record for record in caplog.records if record.name == "skutag.intake"]
    assert len(records) == 1
    assert "job 7 sku 'SKU-7'" in records[0].getMessage() and records[0].exc_info is not None


# --- through the worker's handler and local mode ---------------------------------------------
def poisoned_catalog(root: Path, server: str, good: int) -> list[tuple[str, str]]:
    for index in range(good):
        Image.new("RGB", (80 + index, 64), (index * 20 % 256, 90, 140)).save(root / f"good-{index}.png")
    rows = [(f"GOOD-{index}", str(root / f"good-{index}.png")) for index in range(good)]
    bad = list(bad_local_uris(root)) + list(bad_http_uris(server))
    return rows + [(f"BAD-{index:02d}", uri) for index, uri in enumerate(bad)]


def expected_codes(root: Path, server: str) -> dict[str, str]:
    bad = list(bad_local_uris(root).values()) + list(bad_http_uris(server).values())
    return {f"BAD-{index:02d}": code.value for index, code in enumerate(bad)}


def test_one_message_of_poisoned_items_fails_only_them(
    root: Path, odd_server: str, sqlite_engine: sa.Engine, tiny_engine: TaggingEngine, taxonomy: Taxonomy
) -> None:
    from pipeline import ledger

    rows = poisoned_catalog(root, odd_server, good=6)
    with sqlite_engine.begin() as conn:
        ledger.upsert_items(conn, [ledger.CatalogRow(sku=sku, image_uri=uri) for sku, uri in rows])
        run_id = ledger.create_run(conn, "submit", {})
        jobs = ledger.add_jobs(conn, run_id, rows)
        ledger.seal_run(conn, run_id)
    settings = engine_settings(
        Path(str(tiny_engine.settings.model)),
        image_roots=[root],
        allowed_hosts=[odd_server],
        batch_size=64,
        max_attempts=1,
    )
    handler = JobHandler.from_settings(settings, tiny_engine, sqlite_engine)
    try:
        report = handler.handle(jobs, WriterSink(ResultWriter(sqlite_engine, taxonomy)))
    finally:
        handler.close()
    assert report.results == len(rows)
    with sqlite_engine.connect() as conn:
        states = dict(conn.execute(sa.text("SELECT sku, state FROM jobs")).all())
        codes = dict(conn.execute(sa.text("SELECT sku, last_error_code FROM jobs WHERE state = 'failed'")).all())
        attempts = conn.execute(sa.text("SELECT max(attempts) FROM jobs")).scalar_one()
    assert codes == expected_codes(root, odd_server)
    assert all(states[f"GOOD-{index}"] in {"done", "needs_review"} for index in range(6))
    assert attempts == 1


def test_local_mode_finishes_with_the_poisoned_items_failed_and_no_traceback(
    root: Path, odd_server: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    import csv

    rows = poisoned_catalog(root, odd_server, good=4)
    catalog = root / "catalog.csv"  # relative image paths are read from the catalog's folder
    with catalog.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "image_uri"])
        writer.writerows((sku, uri) for sku, uri in rows if "\0" not in uri)  # CSV cannot carry a NUL
    url = f"sqlite:///{tmp_path}/local.db"
    env = {"SKUTAG_ALLOWED_HOSTS": f'["{odd_server}"]', "SKUTAG_WORK_DIR": str(tmp_path / "work")}
    result = CliRunner().invoke(
        main,
        ["--database-url", url, "run", str(catalog), "--model", str(tiny_model_dir), "--quantization", "fp32",
         "--image-root", str(root)],
        env=env,
    )  # fmt: skip
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    engine = make_engine(url)
    with engine.connect() as conn:
        codes = dict(conn.execute(sa.text("SELECT sku, last_error_code FROM jobs WHERE state = 'failed'")).all())
        open_jobs = conn.execute(sa.text("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")).scalar_one()
    engine.dispose()
    expected = {sku: code for sku, code in expected_codes(root, odd_server).items() if sku in dict(rows)}
    # A NUL cannot travel in CSV; an unparsable URI is a bad row at submit, never a job.
    not_jobs = {sku for sku, uri in rows if "\0" in uri or uri.startswith("http://[::1")}
    assert "image_uri is not a valid URI" in result.output
    assert codes == {sku: code for sku, code in expected.items() if sku not in not_jobs}
    assert open_jobs == 0


def test_a_bug_outside_any_item_releases_only_the_claimed_jobs(
    sqlite_engine: sa.Engine, tiny_engine: TaggingEngine, monkeypatch: pytest.MonkeyPatch, taxonomy: Taxonomy
) -> None:
    jobs = make_jobs(sqlite_engine, 3)
    other = make_jobs(sqlite_engine, 2, prefix="OTHER")
    settings = load_settings(image_roots=["/nonexistent"])
    handler = JobHandler.from_settings(settings, tiny_engine, sqlite_engine)

    def broken_cache(*args: Any) -> Any:
        raise ZeroDivisionError("a bug between stages")

    monkeypatch.setattr(handler, "_cache_for", broken_cache)
    try:
        handler.handle(jobs, WriterSink(ResultWriter(sqlite_engine, taxonomy)))
    finally:
        handler.close()
    with sqlite_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT sku, state, last_error_code, published_at FROM jobs ORDER BY id")).all()
    mine = {row[0]: row for row in rows if row[0].startswith("SKU")}
    theirs = {row[0]: row for row in rows if row[0].startswith("OTHER")}
    assert len(mine) == 3 and len(theirs) == len(other) == 2
    for _, state, code, published in mine.values():  # back in the queue at once, with the cause
        assert (state, code, published) == ("queued", "internal_error", None)
    for _, state, code, _ in theirs.values():  # not in this delivery: untouched
        assert (state, code) == ("queued", None)


def test_local_mode_logs_an_unexpected_error_to_its_log_file_not_the_terminal(
    root: Path, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_decode(data: bytes, policy: Any) -> Any:
        raise KeyError("a bug in a decoder")

    monkeypatch.setattr(images_module, "decode", broken_decode)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text(f"sku,image_uri\nSKU-A,{root / 'good.png'}\n")
    work = tmp_path / "work"
    result = CliRunner().invoke(
        main,
        ["--database-url", f"sqlite:///{tmp_path}/l.db", "run", str(catalog), "--model", str(tiny_model_dir),
         "--quantization", "fp32", "--image-root", str(root)],
        env={"SKUTAG_WORK_DIR": str(work)},
    )  # fmt: skip
    assert result.exit_code == 5, result.output
    assert "Traceback" not in result.output and "KeyError" not in result.output
    log_text = (work / "skutag.log").read_text()
    assert log_text.count("Traceback") == 1 and "job 1 sku 'SKU-A'" in log_text


def test_the_readme_lists_every_error_code() -> None:
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("### Error codes", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE))
    assert listed == {code.value for code in ErrorCode}
