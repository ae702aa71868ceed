"""No password in any output: every failing command that quotes a database, broker or image URL
prints it masked, and log records are masked too, whoever built them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.logs import LogFormat, configure_logging
from pipeline.migrate import upgrade
from pipeline.secrets import mask_secrets

SECRET = "s3cret-pw"
BROKER = f"redis://:{SECRET}@127.0.0.1:1/0"  # nothing listens on port 1: refused at once
DATABASE = f"postgresql+psycopg2://skutag:{SECRET}@127.0.0.1:1/none"


@pytest.mark.parametrize(
    "url",
    [BROKER, DATABASE, f"amqp://guest:{SECRET}@rabbit:5672//", f"https://user:{SECRET}@cdn.example/a.jpg"],
)
def test_mask_secrets_hides_the_password_and_keeps_the_rest(url: str) -> None:
    masked = mask_secrets(f"could not reach {url}: refused")
    assert SECRET not in masked and "***@" in masked and masked.startswith("could not reach ")


def test_urls_without_a_password_are_left_alone() -> None:
    text = "redis://127.0.0.1:6379/0 and https://cdn.example/a@2x.jpg and user@example.com"
    assert mask_secrets(text) == text


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/secrets.db"
    upgrade(url)
    return url


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.csv"
    path.write_text(f"sku,image_uri\nA-1,a.jpg\n,https://user:{SECRET}@cdn.example/b.jpg\n")
    return path


def _commands(sqlite_url: str, catalog: Path) -> list[tuple[list[str], dict[str, str], int]]:
    """(arguments, environment, expected exit code) of commands that fail quoting a URL."""
    broker_down = {"SKUTAG_BROKER_URL": BROKER, "SKUTAG_DATABASE_URL": sqlite_url}
    return [
        (["submit", str(catalog)], broker_down, 3),
        (["backfill", "--catalog", str(catalog)], broker_down, 3),
        (["reconcile"], broker_down, 3),
        (["--database-url", DATABASE, "status", "1"], {}, 3),
        (["--database-url", DATABASE, "db", "upgrade"], {}, 3),
        (["runs"], {"SKUTAG_DATABASE_URL": DATABASE}, 3),
        (["runs"], {"SKUTAG_DATABASE_URL": f"mysql://skutag:{SECRET}@db/x"}, 2),
        (["runs"], {"SKUTAG_DATABASE_URL": f"postgresql+nodriver://skutag:{SECRET}@db/x"}, 2),
        (["runs"], {"SKUTAG_BROKER_URL": BROKER, "SKUTAG_BATCH_SIZE": "0"}, 2),
    ]


def test_no_password_in_the_output_of_failing_commands(sqlite_url: str, catalog: Path) -> None:
    for args, env, expected in _commands(sqlite_url, catalog):
        result = CliRunner().invoke(main, args, env=env)
        output = result.output + (str(result.exception) if result.exception and result.exit_code == 1 else "")
        assert result.exit_code == expected, (args, output)
        assert SECRET not in output, (args, output)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_log_lines_are_masked_whoever_wrote_them(log_format: LogFormat, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("worker", log_format)
        logger = logging.getLogger("some.library")
        logger.warning("cannot connect to %s, retrying", BROKER)
        try:
            raise ConnectionError(f"refused: {DATABASE}")
        except ConnectionError:
            logger.exception("giving up")
    finally:
        root.handlers, root.level = saved[0], saved[1]
    err = capsys.readouterr().err
    assert "redis://:***@127.0.0.1:1/0" in err and "giving up" in err and "ConnectionError" in err
    assert SECRET not in err
