"""``create_app(gallery, settings)``: the FastAPI app that puts one Gallery behind HTTP.

Routes: POST /search, /identify, /verify, /embed (multipart image fields), GET
/items/{id}/thumbnail, GET /health, GET / (the page) and FastAPI's /docs. Uploads are decoded
in the thread pool; the model and the index run on the batcher's one thread, concurrent
requests sharing a forward pass and an index search. See ``security`` for the key, the Host
check and the body limit, ``uploads`` for what a bad upload gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from siamese.data.datasets import UndecodableImage
from siamese.errors import SiameseError
from siamese.gallery import Gallery
from siamese.service.batcher import Batcher, Verdict
from siamese.service.page import page
from siamese.service.security import AccessGuard, UploadLimit
from siamese.service.settings import ServiceSettings
from siamese.service.thumbnails import Thumbnails
from siamese.service.uploads import bad_request, read_image, validation_handler

# A multipart file field (FastAPI's 422 for a missing one becomes a sentence: uploads.py).
Upload = Annotated[UploadFile, File()]
# Item ids in a thumbnail URL: digits only, and no longer than any index could need.
MAX_ID_DIGITS = 12


class NeighbourOut(BaseModel):
    id: int
    path: str
    label: str | None
    distance: float
    same: bool | None


class SearchOut(BaseModel):
    neighbours: list[NeighbourOut]


class IdentifyOut(BaseModel):
    label: str | None
    distance: float
    known: bool


class VerifyOut(BaseModel):
    distance: float
    same: bool | None
    threshold: float | None


class EmbedOut(BaseModel):
    embedding: list[float]


class HealthOut(BaseModel):
    status: str
    items: int
    model: dict[str, Any]


def model_summary(gallery: Gallery, threshold: float | None) -> dict[str, Any]:
    """What /health says of the model: the checkpoint's file name (no server path) and hash,
    the distance, the input and embedding shapes and the threshold in use."""
    info = gallery.info
    checkpoint = info.get("checkpoint")
    return {
        "checkpoint": Path(checkpoint).name if checkpoint else None,
        "checkpoint_sha256": info.get("checkpoint_sha256"),
        "distance": info.get("distance"),
        "embedding_dim": info.get("embedding_dim"),
        "image_shape": list(gallery.image_shape),
        "threshold": threshold,
    }


def create_app(gallery: Gallery, settings: ServiceSettings | None = None) -> FastAPI:
    """The service's app for ``gallery``; its batcher thread starts now and stops when the
    app shuts down (uvicorn's lifespan, or ``with TestClient(app)``)."""
    settings = settings or ServiceSettings()
    threshold = settings.threshold if settings.threshold is not None else gallery.threshold
    batcher = Batcher(
        gallery,
        max_size=settings.batch_max_size,
        max_wait_ms=settings.batch_max_wait_ms,
        identify_by=settings.identify_by,
        identify_k=settings.identify_k,
        threshold=settings.threshold,
    )
    thumbnails = Thumbnails(
        gallery, settings.thumbnail_size, settings.max_image_pixels, settings.thumbnail_cache
    )
    shape = tuple(gallery.image_shape)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(
        title="siamese similarity service",
        description=(
            "Search a gallery for the images most like an upload, identify it as a known "
            "label or unknown, verify a pair. Images are multipart file fields."
        ),
        lifespan=lifespan,
    )
    app.state.gallery = gallery
    app.state.batcher = batcher
    app.state.settings = settings
    app.add_exception_handler(RequestValidationError, validation_handler(settings.max_k))
    # Added last is outermost: the key and Host are checked before any body is read.
    app.add_middleware(
        UploadLimit,
        max_bytes=settings.max_upload_bytes,
        setting=f"{settings.max_upload_mb:g} MiB",
    )
    app.add_middleware(AccessGuard, api_key=settings.api_key, allowed_hosts=settings.allowed_hosts)

    async def decoded(upload: UploadFile, field: str) -> Any:
        return await read_image(upload, field, shape, settings.max_image_pixels)

    @app.post("/search", response_model=SearchOut)
    async def search(image: Upload, k: int | None = None) -> dict[str, Any]:
        """The k nearest gallery items of the image, nearest first."""
        k = settings.k if k is None else k
        if not 1 <= k <= settings.max_k:
            raise bad_request(
                f"k={k} is out of range: ask for k=1 to {settings.max_k} neighbours (serve.max_k)"
            )
        found = await batcher.run("search", await decoded(image, "image"), k)
        return {"neighbours": [n.as_dict() for n in found]}

    @app.post("/identify", response_model=IdentifyOut)
    async def identify(image: Upload) -> dict[str, Any]:
        """A known label for the image, or null (unknown) beyond the threshold."""
        x = await decoded(image, "image")
        try:
            identity = await batcher.run("identify", x)
        except SiameseError as exc:  # no threshold, no labelled item: the gallery's state
            raise HTTPException(status_code=409, detail=str(exc)) from None
        return identity.as_dict()

    @app.post("/verify", response_model=VerifyOut)
    async def verify(image_a: Upload, image_b: Upload) -> dict[str, Any]:
        """The model's distance between two images, and whether they are the same at the
        threshold (null without one)."""
        a, b = await asyncio.gather(decoded(image_a, "image_a"), decoded(image_b, "image_b"))
        verdict: Verdict = await batcher.run("verify", torch.cat([a, b]))
        return {"distance": verdict.distance, "same": verdict.same, "threshold": verdict.threshold}

    @app.post("/embed", response_model=EmbedOut)
    async def embed(image: Upload) -> dict[str, Any]:
        """The image's embedding, as the gallery's items were embedded."""
        return {"embedding": await batcher.run("embed", await decoded(image, "image"))}

    @app.get(
        "/items/{item_id}/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such item"}},
    )
    async def thumbnail(item_id: str) -> Response:
        """A small PNG of an indexed item's image (re-encoded, never the file itself)."""
        if not (item_id.isascii() and item_id.isdigit() and len(item_id) <= MAX_ID_DIGITS):
            raise HTTPException(404, f"item ids are whole numbers 0 to {len(gallery) - 1}")
        n = int(item_id)
        try:
            png = await run_in_threadpool(thumbnails.get, n)
        except LookupError:
            raise HTTPException(404, f"no indexed item {n} has an image file") from None
        except UndecodableImage as exc:
            raise HTTPException(
                404, f"item {n}'s image file can no longer be read ({exc.reason})"
            ) from None
        return Response(
            png, media_type="image/png", headers={"cache-control": "private, max-age=3600"}
        )

    @app.get("/health", response_model=HealthOut)
    async def health() -> dict[str, Any]:
        """Whether the service is up, how many items it holds, and its model."""
        return {"status": "ok", "items": len(gallery), "model": model_summary(gallery, threshold)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        html, policy = page()
        return HTMLResponse(
            html,
            headers={"content-security-policy": policy, "cache-control": "no-store"},
        )

    return app
