"""The review app in a real browser: Debian's Chromium driven through its chromedriver (Selenium),
against uvicorn serving the app over Postgres. Review with the keyboard, bulk-accept in the grid,
then check the database rows, the consumer views and the NOTIFY payloads."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.review.decisions import allowed_values
from pipeline.review.serve import make_review_app
from schemas.taxonomy import Taxonomy
from tests.conftest import REQUIRE_SERVICES
from tests.test_review_app import Catalog, build_catalog

CHROMIUM = os.environ.get("SKUTAG_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SKUTAG_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
# Where the README's screenshot is written when set (docs/ when refreshing it).
SCREENSHOT_DIR = os.environ.get("SKUTAG_SCREENSHOT_DIR")

pytestmark = [pytest.mark.postgres, pytest.mark.browser]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LiveServer:
    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def chrome_paths() -> tuple[str, str]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = f"{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture
def browser(chrome_paths: tuple[str, str]) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome_paths[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=chrome_paths[1]), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


@pytest.fixture
def served(pg_engine: Engine, taxonomy: Taxonomy, tmp_path: Path) -> Iterator[tuple[Catalog, LiveServer]]:
    catalog = build_catalog(pg_engine, taxonomy, tmp_path / "images", count=8)
    settings = catalog.settings.model_copy(update={"notify_channel": "skutag_browser_test"})
    app = make_review_app(settings, pg_engine, reviewer="ana")
    with LiveServer(app) as server:
        yield catalog, server


class Listener:
    def __init__(self, engine: Engine, channel: str) -> None:
        self.connection = engine.raw_connection()
        self.connection.set_isolation_level(0)  # type: ignore[attr-defined]
        self.connection.cursor().execute(f"LISTEN {channel}")

    def payloads(self, wait_s: float = 3.0) -> list[dict[str, Any]]:
        select.select([self.connection], [], [], wait_s)
        self.connection.poll()  # type: ignore[attr-defined]
        notes = [json.loads(n.payload) for n in self.connection.notifies]  # type: ignore[attr-defined]
        self.connection.notifies.clear()  # type: ignore[attr-defined]
        return notes

    def close(self) -> None:
        self.connection.close()


def _wait(condition: Any, timeout_s: float = 20.0, browser: Any = None) -> None:
    """Until condition() holds; a page still loading (element missing or stale) counts as not yet."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except WebDriverException:
            pass
        if time.monotonic() > deadline:
            where = (
                f" (at {browser.current_url}: {browser.find_element('tag name', 'body').text[:500]!r})"
                if browser
                else ""
            )
            raise AssertionError(f"condition not met in time{where}")
        time.sleep(0.05)


def _rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql), params))


def _press(browser: Any, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(browser).send_keys(key).perform()


def test_review_an_item_with_the_keyboard(browser: Any, served: tuple[Catalog, LiveServer], taxonomy: Taxonomy) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    catalog, server = served
    engine = catalog.engine
    listener = Listener(engine, "skutag_browser_test")
    try:
        browser.get(server.url + "/")
        assert browser.find_element(By.ID, "total").text == "8"
        inline_scripts = browser.find_elements(By.XPATH, "//script[not(@src) and not(@type)]")
        assert "&lt;script&gt;" in browser.page_source and inline_scripts == []
        first = catalog.results[1]  # lowest confidence with two open attributes: pattern, then style
        _press(browser, Keys.ENTER)
        _wait(lambda: "/item" in browser.current_url)
        assert browser.find_element(By.ID, "sku").text == catalog.results[0].sku
        if SCREENSHOT_DIR:
            Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(Path(SCREENSHOT_DIR) / "review-app.png"))
        _press(browser, "a")  # results[0]: only pattern is open; accepting it moves to the next item
        _wait(lambda: browser.find_element(By.ID, "sku").text == first.sku)

        # pattern is focused first: pick value 3 of the dress's patterns, then style: not visible
        allowed = allowed_values(taxonomy, "dress", "pattern") or frozenset()
        pattern_values = [v.id for v in taxonomy.attributes["pattern"].values if v.id in allowed]
        _press(browser, "3")
        _wait(lambda: len(_rows(engine, "SELECT id FROM reviews")) == 2)
        _press(browser, "n")
        _wait(lambda: len(_rows(engine, "SELECT id FROM reviews")) == 3)
        _wait(lambda: browser.find_element(By.ID, "sku").text == catalog.results[2].sku, browser=browser)

        log = _rows(engine, "SELECT sku, attribute, action, value, reviewer, image_sha256 FROM reviews ORDER BY id")
        assert [(r.sku, r.attribute, r.action, r.reviewer) for r in log] == [
            (catalog.results[0].sku, "pattern", "accept", "ana"),
            (first.sku, "pattern", "correct" if pattern_values[2] != first.attributes["pattern"].value else "accept",
             "ana"),
            (first.sku, "style", "not_visible", "ana"),
        ]  # fmt: skip
        assert log[1].value == pattern_values[2]
        assert all(r.image_sha256 == catalog.results[i].image_sha256 for r, i in zip(log, (0, 1, 1), strict=True))
        view = {r.attribute: r for r in _rows(engine, "SELECT attribute, value, source FROM sku_tags_current "
                                                      "WHERE sku = :s", s=first.sku)}  # fmt: skip
        assert (view["pattern"].value, view["pattern"].source) == (pattern_values[2], "review")
        assert (view["style"].value, view["style"].source) == ("not_visible", "review")
        (status,) = _rows(engine, "SELECT status FROM sku_tags_json WHERE sku = :s", s=first.sku)
        assert status.status == "tagged"
        notified = [sku for payload in listener.payloads() for sku in payload["skus"]]
        assert notified == [catalog.results[0].sku, first.sku, first.sku]

        # u undoes the last decision (style of `first`): it is back in the queue, back to the model
        _press(browser, "u")
        _wait(lambda: browser.find_element(By.ID, "sku").text == first.sku)
        _wait(lambda: _rows(engine, "SELECT COUNT(*) AS n FROM review_tasks WHERE sku = :s", s=first.sku)[0].n == 1)
        (status,) = _rows(engine, "SELECT status FROM sku_tags_json WHERE sku = :s", s=first.sku)
        assert status.status == "needs_review"
    finally:
        listener.close()


def test_bulk_accept_in_the_grid_is_counted_and_confirmed(browser: Any, served: tuple[Catalog, LiveServer]) -> None:
    from selenium.webdriver.common.by import By

    catalog, server = served
    engine = catalog.engine
    listener = Listener(engine, "skutag_browser_test")
    try:
        browser.get(server.url + "/grid?category=dress")
        dresses = [r.sku for i, r in enumerate(catalog.results) if i % 3]
        assert len(browser.find_elements(By.CSS_SELECTOR, ".card")) == len(dresses)
        button = browser.find_element(By.ID, "accept-all")
        assert button.text == f"Accept all {len(dresses)} items in this filter"
        button.click()
        alert = browser.switch_to.alert
        assert alert.text == f"Accept the model's answers for {len(dresses)} items?"
        alert.dismiss()  # declined: nothing happens
        assert _rows(engine, "SELECT COUNT(*) AS n FROM reviews")[0].n == 0
        browser.find_element(By.ID, "accept-all").click()
        browser.switch_to.alert.accept()
        _wait(lambda: bool(browser.find_elements(By.ID, "message")))
        assert f"accepted the model's answers for {len(dresses)} items" in browser.find_element(By.ID, "message").text
        decided = {r.sku for r in _rows(engine, "SELECT DISTINCT sku FROM reviews WHERE action = 'accept'")}
        assert decided == set(dresses)
        tagged = {r.sku for r in _rows(engine, "SELECT sku FROM sku_tags_json WHERE status = 'tagged'")}
        assert tagged == set(dresses)
        sources = {r.source for r in _rows(engine, "SELECT c.source FROM sku_tags_current c JOIN reviews r "
                                                   "ON r.sku = c.sku AND r.attribute = c.attribute")}  # fmt: skip
        assert sources == {"review"}
        notified = sorted(sku for payload in listener.payloads() for sku in payload["skus"])
        assert notified == sorted(dresses)
        assert browser.find_elements(By.CSS_SELECTOR, ".card") == []
    finally:
        listener.close()
