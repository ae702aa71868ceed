"""The review web app: server-rendered pages (Starlette + Jinja2, autoescaped), a little plain JS
for the keys, served by uvicorn. Pages: the queue (filters, counts, keyset pages), one item (image
beside every attribute), a grid with bulk accept, the evaluation report. See pipeline/review/auth.py
for who may use it and how POSTs are protected.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.review import bulk, presentation, queue
from pipeline.review.auth import Credentials, csrf_ok, new_csrf_token
from pipeline.review.decisions import Decision, DecisionRecorder
from pipeline.review.thumbnails import Thumbnails
from pipeline.writer import notify_payloads
from schemas.taxonomy import CATEGORY, Taxonomy

BULK_LIMIT = 50_000
COUNTS_TTL_S = 5.0  # counts are a GROUP BY over the whole queue: shared between page views briefly
SLOW_COUNTS_S = 0.1

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer a form POST carries "Origin: null" and is refused.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class ReviewApp:
    engine: Engine
    taxonomy: Taxonomy
    credentials: Credentials
    thumbnails: Thumbnails
    notify_channel: str | None = None
    report_html: Callable[[], str] | None = None

    def __post_init__(self) -> None:
        package = resources.files("pipeline.review")
        self.templates = Environment(
            loader=FileSystemLoader(str(package.joinpath("templates"))),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.recorder = DecisionRecorder(self.engine, self.taxonomy, self.notify_channel)
        self._counts: dict[Any, tuple[float, float, queue.QueueCounts]] = {}  # taken at, took, counts
        self._refreshing: set[queue.QueueFilter] = set()
        self._lock = threading.Lock()
        self.static_dir = Path(str(package.joinpath("static")))

    # --- plumbing ---
    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        body = self.templates.get_template(template).render(
            reviewer=self.reviewer(request), csrf=self.csrf(request), **context
        )
        return HTMLResponse(body, status_code=status, headers=_SECURITY_HEADERS)

    def reviewer(self, request: Request) -> str | None:
        if self.credentials.local_reviewer is not None:
            return self.credentials.local_reviewer
        name = request.session.get("reviewer")
        return str(name) if name else None

    def csrf(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = new_csrf_token()
            request.session["csrf"] = token
        return str(token)

    async def checked_form(self, request: Request) -> dict[str, Any] | Response:
        """The POST's form (or JSON) after the CSRF and Origin checks; a 403 response if they fail."""
        if request.headers.get("content-type", "").startswith("application/json"):
            data: dict[str, Any] = await request.json()
        else:
            form = await request.form()
            data = {key: (form.getlist(key) if key == "sku" else form.get(key)) for key in form}
        given = request.headers.get("x-csrf-token") or data.get("csrf")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            return JSONResponse({"ok": False, "code": "bad_origin", "message": "cross-site request refused"}, 403)
        if not csrf_ok(request.session.get("csrf"), given):
            return JSONResponse(
                {"ok": False, "code": "csrf", "message": "missing or stale form token: reload the page"}, 403
            )
        return data

    def counts(self, flt: queue.QueueFilter) -> queue.QueueCounts:
        """Counts for flt. Fresh ones when they are cheap; on a large queue (over SLOW_COUNTS_S to
        count) a page gets the last counts and a background thread refreshes them, so counting
        never holds a page up."""
        cached = self._counts.get(flt)
        if cached is None:
            return self._count_now(flt)
        taken_at, took_s, counts = cached
        if time.monotonic() - taken_at < COUNTS_TTL_S:
            return counts
        if took_s < SLOW_COUNTS_S:
            return self._count_now(flt)
        with self._lock:
            if flt in self._refreshing:
                return counts
            self._refreshing.add(flt)
        threading.Thread(target=self._count_now, args=(flt,), daemon=True).start()
        return counts

    def _count_now(self, flt: queue.QueueFilter) -> queue.QueueCounts:
        started = time.monotonic()
        try:
            with self.engine.connect() as conn:
                counts = queue.count(conn, flt)
            self._counts[flt] = (time.monotonic(), time.monotonic() - started, counts)
            return counts
        finally:
            with self._lock:
                self._refreshing.discard(flt)

    def forget_counts(self) -> None:
        """After a decision: the counts are out of date (refreshed as counts() decides)."""
        for flt, (_, took_s, counts) in list(self._counts.items()):
            self._counts[flt] = (0.0, took_s, counts)

    def notify(self, skus: list[str]) -> None:
        if not self.notify_channel or not skus or self.engine.dialect.name != "postgresql":
            return
        import sqlalchemy as sa

        with self.engine.begin() as conn:
            for payload in notify_payloads(skus):
                conn.execute(sa.select(sa.func.pg_notify(self.notify_channel, payload)))

    def label(self, attribute: str, value: str | None, language: str = "en") -> str:
        return presentation.label(self.taxonomy, attribute, value, language)


class Pages:
    """The request handlers, over one ReviewApp."""

    def __init__(self, review: ReviewApp) -> None:
        self.review = review

    async def login_page(self, request: Request) -> Response:
        review = self.review
        if request.method == "GET":
            return review.render(request, "login.html", error=None, next=request.query_params.get("next", "/"))
        data = await review.checked_form(request)
        if isinstance(data, Response):
            return data
        name, secret = str(data.get("name") or ""), str(data.get("secret") or "")
        if not review.credentials.required or not review.credentials.check(name, secret):
            return review.render(request, "login.html", status=401, error="unknown name or wrong password/token",
                                 next="/")  # fmt: skip
        request.session.clear()
        request.session["reviewer"] = name
        request.session["csrf"] = new_csrf_token()
        target = str(data.get("next") or "/")
        return RedirectResponse(target if target.startswith("/") and not target.startswith("//") else "/", 303)

    async def logout(self, request: Request) -> Response:
        review = self.review
        data = await review.checked_form(request)
        if isinstance(data, Response):
            return data
        request.session.clear()
        return RedirectResponse("/login", 303)

    def queue_page(self, request: Request) -> Response:
        review = self.review
        flt = presentation.parse_filter(request.query_params)
        after = queue.Cursor.decode(request.query_params.get("after"))
        with review.engine.connect() as conn:
            page = queue.list_page(conn, flt, after)
        counts = review.counts(flt)
        params = flt.as_params()
        next_link = f"/?{urlencode({**params, 'after': page.next_cursor.encode()})}" if page.next_cursor else None
        return review.render(
            request, "queue.html", page=page, counts=counts, flt=flt, params=params, next_link=next_link,
            query=urlencode(params), attributes=[*sorted(review.taxonomy.attributes), CATEGORY],
            categories=sorted(review.taxonomy.categories), now=datetime.now(UTC), app=review,
            done=request.query_params.get("done") == "1",
        )  # fmt: skip

    def next_item(self, request: Request) -> Response:
        review = self.review
        flt = presentation.parse_filter(request.query_params)
        after = queue.Cursor.decode(request.query_params.get("after"))
        reviewer = review.reviewer(request) or ""
        with review.engine.begin() as conn:
            sku = queue.claim_next(conn, flt, reviewer, datetime.now(UTC), after)
        if sku is None:
            return RedirectResponse(f"/?{urlencode({**flt.as_params(), 'done': '1'})}", 303)
        return RedirectResponse(f"/item?{urlencode({**flt.as_params(), 'sku': sku})}", 303)

    def item_page(self, request: Request) -> Response:
        review = self.review
        sku = request.query_params.get("sku", "")
        flt = presentation.parse_filter(request.query_params)
        reviewer = review.reviewer(request) or ""
        with review.engine.begin() as conn:
            item = queue.load_item(conn, sku)
            held_by = queue.claim(conn, sku, reviewer, datetime.now(UTC)) if item and item.open_attributes else None
        if item is None:
            return review.render(request, "message.html", status=404, title="Not found",
                                 message=f"No current tags for sku {sku!r}.")  # fmt: skip
        rows = presentation.attribute_rows(review.taxonomy, item)
        cursor = None
        if item.open_attributes:
            low = min(a.confidence for a in item.attributes if a.task_reason is not None)
            cursor = queue.Cursor(low, item.sku).encode()
        data = {
            "sku": item.sku, "job_id": item.job_id, "attributes": rows, "held_by": held_by,
            "next": f"/next?{urlencode({**flt.as_params(), **({'after': cursor} if cursor else {})})}",
        }  # fmt: skip
        return review.render(request, "item.html", item=item, rows=rows, data=data, held_by=held_by,
                             query=urlencode(flt.as_params()))  # fmt: skip

    async def decide(self, request: Request) -> Response:
        review = self.review
        data = await review.checked_form(request)
        if isinstance(data, Response):
            return data
        reviewer = review.reviewer(request) or ""
        sku, attribute = str(data.get("sku") or ""), str(data.get("attribute") or "")
        if isinstance(data.get("sku"), list):
            sku = str(data["sku"][0]) if data["sku"] else ""
        action = str(data.get("action") or "")
        if action not in ("accept", "correct", "not_visible"):
            return JSONResponse({"ok": False, "code": "bad_request", "message": f"unknown action {action!r}"}, 400)
        try:
            job_id = int(str(data.get("job_id")))
        except ValueError:
            return JSONResponse({"ok": False, "code": "bad_request", "message": "job_id must be a number"}, 400)
        with review.engine.connect() as conn:
            other = queue.holder(conn, sku, reviewer, datetime.now(UTC))
        if other is not None:
            message = f"{other} is reviewing {sku} right now; your decision was not recorded"
            return JSONResponse({"ok": False, "code": "claimed", "message": message}, 409)
        value = data.get("value")
        decision = Decision(sku, attribute, action, job_id, value=str(value) if value else None)  # type: ignore[arg-type]
        report = review.recorder.record([decision], reviewer)
        review.forget_counts()
        if report.refused:
            refusal = report.refused[0]
            status = 409 if refusal.code == "tags_changed" else 422
            return JSONResponse({"ok": False, "code": refusal.code, "message": refusal.message}, status)
        with review.engine.connect() as conn:
            item = queue.load_item(conn, sku)
        rows = presentation.attribute_rows(review.taxonomy, item) if item else []
        return JSONResponse({"ok": True, "review_id": report.review_ids[0], "attributes": rows})

    async def undo(self, request: Request) -> Response:
        review = self.review
        data = await review.checked_form(request)
        if isinstance(data, Response):
            return data
        reviewer = review.reviewer(request) or ""
        with review.engine.connect() as conn:
            last = queue.last_decision_of(conn, reviewer)
        report = review.recorder.undo_last(reviewer)
        review.forget_counts()
        if report.refused:
            return JSONResponse({"ok": False, "code": report.refused[0].code, "message": report.refused[0].message})
        return JSONResponse({"ok": True, "sku": last.sku if last is not None else None})

    def grid_page(self, request: Request) -> Response:
        review = self.review
        flt = presentation.parse_filter(request.query_params)
        after = queue.Cursor.decode(request.query_params.get("after"))
        with review.engine.connect() as conn:
            page = queue.list_page(conn, flt, after, limit=48)
            cards = [queue.load_item(conn, row.sku) for row in page.rows]
        counts = review.counts(flt)
        params = flt.as_params()
        next_link = f"/grid?{urlencode({**params, 'after': page.next_cursor.encode()})}" if page.next_cursor else None
        return review.render(
            request, "grid.html", cards=[c for c in cards if c is not None], counts=counts, params=params,
            query=urlencode(params), next_link=next_link, app=review, flt=flt,
            message=request.query_params.get("message"),
        )  # fmt: skip

    async def bulk_accept(self, request: Request) -> Response:
        review = self.review
        data = await review.checked_form(request)
        if isinstance(data, Response):
            return data
        reviewer = review.reviewer(request) or ""
        flt = presentation.parse_filter(data)
        now = datetime.now(UTC)
        try:
            expected = int(str(data.get("expected")))
        except ValueError:
            return JSONResponse({"ok": False, "code": "bad_request", "message": "expected must be a number"}, 400)
        with review.engine.connect() as conn:
            if data.get("scope") == "page":
                wanted = [str(s) for s in (data.get("sku") or [])]
            else:
                wanted = queue.matching_skus(conn, flt, BULK_LIMIT + 1)
            if len(wanted) != expected or len(wanted) > BULK_LIMIT:
                message = (
                    f"the selection now holds {len(wanted)} items, not the {expected} you confirmed; nothing was "
                    "accepted: check the count and confirm again"
                )
                return _back_to_grid(flt, message)
        decided, held = bulk.accept_in_chunks(review.engine, wanted, reviewer, now)
        review.notify(decided)
        review.forget_counts()
        note = f"; {held} held by other reviewers were left to them" if held else ""
        return _back_to_grid(flt, f"accepted the model's answers for {len(decided)} items{note}")

    def image(self, request: Request) -> Response:
        review = self.review
        sku = request.query_params.get("sku", "")
        with review.engine.connect() as conn:
            known = queue.image_of(conn, sku)
        if known is None:
            return Response("no image for this sku", 404, media_type="text/plain", headers=_SECURITY_HEADERS)
        thumb = review.thumbnails.get(*known)
        if thumb.jpeg is None:
            text = f"image unavailable: {thumb.error_code}"
            return Response(text, 502, media_type="text/plain", headers=_SECURITY_HEADERS)
        headers = {**_SECURITY_HEADERS, "Cache-Control": "private, max-age=300"}
        if thumb.sha256 != known[1]:
            headers["X-Image-Changed"] = "1"  # the image at the uri is not the one the tags were made from
        return Response(thumb.jpeg, media_type="image/jpeg", headers=headers)

    def report(self, request: Request) -> Response:
        review = self.review
        if review.report_html is None:
            return review.render(request, "message.html", title="Report", message="No evaluation configured.")
        return HTMLResponse(review.report_html(), headers=_SECURITY_HEADERS | {"Content-Security-Policy":
                            "default-src 'none'; img-src data:; style-src 'unsafe-inline'"})  # fmt: skip


def login_required(review: ReviewApp, handler: Callable[..., Any]) -> Callable[..., Any]:
    """handler, or a redirect to the login page when nobody is logged in."""

    async def wrapped(request: Request) -> Response:
        if review.reviewer(request) is None:
            return RedirectResponse(f"/login?{urlencode({'next': request.url.path})}", 303)
        result = handler(request)
        if hasattr(result, "__await__"):
            result = await result
        return result  # type: ignore[no-any-return]

    return wrapped


def build_app(review: ReviewApp, session_secret: str | None = None) -> Starlette:
    """The Starlette application around review (a ReviewApp)."""
    pages = Pages(review)

    def guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
        return login_required(review, handler)

    routes = [
        Route("/login", pages.login_page, methods=["GET", "POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/", guarded(pages.queue_page)),
        Route("/next", guarded(pages.next_item)),
        Route("/item", guarded(pages.item_page)),
        Route("/decide", guarded(pages.decide), methods=["POST"]),
        Route("/undo", guarded(pages.undo), methods=["POST"]),
        Route("/grid", guarded(pages.grid_page)),
        Route("/bulk-accept", guarded(pages.bulk_accept), methods=["POST"]),
        Route("/image", guarded(pages.image)),
        Route("/report", guarded(pages.report)),
        Mount("/static", StaticFiles(directory=str(review.static_dir)), name="static"),
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=session_secret or secrets.token_urlsafe(32),
            session_cookie="skutag_review",
            same_site="strict",
            https_only=False,
            max_age=12 * 3600,
        )
    ]
    return Starlette(routes=routes, middleware=middleware)


def _back_to_grid(flt: queue.QueueFilter, message: str) -> Response:
    return RedirectResponse(f"/grid?{urlencode({**flt.as_params(), 'message': message})}", 303)
