"""The review web app: one static page (package data, no build step) and a small JSON API (FastAPI).

Every request must carry the session's random token (``?token=`` or the ``X-Review-Token``
header); without it the answer is 403. The API (errors are JSON ``{"error": "..."}`` with a 4xx
status):

========================================  =====================================================
``GET /``                                 the page
``GET /api/progress``                     ``{"done", "total", "first_open"}``
``GET /api/items/{index}``                one item: tiers, negatives, image URL, state, progress
``GET /api/items/{index}/image``          the item's local image file (404 when none)
``POST /api/items/{index}/verdict``       ``{"tier": 1..4, "verdict": ..., "base": revision}``
``POST /api/items/{index}/edit``          ``{"tier": 1..4, "text": ..., "base": revision}``
``POST /api/items/{index}/decision``      ``{"decision": "accept"|"fix"|"reject", "base": revision}``
``POST /api/undo``                        cancels the newest action; answers with its item
========================================  =====================================================
"""

from __future__ import annotations

import hmac
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from hierarcaps.image_folder import TarMember, read_tar_member
from hierarcaps.review.items import ImageIndex
from hierarcaps.review.store import ItemState, ReviewError, ReviewStore, UnknownItemError

TOKEN_HEADER = "X-Review-Token"


class VerdictBody(BaseModel):
    tier: int
    verdict: str
    base: int | None = None


class EditBody(BaseModel):
    tier: int
    text: str
    base: int | None = None


class DecisionBody(BaseModel):
    decision: str
    base: int | None = None


def page_html() -> str:
    """The review page (``hierarcaps/review/static/review.html``)."""
    return resources.files("hierarcaps.review").joinpath("static/review.html").read_text(encoding="utf-8")


def create_app(store: ReviewStore, images: ImageIndex, token: str) -> FastAPI:
    """The app serving ``store``, images found by ``images``, for requests that carry ``token``."""
    app = FastAPI(title="hierarcaps review", docs_url=None, redoc_url=None, openapi_url=None)
    page = page_html()

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        given = request.query_params.get("token") or request.headers.get(TOKEN_HEADER) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "missing or wrong token: open the URL that `hierarcaps review` printed"}, 403)
        return await call_next(request)

    @app.exception_handler(ReviewError)
    async def review_error(request: Request, err: ReviewError) -> JSONResponse:
        body: dict[str, Any] = {"error": str(err)}
        index = str(request.path_params.get("index", ""))
        if err.status == 409 and index.isdigit() and int(index) < store.total:
            body["item"] = _item(store, images, int(index))
        return JSONResponse(body, err.status)

    @app.get("/", response_class=HTMLResponse)
    def index_page() -> str:
        return page

    @app.get("/api/progress")
    def progress() -> dict[str, Any]:
        states = store.states()
        first_open = next((i for i, s in enumerate(states) if s.decision is None), None)
        return {"done": sum(s.decision is not None for s in states), "total": store.total, "first_open": first_open}

    @app.get("/api/items/{index}")
    def item(index: int) -> dict[str, Any]:
        return _item(store, images, index)

    @app.get("/api/items/{index}/image")
    def image(index: int) -> Response:
        ref = store.row(index)["image_ref"]
        found = images.find(ref)
        if found is None:
            raise UnknownItemError(f"item {index}: image {ref!r} is {images.missing_reason(ref)}")
        if isinstance(found, TarMember):
            return Response(read_tar_member(found), media_type="image/jpeg")  # fetch-images stores JPEG
        return FileResponse(found)

    @app.post("/api/items/{index}/verdict")
    def verdict(index: int, body: VerdictBody) -> dict[str, Any]:
        return _item(store, images, index, store.set_verdict(index, body.tier, body.verdict, body.base))

    @app.post("/api/items/{index}/edit")
    def edit(index: int, body: EditBody) -> dict[str, Any]:
        return _item(store, images, index, store.edit_tier(index, body.tier, body.text, body.base))

    @app.post("/api/items/{index}/decision")
    def decision(index: int, body: DecisionBody) -> dict[str, Any]:
        return _item(store, images, index, store.decide(index, body.decision, body.base))

    @app.post("/api/undo")
    def undo() -> dict[str, Any]:
        index, state = store.undo()
        return _item(store, images, index, state)

    return app


def _item(store: ReviewStore, images: ImageIndex, index: int, state: ItemState | None = None) -> dict[str, Any]:
    """The JSON view of one item."""
    row = store.row(index)
    state = state or store.state(index)
    has_image = images.find(row["image_ref"]) is not None
    return {
        "index": index,
        "id": row["id"],
        "positive": row["positive"],
        "negative": row["negative"],
        "caption": row["caption"],
        "image_ref": row["image_ref"],
        "image": f"api/items/{index}/image" if has_image else None,
        "image_missing": None if has_image else images.missing_reason(row["image_ref"]),
        "state": state.to_dict(),
        "progress": store.progress(),
    }
