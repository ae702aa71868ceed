"""Every bad setting or flag is one line naming it and exit 2, before any work; a database that
is not there (or a role that may not log in) is 2, one that cannot be reached is 3."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import Engine, make_url

from pipeline.cli import main
from tests.conftest import POSTGRES_URL
from tests.test_pipeline_e2e import free_port


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/skutag.db"
    result = CliRunner().invoke(main, ["--database-url", url, "db", "upgrade"])
    assert result.exit_code == 0, result.output
    return url


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.csv"
    path.write_text("sku,image_uri\nA-1,a.jpg\n")
    return path


def skutag(url: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    result = CliRunner().invoke(main, ["--database-url", url, *args], env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return result.exit_code, lines, result.stdout


BAD_SETTINGS = [
    ("SKUTAG_ATTRIBUTE_THRESHOLDS", "{style: 0.7}"),
    ("SKUTAG_ATTRIBUTE_THRESHOLDS", "style"),
    ("SKUTAG_IMAGE_ROOTS", '["/data/images"'),
    ("SKUTAG_ALLOWED_HOSTS", '["cdn.example.com", 3'),
    ("SKUTAG_STORAGE_OPTIONS", "{s3: {}}"),
    ("SKUTAG_BATCH_SIZE", "0"),
    ("SKUTAG_QUANTIZATION", "int4"),
]


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_it_and_exit_2(database_url: str, name: str, value: str) -> None:
    code, lines, _ = skutag(database_url, "runs", env={name: value})
    assert code == 2, lines
    assert len(lines) == 1 and name in lines[0], lines


@pytest.mark.parametrize("command", [["submit", "{catalog}"], ["run", "{catalog}"]])
def test_a_misspelt_attribute_in_the_thresholds_is_refused_before_any_work(
    database_url: str, catalog: Path, command: list[str]
) -> None:
    args = [part.format(catalog=catalog) for part in command]
    code, lines, _ = skutag(database_url, *args, env={"SKUTAG_ATTRIBUTE_THRESHOLDS": "stlye=0.7"})
    assert code == 2, lines
    assert lines == ["error: SKUTAG_ATTRIBUTE_THRESHOLDS: no attribute 'stlye' in the taxonomy (did you mean 'style'?)"]
    _, _, listed = skutag(database_url, "runs")
    assert listed.count("\n") == 1, "a run was created before the settings were checked"


BAD_FLAGS = [
    (["runs", "--limit", "-1"], "'--limit'"),
    (["status", "1", "--interval", "-1"], "'--interval'"),
    (["status", "1", "--interval", "0"], "'--interval'"),
    (["db", "upgrade", "--revision", "9999"], "--revision '9999'"),
    (["backfill", "--summary", "/nonexistent/x.json"], "'--summary'"),
    (["export", "-o", "/nonexistent/x.csv"], "'--output'"),
    (["run", "--resume", "0"], "'--resume'"),
    (["bench", "intake", "--repeats", "0"], "'--repeats'"),
    (["bench", "backfill", "--sizes", "1e6"], "'--sizes'"),
    (["bench", "backfill", "--sizes", "0,100"], "'--sizes'"),
    (["runs", "cancel", "999"], "no run 999"),
    (["runs", "seal", "999"], "no run 999"),
    (["status", "999", "--once"], "there is no run 999"),
]


@pytest.mark.parametrize(
    ("args", "named"), BAD_FLAGS, ids=lambda value: " ".join(value) if isinstance(value, list) else ""
)
def test_a_bad_flag_is_one_line_naming_it_and_exit_2(database_url: str, args: list[str], named: str) -> None:
    code, lines, _ = skutag(database_url, *args)
    assert code == 2, lines
    assert len(lines) == 1 and named in lines[0], lines
    assert "Traceback" not in lines[0]


# A setting given by a flag is reported under the flag the user typed, not its SKUTAG_ variable.
BAD_SETTING_FLAGS = [
    (["backfill", "--max-outstanding", "0"], "--max-outstanding: Input should be greater than or equal to 1"),
    (["worker", "--engine-batch-size", "0"], "--engine-batch-size"),
]


@pytest.mark.parametrize(("args", "named"), BAD_SETTING_FLAGS, ids=["max-outstanding", "engine-batch-size"])
def test_a_bad_setting_flag_names_the_flag_not_the_variable(database_url: str, args: list[str], named: str) -> None:
    code, lines, _ = skutag(database_url, *args)
    assert code == 2, lines
    assert len(lines) == 1 and named in lines[0] and "SKUTAG_" not in lines[0], lines


def test_a_bad_database_url_flag_is_named_and_its_value_not_echoed() -> None:
    code, lines, _ = skutag("nosuch://admin:s3cret@db/x", "runs")
    assert (code, len(lines)) == (2, 1), lines
    assert "--database-url: " in lines[0] and "only postgresql and sqlite" in lines[0], lines
    assert "s3cret" not in lines[0] and "SKUTAG_" not in lines[0]


def test_the_backfill_summary_is_checked_before_the_backfill_runs(database_url: str, catalog: Path) -> None:
    # --summary first: click checks flags in command-line order, and a --catalog it had opened
    # already would be left to the garbage collector (a ResourceWarning here, harmless in a CLI).
    code, _, _ = skutag(database_url, "backfill", "--summary", "/nonexistent/x.json", "--catalog", str(catalog))
    assert code == 2
    _, _, listed = skutag(database_url, "runs")
    assert listed.count("\n") == 1, "the backfill ran before its summary path was checked"


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("parts", "code"),
    [({"database": "skutag_no_such_database"}, 2), ({"username": "skutag_no_such_role"}, 2), ({"port": 0}, 3)],
    ids=["missing-database", "missing-role", "unreachable"],
)
def test_a_missing_database_is_2_and_an_unreachable_one_is_3(
    postgres_admin: Engine, parts: dict[str, object], code: int
) -> None:
    if parts.get("port") == 0:
        parts = {"host": "127.0.0.1", "port": free_port()}
    url = make_url(POSTGRES_URL).set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]
    exit_code, lines, _ = skutag(url, "runs")
    assert exit_code == code, lines
    assert len(lines) == 1, lines


@pytest.mark.postgres
def test_postgres_urls_are_accepted(postgres_admin: Engine, migrated_postgres_url: str) -> None:
    url = migrated_postgres_url.replace("postgresql+psycopg2://", "postgres://", 1)
    code, lines, _ = skutag(url, "runs")
    assert code == 0, lines


def test_runs_seal_and_cancel_end_a_run_left_open(database_url: str) -> None:
    from pipeline import ledger
    from pipeline.db import make_engine

    engine = make_engine(database_url)
    with engine.begin() as conn:
        ledger.upsert_items(conn, [ledger.CatalogRow(sku=f"O-{i}", image_uri=f"{i}.jpg") for i in range(3)])
        run_id = ledger.create_run(conn, "submit", {})
        ledger.add_jobs(conn, run_id, [(f"O-{i}", f"{i}.jpg") for i in range(3)])  # never sealed
    engine.dispose()
    code, _, out = skutag(database_url, "runs", "seal", str(run_id))
    assert (code, out.strip()) == (0, f"run {run_id} sealed: it ends with the last of its 3 open jobs")
    code, _, out = skutag(database_url, "runs", "seal", str(run_id))
    assert (code, out.strip()) == (0, f"run {run_id} was sealed already; 3 jobs still open")
    code, _, out = skutag(database_url, "runs", "cancel", str(run_id))
    assert (code, out.strip()) == (0, f"run {run_id} cancelled: 3 open jobs failed as cancelled")
    code, lines, _ = skutag(database_url, "runs", "cancel", str(run_id))
    assert (code, lines) == (2, [f"error: run {run_id} has already ended (cancelled)"])
