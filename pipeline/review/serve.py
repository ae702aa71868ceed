"""`skutag review serve`: the review app over the configured database, served by uvicorn."""

from __future__ import annotations

import getpass
from collections.abc import Callable

from sqlalchemy.engine import Engine
from starlette.applications import Starlette

from pipeline.review.app import ReviewApp, build_app
from pipeline.review.auth import credentials_for
from pipeline.review.thumbnails import Thumbnails
from pipeline.settings import Settings, taxonomy_for


def default_reviewer() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "reviewer"


def make_review_app(
    settings: Settings,
    engine: Engine,
    host: str = "127.0.0.1",
    reviewer: str | None = None,
    report_html: Callable[[], str] | None = None,
    session_secret: str | None = None,
) -> Starlette:
    """The app for settings and engine; raises ConfigError when host needs credentials it lacks."""
    credentials = credentials_for(
        host, settings.review_token, settings.review_users_file, reviewer or default_reviewer()
    )
    review = ReviewApp(
        engine=engine,
        taxonomy=taxonomy_for(settings),
        credentials=credentials,
        thumbnails=Thumbnails(settings, settings.work_dir / "review-thumbnails"),
        notify_channel=settings.notify_channel,
        report_html=report_html,
    )
    return build_app(review, session_secret)


def serve(settings: Settings, engine: Engine, host: str, port: int, reviewer: str | None,
          report_html: Callable[[], str] | None = None) -> None:  # fmt: skip
    import uvicorn

    app = make_review_app(settings, engine, host, reviewer, report_html)
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False, server_header=False)
