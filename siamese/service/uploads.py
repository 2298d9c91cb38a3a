"""What a request sends: its image fields decoded for the model, and one-sentence 422s.

An upload is decoded in the thread pool (``decode_image_bytes``: the pixel limit is checked
from the header, before decoding). A missing field, a field that holds text, an empty file,
a non-image, an image over the pixel limit and a malformed query parameter each get 422 with
``{"detail": "<one sentence>"}``; FastAPI's own 422 for a missing field (a list of errors) is
replaced by such a sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from siamese.data.datasets import UndecodableImage, decode_image_bytes


def bad_request(detail: str) -> HTTPException:
    """A 422 answer of one sentence."""
    return HTTPException(status_code=422, detail=detail)


def _how(field: str) -> str:
    return (
        f"send the image as a multipart/form-data file field named {field} "
        f"(curl -F {field}=@photo.jpg)"
    )


async def read_image(
    upload: UploadFile, field: str, shape: tuple[int, int, int], max_pixels: int
) -> Tensor:
    """An uploaded image as the model takes it: float32 (1, C, H, W) in [0, 1]."""
    data = await upload.read()
    if not data:
        raise bad_request(f"the file field {field} is empty (0 bytes): {_how(field)}")
    channels, height, width = shape
    try:
        image = await run_in_threadpool(
            decode_image_bytes, data, (height, width), channels, max_pixels
        )
    except UndecodableImage as exc:
        raise bad_request(
            f"the file in field {field} is not an image this service can read "
            f"({exc.reason}); send a PNG, JPEG or another image PIL reads"
        ) from None
    return image.unsqueeze(0)


def validation_sentence(errors: Sequence[dict[str, Any]], max_k: int) -> str:
    """One sentence for FastAPI's list of validation errors (the first one tells)."""
    if not errors:
        return "the request could not be read"
    error = errors[0]
    loc = [str(part) for part in error.get("loc", ())]
    where, name = (loc[0], loc[-1]) if loc else ("", "")
    kind = str(error.get("type", ""))
    if where == "body":
        if kind == "missing":
            return f"the request has no file field {name}: {_how(name)}"
        return f"the field {name} holds text, not a file: {_how(name)}"
    if where == "query" and name == "k":
        return (
            f"k={error.get('input')} is not a whole number: ask for k=1 to {max_k} "
            "neighbours, e.g. ?k=5"
        )
    return f"{where} {name}: {error.get('msg', 'not valid')}".strip()


def validation_handler(max_k: int) -> Any:
    """The app's handler for RequestValidationError: 422 with one sentence."""

    async def handle(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_sentence(exc.errors(), max_k)}, 422)

    return handle
