"""The database error boundary: a URL that names something that is not there is the operator's to
fix (exit 2); a server that cannot be reached is worth waiting for (exit 3)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from pipeline.commands.exits import for_error
from pipeline.db import make_engine, translated_errors
from pipeline.errors import ConfigError, RetryableError, SkutagError
from pipeline.migrate import upgrade
from tests.conftest import POSTGRES_URL
from tests.test_pipeline_e2e import free_port

pytestmark = pytest.mark.postgres


def connect(url: str) -> None:
    engine = make_engine(url)
    try:
        with translated_errors("connecting"), engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()


def wrong(**parts: object) -> str:
    return make_url(POSTGRES_URL).set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "error", "words"),
    [
        (lambda: wrong(database="skutag_no_such_database"), ConfigError, 'database "skutag_no_such_database"'),
        (lambda: wrong(username="skutag_no_such_role"), ConfigError, 'role "skutag_no_such_role"'),
        (lambda: wrong(host="127.0.0.1", port=free_port()), RetryableError, "refused"),
    ],
    ids=["missing-database", "missing-role", "unreachable"],
)
def test_a_missing_database_or_role_is_a_setting_to_fix_and_an_unreachable_server_is_retryable(
    postgres_admin: Engine, url: object, error: type[SkutagError], words: str
) -> None:
    with pytest.raises(SkutagError) as caught:
        connect(url())  # type: ignore[operator]
    assert type(caught.value) is error, caught.value
    assert words in caught.value.message
    assert for_error(caught.value) == (2 if error is ConfigError else 3)
    assert "\n" not in caught.value.message


def test_postgres_scheme_is_accepted(postgres_admin: Engine) -> None:
    connect(POSTGRES_URL.replace("postgresql+psycopg2://", "postgres://", 1))


@pytest.mark.parametrize("revision", ["9999", "", "0001:9999", "head2"])
def test_an_unknown_schema_revision_is_refused_before_anything_is_touched(tmp_path: object, revision: str) -> None:
    with pytest.raises(ConfigError, match=r"^--revision .*: no such schema revision \(known: head, base, 0001"):
        upgrade(f"sqlite:///{tmp_path}/x.db", revision)
