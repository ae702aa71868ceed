"""Log lines: JSON objects with run/job/sku context where known, text with the same context."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

import pytest

from pipeline.logs import configure_logging, log_context


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers, root.level = handlers, level
    logging.captureWarnings(False)


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line]


def test_json_lines_carry_the_context_where_known(
    restore_root_logger: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("worker", "json")
    log = logging.getLogger("skutag.worker")
    log.info("no context")
    with log_context(run_id=7):
        log.info("%d jobs", 32)
        log.warning("job failed", extra={"job_id": 11, "sku": "SKU-1"})
        with log_context(job_id=12, sku="SKU-2"):
            log.error("nested")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("with a traceback")
    documents = [json.loads(line) for line in lines(capsys)]  # one object per line, each parses
    assert [d["message"] for d in documents] == ["no context", "32 jobs", "job failed", "nested", "with a traceback"]
    assert {d["service"] for d in documents} == {"worker"} and {d["logger"] for d in documents} == {"skutag.worker"}
    assert "run_id" not in documents[0] and "job_id" not in documents[1]
    assert documents[1]["run_id"] == 7
    assert (documents[2]["run_id"], documents[2]["job_id"], documents[2]["sku"]) == (7, 11, "SKU-1")
    assert (documents[3]["run_id"], documents[3]["job_id"], documents[3]["sku"]) == (7, 12, "SKU-2")
    assert "ValueError: boom" in documents[4]["exception"] and "run_id" not in documents[4]


def test_context_does_not_leak_between_threads(restore_root_logger: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("worker", "json")
    log = logging.getLogger("skutag.worker")
    with log_context(run_id=1):
        thread = threading.Thread(target=lambda: log.info("other thread"))
        thread.start()
        thread.join()
    assert "run_id" not in json.loads(lines(capsys)[0])


def test_text_lines_name_service_logger_and_context(
    restore_root_logger: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("writer", "text")
    with log_context(run_id=3, sku="A"):
        logging.getLogger("skutag.writer").info("wrote %d results", 5)
    (line,) = lines(capsys)
    assert line.endswith("INFO writer skutag.writer: wrote 5 results [run_id=3 sku=A]")


def test_warnings_become_log_lines(restore_root_logger: None, capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    configure_logging("worker", "json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("running as root", RuntimeWarning, stacklevel=1)
    (document,) = [json.loads(line) for line in lines(capsys)]
    assert document["logger"] == "py.warnings" and "running as root" in document["message"]
