"""The review page's HTTP edge: ``/review`` pages (queue, duplicates, why-this-tag, health) and their form posts.

Pages are server-rendered Jinja templates; ``static/review.js`` adds keyboard shortcuts and posts decisions with
``fetch`` (the forms work without it). None of these routes is in the OpenAPI document: they are for people.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from tagger.db import review_repository as review_repo
from tagger.retag import ApplyInProgress
from tagger.db.engine import get_engine
from tagger.review import (
    BANDS,
    CATEGORY_ATTRIBUTE,
    PAGE_SIZE,
    SHOW,
    InvalidRequest,
    NotSignedIn,
    QueueFilter,
    ReviewError,
    TagRow,
    agreement_series,
    attribute_with_label,
    attribute_health,
    duplicate_groups,
    item_state,
    parse_filter,
    proposal,
)
from tagger.settings import Settings, env_name
from tagger.taxonomy.loader import load_taxonomies
from tagger.taxonomy.model import Attribute, TaxonomySet
from tagger.web.review import charts
from tagger.web.review.access import LOGIN_COOKIE, SESSION_COOKIE, SESSION_TTL_S, Access, Session
from tagger.web.review.heatmap import explain_tag, load_product_image, thumbnail_jpeg
from tagger.web.review.retagger import ExemplarRetagger

log = logging.getLogger("tagger.web.review")

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
PREFIX = "/review"
MAX_FORM_BYTES = 64 * 1024
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",  # keyboard approvals must not be clickjacked
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class _Taxonomies:
    """The taxonomy set, re-read when a file in the folder changes (as the workers do)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp: tuple[tuple[str, float], ...] | None = None
        self._set: TaxonomySet | None = None
        self._lock = threading.Lock()

    def __call__(self) -> TaxonomySet:
        stamp = (tuple(sorted((p.name, p.stat().st_mtime) for p in self.directory.glob("*.y*ml")))
                 if self.directory.is_dir() else ())
        with self._lock:
            if self._set is None or stamp != self._stamp:
                self._set = load_taxonomies(self.directory)
                self._stamp = stamp
            return self._set


def _secured(response: Response, *, cache: bool = False) -> Response:
    response.headers.update(SECURITY_HEADERS)
    if not cache:
        response.headers["Cache-Control"] = "no-store"
    return response


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def safe_next(value: str | None) -> str:
    """A return address inside the review page (never another site: no open redirect)."""
    if value and value.startswith(PREFIX) and not value.startswith("//") and "\\" not in value \
            and urllib.parse.urlsplit(value).netloc == "":
        return value
    return PREFIX + "/queue"


def label_name(spec: Attribute | None, key: str) -> str:
    if spec is None:
        return key
    try:
        return spec.label(key).name
    except KeyError:
        return key


def item_view(spec: Attribute | None, attribute: str, rows: list[TagRow], matched: bool) -> dict[str, Any]:
    """What the template shows for one product's one attribute."""
    top = proposal(rows)
    decided_values = {r.value for r in rows if r.status in ("approved", "rejected")}
    approved = [r for r in rows if r.status == "approved"]
    alternatives = [r for r in rows if r.value != (top.value if top else None) and r.status not in ("approved", "rejected")]
    labels = [(lab.key, lab.name) for lab in spec.scored_labels] if spec else []
    return {
        "attribute": attribute, "name": (spec.display_name if spec and spec.display_name else attribute),
        "rows": [{"row": r, "name": label_name(spec, r.value), "percent": round(r.score * 100)} for r in rows],
        "state": item_state(rows), "top": top, "top_name": label_name(spec, top.value) if top else None,
        "approved": approved, "alternatives": [(r.value, label_name(spec, r.value), round(r.score * 100))
                                               for r in alternatives][:9],
        "labels": labels, "matched": matched, "known": spec is not None, "decided_values": decided_values,
    }


def card_view(card: review_repo.ProductCard, taxonomies: TaxonomySet) -> dict[str, Any]:
    order = {a.name: i for i, a in enumerate(taxonomies.attributes)}
    items = []
    for attribute in sorted(card.tags, key=lambda a: (order.get(a, len(order)), a)):
        try:
            spec: Attribute | None = taxonomies.attribute(attribute)
        except KeyError:
            spec = None
        items.append(item_view(spec, attribute, card.tags[attribute], attribute in card.matched))
    # Attributes the filter selects first, so the keyboard walks through them in order.
    items.sort(key=lambda i: not i["matched"])
    return {"sku": card.sku, "title": card.title, "brand": card.brand, "entries": items,
            "has_image": bool(card.image_ref)}


def build_router(settings: Settings, *, engine_factory: Callable[[], Engine] | None = None) -> APIRouter:
    if not settings.database_url:
        raise ValueError("the review page needs resolved settings (database_url set)")
    database_url = str(settings.database_url)
    engine = engine_factory or (lambda: get_engine(database_url))
    access = Access(settings.review_token, read_only=settings.review_read_only)
    taxonomies = _Taxonomies(settings.taxonomy_dir)
    templates = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), autoescape=True,
                                   undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    templates.globals.update(prefix=PREFIX, bands=BANDS, shows=list(SHOW), env_name=env_name)
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    router.retagger = retagger = _exemplar_retagger(settings, engine)  # type: ignore[attr-defined]

    # ---- plumbing --------------------------------------------------------------------------------------

    def reachable(request: Request) -> None:
        forwarded = any(h in request.headers for h in ("x-forwarded-for", "forwarded", "x-real-ip"))
        access.check_reachable(request.client.host if request.client else None, request.headers.get("host"),
                               forwarded)

    def signed_in(request: Request) -> Session:
        reachable(request)
        return access.require_session(request.cookies.get(SESSION_COOKIE))

    def render(name: str, request: Request, session: Session | None, status: int = 200, **context: Any) -> Response:
        body = templates.get_template(name).render(
            who=session.who if session else None, csrf=access.csrf_token(session) if session else "",
            read_only=access.read_only, token_configured=access.token is not None, path=request.url.path,
            **context)
        return _secured(HTMLResponse(body, status_code=status))

    def failure(request: Request, exc: ReviewError, session: Session | None = None) -> Response:
        # Images and fetch calls get a status and a JSON reason; pages get a page (or the sign-in form).
        machine_readable = (_wants_json(request) or request.url.path.endswith(".png")
                            or request.url.path.startswith(PREFIX + "/image/"))
        if isinstance(exc, NotSignedIn) and request.method == "GET" and not machine_readable:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return _secured(RedirectResponse(f"{PREFIX}/login?next={urllib.parse.quote(target)}", status_code=303))
        if machine_readable:
            return _secured(JSONResponse({"detail": str(exc)}, status_code=exc.status))
        return render("error.html", request, session, status=exc.status, message=str(exc), status_code=exc.status)

    async def form(request: Request) -> dict[str, str]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise InvalidRequest("send the form as application/x-www-form-urlencoded")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise InvalidRequest(f"the form is over {MAX_FORM_BYTES} bytes")
        try:
            pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequest(f"the form could not be read: {exc}") from None
        return dict(pairs)

    async def posted(request: Request) -> tuple[Session, dict[str, str]]:
        """Session, CSRF and read-only checks of a decision post, in that order."""
        session = signed_in(request)
        fields = await form(request)
        access.check_csrf(session, request.headers.get("x-csrf-token") or fields.get("csrf"))
        access.check_writable()
        return session, fields

    # ---- sign-in ---------------------------------------------------------------------------------------

    @router.get("", response_class=HTMLResponse)
    def index(request: Request) -> Response:
        return _secured(RedirectResponse(PREFIX + "/queue", status_code=303))

    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str | None = None) -> Response:
        try:
            reachable(request)
        except ReviewError as exc:
            return failure(request, exc)
        nonce = access.login_nonce()
        response = render("login.html", request, None, nonce=nonce, next=safe_next(next), error=None)
        response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path=PREFIX + "/login")
        return response

    @router.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        try:
            reachable(request)
            fields = await form(request)
            access.check_login_nonce(request.cookies.get(LOGIN_COOKIE), fields.get("nonce"))
            who = review_repo.reviewer_name(fields.get("who"))
            if not access.token_matches(fields.get("token")):
                log.warning("review sign-in with a wrong token from %s", request.client.host if request.client else "?")
                nonce = access.login_nonce()
                response = render("login.html", request, None, status=401, nonce=nonce,
                                  next=safe_next(fields.get("next")),
                                  error=f"That token is not the one configured ({env_name('review_token')}).")
                response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="strict",
                                    secure=request.url.scheme == "https", path=PREFIX + "/login")
                return response
        except ReviewError as exc:
            return failure(request, exc)
        response = RedirectResponse(safe_next(fields.get("next")), status_code=303)
        response.set_cookie(SESSION_COOKIE, access.issue(who), max_age=SESSION_TTL_S, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https", path=PREFIX)
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX + "/login")
        return _secured(response)

    @router.post("/logout", response_class=HTMLResponse)
    async def logout(request: Request) -> Response:
        try:
            session = signed_in(request)
            fields = await form(request)
            access.check_csrf(session, fields.get("csrf"))
        except ReviewError as exc:
            return failure(request, exc)
        response = RedirectResponse(PREFIX + "/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return _secured(response)

    # ---- the queue -------------------------------------------------------------------------------------

    def filter_choices(tax: TaxonomySet, f: QueueFilter) -> dict[str, Any]:
        with engine().connect() as conn:
            versions = review_repo.taxonomy_versions_in_use(conn)
        try:
            categories = [(lab.key, lab.name, tax.attribute(CATEGORY_ATTRIBUTE).path(lab.key))
                          for lab in tax.attribute(CATEGORY_ATTRIBUTE).labels]
        except KeyError:
            categories = []
        labels = [(lab.key, lab.name) for lab in tax.attribute(f.attribute).labels] if f.attribute else []
        return {"attributes": [(a.name, a.display_name or a.name) for a in tax.attributes], "labels": labels,
                "categories": categories, "versions": versions}

    @router.get("/queue", response_class=HTMLResponse)
    def queue(request: Request) -> Response:
        session = None
        try:
            session = signed_in(request)
            tax = taxonomies()
            f = parse_filter(dict(request.query_params), tax)
            with engine().connect() as conn:
                page = review_repo.queue_page(conn, f, PAGE_SIZE)
        except ReviewError as exc:
            return failure(request, exc, session)
        pages = max(1, -(-page.products // PAGE_SIZE))
        return render("queue.html", request, session, f=f, page=page, pages=pages,
                      cards=[card_view(c, tax) for c in page.cards], choices=filter_choices(tax, f),
                      next_url=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
                      prev_query=urllib.parse.urlencode(f.query(page=f.page - 1)),
                      next_query=urllib.parse.urlencode(f.query(page=f.page + 1)))

    @router.post("/decide", response_class=HTMLResponse)
    async def decide(request: Request) -> Response:
        session = None
        try:
            session, fields = await posted(request)
            sku, attribute = fields.get("sku") or "", fields.get("attribute") or ""
            if not sku or not attribute:
                raise InvalidRequest("a decision names the product (sku) and the attribute")
            action, value = fields.get("action") or "", (fields.get("value") or None)
            tax = taxonomies()

            def work() -> tuple[review_repo.DecisionOutcome, review_repo.ProductCard]:
                with engine().begin() as conn:
                    outcome = review_repo.record_decision(conn, tax, sku=sku, attribute=attribute, action=action,
                                                          value=value, who=session.who)
                    return outcome, review_repo.product_card(conn, sku)

            outcome, card = await run_in_threadpool(work)
        except ReviewError as exc:
            return failure(request, exc, session)
        if outcome.plan.changes_anything:
            retagger.request([attribute])
        log.info("review: %s %s %s %s=%s", session.who, outcome.plan.action, sku, attribute, outcome.plan.chosen)
        if _wants_json(request):
            view = card_view(card, tax)
            item = next(i for i in view["entries"] if i["attribute"] == attribute)
            html = templates.get_template("_item.html").render(
                item=item, card=view, read_only=access.read_only, csrf=access.csrf_token(session), prefix=PREFIX,
                next_url=safe_next(fields.get("next")))
            return _secured(JSONResponse({"sku": sku, "attribute": attribute, "action": outcome.plan.action,
                                          "chosen": outcome.plan.chosen, "changed": outcome.changed,
                                          "state": item["state"], "html": html}))
        return _secured(RedirectResponse(safe_next(fields.get("next")), status_code=303))

    @router.post("/bulk-approve", response_class=HTMLResponse)
    async def bulk(request: Request) -> Response:
        session = None
        try:
            session, fields = await posted(request)
            tax = taxonomies()
            f = parse_filter(fields, tax)
            raw_expected = fields.get("expected") or ""
            if not raw_expected.isdigit():
                raise InvalidRequest("bulk approve needs the number of tags you saw (expected)")

            def work() -> int:
                with engine().begin() as conn:
                    return review_repo.bulk_approve(conn, tax, f, expected=int(raw_expected), who=session.who)

            approved = await run_in_threadpool(work)
        except ReviewError as exc:
            return failure(request, exc, session)
        if approved:
            retagger.request([f.attribute] if f.attribute else [a.name for a in tax.attributes])
        log.info("review: %s bulk-approved %d tags", session.who, approved)
        if _wants_json(request):
            return _secured(JSONResponse({"approved": approved}))
        return _secured(RedirectResponse(f"{PREFIX}/queue?{urllib.parse.urlencode(f.query(page=1))}",
                                         status_code=303))

    # ---- images and heat maps ----------------------------------------------------------------------------

    @router.get("/image/{sku}")
    def product_image(request: Request, sku: str) -> Response:
        try:
            signed_in(request)
            with engine().connect() as conn:
                card = review_repo.product_card(conn, sku)
            if not card.image_ref:
                raise InvalidRequest(f"product {sku!r} has no image")
            _, image = load_product_image(settings, card.image_ref)
        except ReviewError as exc:
            return failure(request, exc)
        response = Response(thumbnail_jpeg(image), media_type="image/jpeg")
        response.headers["Cache-Control"] = "private, max-age=300"
        return _secured(response, cache=True)

    def explain_params(request: Request) -> tuple[str, str, str]:
        params = request.query_params
        sku, attribute, label = params.get("sku") or "", params.get("attribute") or "", params.get("label") or ""
        if not (sku and attribute and label):
            raise InvalidRequest("say which tag to explain: sku, attribute and label")
        return sku, attribute, label

    @router.get("/heatmap.png")
    def heatmap_png(request: Request) -> Response:
        try:
            signed_in(request)
            sku, attribute, label = explain_params(request)
            result = explain_tag(engine(), settings, taxonomies(), sku=sku, attribute=attribute, label=label)
        except ReviewError as exc:
            return failure(request, exc)
        response = Response(result.png, media_type="image/png")
        response.headers.update({"X-Tagger-Cache": "hit" if result.cached else "miss",
                                 "X-Tagger-Base-Score": f"{result.base_score:.4f}",
                                 "X-Tagger-Max-Drop": f"{result.max_drop:.4f}",
                                 "Cache-Control": "private, max-age=300"})
        return _secured(response, cache=True)

    @router.get("/why", response_class=HTMLResponse)
    def why(request: Request) -> Response:
        session = None
        try:
            session = signed_in(request)
            sku, attribute, label = explain_params(request)
            tax = taxonomies()
            spec = attribute_with_label(tax, attribute, label)
            with engine().connect() as conn:
                card = review_repo.product_card(conn, sku)
        except ReviewError as exc:
            return failure(request, exc, session)
        rows = card.tags.get(attribute, [])
        return render("why.html", request, session, card=card_view(card, tax), attribute=attribute,
                      attribute_name=spec.display_name or attribute, label=label, label_name=label_name(spec, label),
                      score=next((r.score for r in rows if r.value == label), None),
                      others=[(r.value, label_name(spec, r.value)) for r in rows if r.value != label],
                      query=urllib.parse.urlencode({"sku": sku, "attribute": attribute, "label": label}))

    # ---- duplicates ------------------------------------------------------------------------------------

    @router.get("/duplicates", response_class=HTMLResponse)
    def duplicates(request: Request, show: str = "open") -> Response:
        session = None
        try:
            session = signed_in(request)
            if show not in ("open", "decided"):
                raise InvalidRequest(f"show={show!r} is unknown; use open or decided")
            with engine().connect() as conn:
                pairs = review_repo.duplicate_pairs(conn, decided=show == "decided")
                groups = duplicate_groups(pairs) if show == "open" else []
                skus = {s for p in pairs for s in (p.sku_a, p.sku_b)}
                brief = review_repo.products_brief(conn, sorted(skus))
        except ReviewError as exc:
            return failure(request, exc, session)
        return render("duplicates.html", request, session, show=show, groups=groups, pairs=pairs, brief=brief,
                      next_url=request.url.path + (f"?{request.url.query}" if request.url.query else ""))

    @router.post("/duplicates/verdict", response_class=HTMLResponse)
    async def verdict(request: Request) -> Response:
        session = None
        try:
            session, fields = await posted(request)
            sku_a, sku_b, choice = fields.get("sku_a") or "", fields.get("sku_b") or "", fields.get("verdict") or ""
            if not sku_a or not sku_b:
                raise InvalidRequest("a verdict names both products (sku_a and sku_b)")

            def work() -> Any:
                with engine().begin() as conn:
                    return review_repo.record_verdict(conn, sku_a, sku_b, choice, session.who)

            pair = await run_in_threadpool(work)
        except ReviewError as exc:
            return failure(request, exc, session)
        log.info("review: %s judged %s / %s: %s", session.who, pair.sku_a, pair.sku_b, pair.verdict)
        if _wants_json(request):
            return _secured(JSONResponse({"sku_a": pair.sku_a, "sku_b": pair.sku_b, "verdict": pair.verdict,
                                          "decided_by": pair.decided_by}))
        return _secured(RedirectResponse(safe_next(fields.get("next") or PREFIX + "/duplicates"), status_code=303))

    # ---- health ----------------------------------------------------------------------------------------

    @router.get("/health", response_class=HTMLResponse)
    def health(request: Request) -> Response:
        session = None
        try:
            session = signed_in(request)
            tax = taxonomies()
            with engine().connect() as conn:
                states = attribute_health(review_repo.state_counts(conn), [a.name for a in tax.attributes])
                agreement = agreement_series(review_repo.agreement_by_day(conn))
                corrected = review_repo.most_corrected(conn)
                totals = review_repo.decision_totals(conn)
        except ReviewError as exc:
            return failure(request, exc, session)
        agreed = sum(p.agreed for p in agreement)
        decided = sum(p.decided for p in agreement)
        return render("health.html", request, session, states=states, agreement=agreement, corrected=corrected,
                      totals=totals, agreed=agreed, decided=decided,
                      state_svg=charts.state_bars(states), agreement_svg=charts.agreement_line(agreement),
                      corrected_svg=charts.corrected_bars(corrected))

    return router


def _exemplar_retagger(settings: Settings, engine: Callable[[], Engine]) -> ExemplarRetagger:
    def retag(attributes: Sequence[str]) -> object:
        from tagger.exemplars.commands import retag_attributes

        return retag_attributes(engine(), settings, load_taxonomies(settings.taxonomy_dir), attributes)

    return ExemplarRetagger(retag, busy=ApplyInProgress)


def mount_review(app: FastAPI, settings: Settings) -> None:
    """Serve the review page under ``/review`` on ``app`` (the webhook receiver's app)."""
    app.include_router(build_router(settings))
    app.mount(PREFIX + "/static", StaticFiles(directory=str(STATIC_DIR)), name="review-static")
