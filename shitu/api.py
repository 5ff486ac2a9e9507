"""The HTTP API: PaddleX's four PP-ShiTuV2 serving endpoints, plus relabelling, index listing and health.

Field names follow PaddleX's serving schema, so PaddleX clients work unchanged. Every route is
a thin shell: decode and validate the request, call one :class:`~shitu.engine.Engine` method,
wrap the answer in PaddleX's envelope::

    {"logId": "<uuid4>", "errorCode": 0, "errorMsg": "Success", "result": {...}}

Failures use the same envelope without ``result``, with ``errorCode`` equal to the HTTP status.
Everything is decoded and checked *before* the engine is called, so a rejected request never
changes an index.

The Gradio UI can be mounted on the same app at ``/`` (routes registered here are matched first)::

    app = create_api(engine)
    app = gr.mount_gradio_app(app, demo, path="/")
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, StrictInt, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shitu import net
from shitu.access import AccessPolicy
from shitu.adapt import ADAPT_MODES
from shitu.config import INDEX_TYPES, METRIC_TYPES, REC_MODELS
from shitu.engine import Engine
from shitu.errors import (
    Conflict,
    FetchTimeout,
    Forbidden,
    NotFound,
    RateLimited,
    ShiTuError,
    StarterModelUnavailable,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from shitu.gallery import GalleryBatch, GalleryItem, check_image_bytes, crop_box
from shitu.results import Recognition

log = logging.getLogger(__name__)

API_PREFIX = "/shitu-"  # every route below except /health starts with it
FETCH_TIMEOUT = net.DEFAULT_TIMEOUT  # seconds per image URL (module-level so tests can shorten it)
FETCH_MAX_BYTES = net.DEFAULT_MAX_BYTES
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_DATA_URI_RE = re.compile(r"^data:[^,;]*(;[^,;]*)*;base64,", re.IGNORECASE)

T = TypeVar("T")

# --- schemas (PaddleX's field names) ---------------------------------------------------------


# "" is refused with 422 instead of meaning "the default"; the engine takes a str only as a name
IndexKey = Annotated[str, StringConstraints(min_length=1)]


class ImageLabelPair(BaseModel):
    image: str = Field(description="Base64 of the image file's bytes, or an http(s) URL the server can reach")
    label: str = Field(description="The label this image is an example of")
    bbox: list[float] | None = Field(
        None,
        min_length=4,
        max_length=4,
        description="Only this box of the image: [x1, y1, x2, y2] in its pixels, e.g. a box from a /shitu-infer "
        "result, to add it under its predicted or a corrected label (learn from use). Omitted: the whole image.",
    )


class BuildIndexRequest(BaseModel):
    imageLabelPairs: list[ImageLabelPair]
    indexKey: IndexKey | None = Field(None, description="Name for the new index; a unique key is generated if omitted")
    indexType: Literal[INDEX_TYPES] = Field("Flat", description="faiss index type")
    metricType: Literal[METRIC_TYPES] = Field("IP", description="Similarity: inner product (cosine) or L2")
    adapt: Literal[ADAPT_MODES] = Field(
        "auto",
        description="Fit the features to the gallery's labels: auto (where held-out recall@1 improves), on, off. "
        "The index is calibrated either way (GET /shitu-index/{indexKey}/calibration).",
    )


class BuildIndexResult(BaseModel):
    indexKey: str
    idMap: dict[str, str] = Field(description="Vector id → label, for every entry of the index")
    imageCount: int


RETURN_ID_MAP = Field(
    True,
    description="Return the whole index's idMap (PaddleX's answer; O(entries)). false: only imageCount and the "
    "changed ids (addedIds / removedIds), which a gallery of a million entries will want",
)


class AddImagesRequest(BaseModel):
    imageLabelPairs: list[ImageLabelPair]
    indexKey: IndexKey | None = Field(None, description="Index to change; SHITU_DEFAULT_INDEX if omitted")
    returnIdMap: bool = RETURN_ID_MAP


class RemoveImagesRequest(BaseModel):
    ids: list[StrictInt] = Field(description="Vector ids to remove (see idMap or GET /shitu-index/{indexKey})")
    indexKey: IndexKey | None = Field(None, description="Index to change; SHITU_DEFAULT_INDEX if omitted")
    returnIdMap: bool = RETURN_ID_MAP


class RelabelImagesRequest(BaseModel):
    ids: list[StrictInt] = Field(description="Vector ids to relabel (see idMap or GET /shitu-index/{indexKey})")
    label: str = Field(description="The new label for every one of these entries (not empty)")
    indexKey: IndexKey | None = Field(None, description="Index to change; SHITU_DEFAULT_INDEX if omitted")
    returnIdMap: bool = RETURN_ID_MAP


class IndexChangeResult(BaseModel):
    idMap: dict[str, str] | None = Field(
        None, description="Vector id → label, for every entry of the index after the change (left out with "
        "returnIdMap=false)"
    )
    imageCount: int
    addedIds: list[int] | None = Field(None, description="With returnIdMap=false: the ids given to the new entries")
    removedIds: list[int] | None = Field(None, description="With returnIdMap=false: the ids removed")
    changedIds: list[int] | None = Field(None, description="With returnIdMap=false: the ids relabelled")


def _change_result(index: Any, full: bool, **ids: list[int]) -> "IndexChangeResult":
    if full:
        return IndexChangeResult(idMap=_id_map(index.id_map), imageCount=len(index))
    return IndexChangeResult(idMap=None, imageCount=len(index), **ids)


class InferRequest(BaseModel):
    image: str = Field(description="Base64 of the image file's bytes, or an http(s) URL the server can reach")
    indexKey: IndexKey | None = Field(None, description="Index to search; SHITU_DEFAULT_INDEX if omitted")
    detThreshold: float | None = Field(None, ge=0, le=1, description="Detection score threshold")
    recThreshold: float | None = Field(None, ge=0, le=1, description="Recognition similarity threshold")
    hammingRadius: float | None = Field(None, description="Accepted for PaddleX compatibility; unused (float indices)")
    topk: int | None = Field(None, ge=1, le=100, description="Labels returned per detected object")
    visualize: bool | None = Field(None, description="Return the image with boxes drawn (default: true)")


class RecResult(BaseModel):
    label: str
    score: float


class DetectedObject(BaseModel):
    bbox: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the input image")
    recResults: list[RecResult] = Field(description="Best gallery labels, best first; empty when none is close enough")
    score: float = Field(description="Detection score")


class InferResult(BaseModel):
    detectedObjects: list[DetectedObject]
    image: str | None = Field(None, description="Base64 JPEG of the image with boxes drawn, or null")


class IndexListing(BaseModel):
    indexKey: str
    imageCount: int
    labelCount: int
    indexType: str
    metricType: str
    featureModel: str | None
    offset: int
    limit: int
    idMap: dict[str, str] = Field(description="This page of vector id → label, in id order")


# --- calibration (GET/POST /shitu-index/{indexKey}/calibration...) ---


class CalibrateRequest(BaseModel):
    adapt: Literal[ADAPT_MODES] | None = Field(None, description="auto, on or off; default: as the index was built")


class ThresholdRequest(BaseModel):
    threshold: float = Field(ge=-1, le=1, description="The index's own recognition threshold (a point on its curve)")


class OperatingPointModel(BaseModel):
    threshold: float
    correct_accepted: float = Field(description="Known objects answered correctly and accepted")
    wrong_accepted: float = Field(description="Known objects answered wrongly but accepted")
    unknown_rejected: float = Field(description="Objects not in the gallery that are rejected")


class CalibrationResult(BaseModel):
    indexKey: str
    imageCount: int
    threshold: float | None = Field(description="The index's own threshold; null: not calibrated (too few labels)")
    chosenBy: str | None = Field(description="default (calibrated) or user (picked on the curve)")
    expected: OperatingPointModel | None = Field(description="What the threshold promises, measured")
    top1: float | None = Field(description="Known objects whose best match is right, whatever the score")
    protocol: str | None = Field(description="leave-one-out, or held-out folds for an adapted index")
    knownQueries: int = 0
    unknownQueries: int = 0
    changesSince: int = Field(0, description="Entries changed since the curve was measured")
    uncertainty: float | None = Field(None, description="The threshold's standard error (± this)")
    confirmedAnswers: int = Field(0, description="Answers users confirmed or corrected (Teach): real queries it uses")
    summary: str | None = Field(None, description='e.g. "threshold 0.72 ± 0.04 from 18 photos, 72 query-like views, 3 '
                                                  'confirmed answers"')  # fmt: skip
    evidence: dict[str, Any] | None = Field(None, description="What the threshold was measured on and combined")
    adaptation: dict[str, Any] | None = Field(description="Whether a projection was fitted to the gallery, and why")
    curve: list[OperatingPointModel] = Field(default_factory=list)


# --- index versions (GET/POST /shitu-index/{indexKey}/versions...) ---


class IndexVersion(BaseModel):
    version: int
    current: bool = Field(description="True for the version searched now")
    time: str | None = Field(description="When it was committed (UTC, ISO 8601)")
    action: str | None = Field(description="What made it: build, import, add 3, remove 2, relabel 1, restore v4, ...")
    imageCount: int | None
    labelCount: int | None
    featureModel: str | None
    indexType: str | None
    metricType: str | None


class IndexVersions(BaseModel):
    indexKey: str
    current: int = Field(description="The current version's number")
    historyLimit: int = Field(description="How many earlier versions are kept (SHITU_HISTORY_VERSIONS)")
    versions: list[IndexVersion] = Field(description="Newest first, the current one included")


class EntryLabel(BaseModel):
    id: int
    label: str


class EntryRelabel(BaseModel):
    id: int
    oldLabel: str
    newLabel: str


class VersionChanges(BaseModel):
    indexKey: str
    version: int
    against: int = Field(description="The version compared with (0: an empty index)")
    action: str | None
    time: str | None
    imageCountBefore: int
    imageCount: int
    addedCount: int
    removedCount: int
    relabelledCount: int
    added: list[EntryLabel] = Field(description="Ids in this version but not in the other (first `limit`)")
    removed: list[EntryLabel] = Field(description="Ids in the other version but not in this one (first `limit`)")
    relabelled: list[EntryRelabel] = Field(description="Ids whose label differs (first `limit`)")


class RestoreResult(BaseModel):
    indexKey: str
    version: int = Field(description="The new current version (a restore is a new version)")
    restoredFrom: int
    idMap: dict[str, str] = Field(description="Vector id → label, for every entry of the index after the restore")
    imageCount: int


class HealthResult(BaseModel):
    status: str
    models: dict[str, Any]
    indices: list[str]
    activeIndex: str = Field(description="SHITU_DEFAULT_INDEX: the index used when a request names none")
    modelDownloads: dict[str, Any] = Field(description="Background download of official weights, if any")
    vectorStore: str = Field(
        "faiss", description="Where named indices live and are searched: faiss, milvus_lite or milvus_server"
    )


class ModelsResult(BaseModel):
    active: dict[str, Any] = Field(description="Which detection and recognition models run, and why")
    recognitionModels: list[dict[str, Any]] = Field(
        description="The official recognisers with PaddleX's published size (MB), AliProducts recall@1 and speed"
    )
    downloads: dict[str, Any]


class SwitchModelRequest(BaseModel):
    modelName: Literal[REC_MODELS] = Field(description="The recognition model to use from now on")


class Envelope(BaseModel, Generic[T]):
    logId: str
    errorCode: int = 0
    errorMsg: str = "Success"
    result: T


class ErrorEnvelope(BaseModel):
    logId: str
    errorCode: int
    errorMsg: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope, "description": what}
    for code, what in {
        400: "Bad input (invalid base64, not an image, empty pairs, invalid JSON, URL refused)",
        401: "Missing or wrong bearer token (only when SHITU_API_TOKEN is set)",
        403: "Image URL resolves to a non-public address, or the server is read-only",
        429: "Too many failed sign-ins from this address",
        404: "Unknown indexKey or ids",
        408: "Image URL did not answer in time",
        409: "indexKey already exists, or the index was built with another recognition model",
        413: "Request body, image file or image pixels over the limit",
        422: "The request body is not a JSON object or does not match the schema",
        503: "The models could not be prepared",
    }.items()
}


# --- helpers ---------------------------------------------------------------------------------


def _ok(result: BaseModel) -> dict[str, Any]:
    return {"logId": str(uuid.uuid4()), "errorCode": 0, "errorMsg": "Success", "result": result}


def _ok_now(result: BaseModel) -> Response:
    """:func:`_ok`, serialised here. FastAPI validates what a sync route returns on a second trip
    through its thread pool; a finished ``Response`` skips that trip (~0.3 ms a request on 2
    busy cores). The route's ``response_model`` still documents the shape."""
    envelope = Envelope[type(result)](logId=str(uuid.uuid4()), result=result)  # type: ignore[misc]
    return Response(envelope.model_dump_json(), media_type="application/json")


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, *, quiet: bool = False
) -> JSONResponse:
    """PaddleX's error envelope ``{logId, errorCode, errorMsg}`` with that HTTP status; logged
    unless ``quiet`` (answers the log has already explained, e.g. "still starting")."""
    log_id = str(uuid.uuid4())
    if not quiet:
        log.info("API error %s (logId %s): %s", status, log_id, message)
    return JSONResponse(
        {"logId": log_id, "errorCode": status, "errorMsg": message}, status_code=status, headers=headers
    )


def _id_map(mapping: dict[int, str]) -> dict[str, str]:
    return {str(i): label for i, label in sorted(mapping.items())}


def _index_version(v: dict[str, Any]) -> IndexVersion:
    """One of :meth:`Engine.versions`' dicts in the API's field names."""
    return IndexVersion(
        version=v["version"],
        current=v["current"],
        time=v["time"],
        action=v["action"],
        imageCount=v["entries"],
        labelCount=v["labels"],
        featureModel=v["feature_model"],
        indexType=v["index_type"],
        metricType=v["metric_type"],
    )


def _version_changes(index_key: str, c: dict[str, Any]) -> VersionChanges:
    """:meth:`Engine.version_changes`' dict in the API's field names."""
    return VersionChanges(
        indexKey=index_key,
        version=c["version"],
        against=c["against"],
        action=c["action"],
        time=c["time"],
        imageCountBefore=c["entries_before"],
        imageCount=c["entries_after"],
        addedCount=c["added_count"],
        removedCount=c["removed_count"],
        relabelledCount=c["relabelled_count"],
        added=[EntryLabel(**e) for e in c["added"]],
        removed=[EntryLabel(**e) for e in c["removed"]],
        relabelled=[EntryRelabel(id=e["id"], oldLabel=e["from"], newLabel=e["to"]) for e in c["relabelled"]],
    )


REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # the report page runs no script


def attachment(filename: str) -> str:
    """A Content-Disposition header value for a download (RFC 6266, with a UTF-8 name)."""
    from urllib.parse import quote

    plain = re.sub(r"[^A-Za-z0-9._-]", "_", filename)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename)}"


def read_image_field(value: str, where: str, engine: Engine) -> bytes:
    """The bytes behind an ``image`` field: an http(s) URL (fetched behind the SSRF guard) or
    base64 (a ``data:`` URI prefix and URL-safe alphabet are accepted). The bytes are checked to
    be an image within ``max_image_pixels`` from its header alone.
    """
    text = value.strip()
    if not text:
        raise ShiTuError(f"{where} is empty")
    if _SCHEME_RE.match(text):
        data = net.fetch_url(
            text,
            guard=True,
            allowlist=tuple(engine.settings.url_allowlist),
            timeout=FETCH_TIMEOUT,
            max_bytes=FETCH_MAX_BYTES,
        )
    else:
        data = _decode_base64(text, where)
    check_image_bytes(data, where, engine.settings.max_image_pixels)
    return data


def _decode_base64(text: str, where: str) -> bytes:
    try:  # the usual case, plain padded base64, without the copies that normalising makes
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    else:
        if data:
            return data
    text = _DATA_URI_RE.sub("", text, count=1)
    text = "".join(text.split()).translate(str.maketrans("-_", "+/"))
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ShiTuError(f"{where} is neither an http(s) URL nor valid base64") from None
    if not data:
        raise ShiTuError(f"{where} is empty")
    return data


def pairs_to_batch(pairs: list[ImageLabelPair], engine: Engine) -> GalleryBatch:
    """Decode every pair up front, so nothing is embedded unless all of them are usable."""
    if not pairs:
        raise ShiTuError("imageLabelPairs is empty: give at least one {image, label} pair")
    items = []
    for k, pair in enumerate(pairs):
        label = pair.label.strip()
        if not label:
            raise ShiTuError(f"imageLabelPairs[{k}].label is empty")
        data = read_image_field(pair.image, f"imageLabelPairs[{k}].image", engine)
        source = f"pair {k}"
        if pair.bbox is not None:
            try:
                data = crop_box(data, pair.bbox)
            except ShiTuError as exc:
                raise ShiTuError(f"imageLabelPairs[{k}].bbox: {exc.message}") from None
            source += " box (" + ", ".join(f"{v:.0f}" for v in pair.bbox) + ")"
        items.append(GalleryItem(source=source, image=data, label=label, line_no=k + 1))
    return GalleryBatch(items=items)


def result_to_infer(result: Recognition, visualize: bool) -> InferResult:
    objects = [
        DetectedObject(
            bbox=[round(float(v), 2) for v in obj.bbox],
            recResults=[RecResult(label=lab, score=round(float(s), 4)) for lab, s in zip(obj.labels, obj.scores)],
            score=round(float(obj.det_score), 4),
        )
        for obj in result.objects
    ]
    image = None
    if visualize:
        buf = io.BytesIO()
        result.render().convert("RGB").save(buf, format="JPEG", quality=90)
        image = base64.b64encode(buf.getvalue()).decode("ascii")
    return InferResult(detectedObjects=objects, image=image)


# --- request body limit ----------------------------------------------------------------------


class BodySizeLimit:
    """Answer 413 for API requests whose body is over ``settings.max_request_bytes``: by the
    declared Content-Length before reading anything, else by counting what actually arrives.
    Other paths (the mounted UI, which has its own upload limits) pass through untouched."""

    def __init__(self, app: ASGIApp, engine: Engine):
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        limit = int(self.engine.settings.max_request_bytes)
        too_large = f"the request body is larger than {limit:,} bytes (SHITU_MAX_REQUEST_BYTES)"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if size > limit:
                await error_response(413, too_large)(scope, receive, send)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            body.extend(message.get("body", b""))
            if len(body) > limit:
                await error_response(413, too_large)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# --- error handlers --------------------------------------------------------------------------


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "request body"


def describe_validation(errors: list[dict[str, Any]]) -> tuple[int, str]:
    """Turn pydantic's error list into (status, one readable sentence)."""
    for err in errors:
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "")
            return 400, f"the request body is not valid JSON{f' ({reason})' if reason else ''}"
    if any(tuple(err.get("loc", ())) == ("body",) for err in errors):
        return 422, "the request body must be a JSON object, sent with 'Content-Type: application/json'"
    parts = [f"{_location(err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "invalid request: " + "; ".join(parts) + more


HTTP_STATUS: tuple[tuple[type[ShiTuError], int], ...] = (  # most specific first
    (NotFound, 404),
    (Conflict, 409),
    (TooLarge, 413),
    (Forbidden, 403),
    (Unauthorized, 401),
    (RateLimited, 429),
    (FetchTimeout, 408),
    (Unavailable, 503),
    (ShiTuError, 400),
)


def http_status(exc: ShiTuError) -> int:
    """The one place where the domain's error kinds become HTTP status codes."""
    return next(code for kind, code in HTTP_STATUS if isinstance(exc, kind))


def install_error_handlers(app: FastAPI) -> None:
    """Every failure becomes an ``{logId, errorCode, errorMsg}`` envelope with that HTTP status."""

    @app.exception_handler(ShiTuError)
    async def _shitu_error(request: Request, exc: ShiTuError) -> JSONResponse:
        status = http_status(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return error_response(status, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = describe_validation(list(exc.errors()))
        return error_response(status, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(StarterModelUnavailable)
    async def _no_models(request: Request, exc: StarterModelUnavailable) -> JSONResponse:
        return error_response(503, f"the recognition models are not available: {exc}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log_id = str(uuid.uuid4())
        log.exception("unexpected error in %s (logId %s)", request.url.path, log_id)
        return JSONResponse(
            {"logId": log_id, "errorCode": 500, "errorMsg": f"internal error ({type(exc).__name__}); see server log"},
            status_code=500,
        )


# --- the app ---------------------------------------------------------------------------------


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def create_api(engine: Engine | None = None, policy: AccessPolicy | None = None) -> FastAPI:
    """A FastAPI app serving ``engine``. Mount the Gradio UI on it at ``/`` if wanted.

    Routes are plain ``def`` functions, so FastAPI runs the blocking engine calls in its
    threadpool and the server keeps answering other requests meanwhile.
    """
    engine = engine or Engine()
    app = FastAPI(
        title="PP-ShiTuV2 image recognition API",
        description="PaddleX-compatible PP-ShiTuV2 serving endpoints (see docs/http_api.md).",
        version="1.0",
    )
    app.state.engine = engine
    app.add_middleware(BodySizeLimit, engine=engine)
    install_error_handlers(app)
    access = policy or AccessPolicy.for_server(engine.settings.api_token, engine.settings.read_only, host=None)
    app.state.access = access
    bearer = HTTPBearer(auto_error=False, description="Needed on changing endpoints when SHITU_API_TOKEN is set")

    def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        access.check(credentials.credentials if credentials else None, _client(request))

    mutating = {"dependencies": [Depends(require_token)], "responses": ERROR_RESPONSES}
    # the answer of a change: addedIds etc. only where asked for (returnIdMap=false)
    changing = {**mutating, "response_model": Envelope[IndexChangeResult], "response_model_exclude_none": True}

    @app.post("/shitu-index-build", response_model=Envelope[BuildIndexResult], tags=["PaddleX"], **mutating)
    def build_index(body: BuildIndexRequest) -> dict[str, Any]:
        """Build a new index from image/label pairs (PaddleX ``buildIndex``)."""
        key = body.indexKey or uuid.uuid4().hex
        batch = pairs_to_batch(body.imageLabelPairs, engine)
        report = engine.build(
            key, batch, index_type=body.indexType, metric_type=body.metricType, skip_invalid=False, adapt=body.adapt
        )
        return _ok(BuildIndexResult(indexKey=report.index, idMap=_id_map(report.id_map), imageCount=len(report.id_map)))

    @app.post("/shitu-index-add", tags=["PaddleX"], **changing)
    def add_images(body: AddImagesRequest) -> dict[str, Any]:
        """Append image/label pairs to an index (PaddleX ``addImagesToIndex``); ids are never reused."""
        engine.index(body.indexKey)  # unknown key: 404 before any image is fetched
        batch = pairs_to_batch(body.imageLabelPairs, engine)
        report = engine.add(body.indexKey, batch, skip_invalid=False)
        index = report.gallery
        if any(p.bbox is not None for p in body.imageLabelPairs):  # taught from results: keep the threshold true
            index = engine.keep_calibrated(body.indexKey)
        return _ok(_change_result(index, body.returnIdMap, addedIds=report.added_ids))

    @app.post("/shitu-index-remove", tags=["PaddleX"], **changing)
    def remove_images(body: RemoveImagesRequest) -> dict[str, Any]:
        """Remove entries by vector id (PaddleX ``removeImagesFromIndex``); unknown ids change nothing."""
        index = engine.remove(body.indexKey, body.ids)
        return _ok(_change_result(index, body.returnIdMap, removedIds=sorted(set(body.ids))))

    @app.post("/shitu-index-relabel", tags=["indices"], **changing)
    def relabel_images(body: RelabelImagesRequest) -> dict[str, Any]:
        """Give entries a new label, keeping their vectors and ids; an unknown id or an empty label
        changes nothing. (Not in PaddleX's API: there a relabel is a remove and an add.)"""
        index = engine.relabel(body.indexKey, body.ids, body.label)
        return _ok(_change_result(index, body.returnIdMap, changedIds=sorted(set(body.ids))))

    @app.post("/shitu-infer", response_model=Envelope[InferResult], tags=["PaddleX"], responses=ERROR_RESPONSES)
    def infer(body: InferRequest) -> Response:
        """Detect the main objects of an image and label each from the index (PaddleX ``infer``)."""
        engine.index(body.indexKey)  # unknown key: 404 before the image is fetched
        data = read_image_field(body.image, "image", engine)
        result = engine.recognize(
            data, body.indexKey, det_threshold=body.detThreshold, rec_threshold=body.recThreshold, rec_topk=body.topk
        )
        return _ok_now(result_to_infer(result, visualize=body.visualize is not False))

    listing = {"response_model": Envelope[IndexListing], "tags": ["indices"], "responses": ERROR_RESPONSES}

    @app.get("/shitu-index/{indexKey}", **listing)
    def list_index(
        indexKey: str,
        offset: int = Query(0, ge=0, description="Entries to skip (in id order)"),
        limit: int = Query(100, ge=1, le=10_000, description="Entries to return"),
    ) -> dict[str, Any]:
        """A page of an index's id → label map, with its size, type and feature model (only the
        page is read: the cost follows ``limit``, not the index)."""
        index = engine.index(indexKey)
        _, page = index.page(offset, limit, thumbnails=False)
        return _ok(
            IndexListing(
                indexKey=indexKey,
                imageCount=len(index),
                labelCount=len(index.label_counts()),
                indexType=index.index_type,
                metricType=index.metric_type,
                featureModel=index.feature_model,
                offset=offset,
                limit=limit,
                idMap={str(e.id): e.label for e in page},
            )
        )

    # --- quality report ---
    @app.get(
        "/shitu-index/{indexKey}/report",
        response_model=Envelope[dict[str, Any]],
        tags=["indices"],
        responses={**ERROR_RESPONSES, 200: {"description": "The report: JSON (default), an HTML page or a CSV table",
                                            "content": {"text/html": {}, "text/csv": {}}}},
    )  # fmt: skip
    def index_report(
        indexKey: str,
        fmt: Literal["json", "html", "csv"] = Query("json", alias="format", description="json, html or csv"),
        table: Literal["labels", "entries", "pairs"] = Query(
            "labels", alias="csv", description="With format=csv: labels, entries (flagged) or pairs (confused)"
        ),
        lang: Literal["en", "zh"] = Query("en", description="Language of the HTML page"),
    ) -> Any:
        """A quality report of the gallery, computed from its stored vectors (no model runs):
        leave-one-out recall@1/@5 overall and per label, most confused label pairs, suspected
        mislabelled entries, near duplicates, labels with too few images, the threshold curve
        and a 2-D map. Kept per index version, so asking again is free until the index changes."""
        report = engine.report(indexKey)
        if fmt == "html":
            return HTMLResponse(report.to_html(lang=lang), headers={"Content-Security-Policy": REPORT_CSP})
        if fmt == "csv":
            return Response(
                "\ufeff" + report.to_csv(table),  # the BOM lets spreadsheets read Chinese labels as UTF-8
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": attachment(f"{indexKey}-{table}.csv")},
            )
        return _ok({"indexKey": indexKey, **report.to_dict()})

    # --- calibration ---
    calibration_route = {"response_model": Envelope[CalibrationResult], "tags": ["indices"]}

    def calibration_result(key: str, index) -> dict[str, Any]:
        c = index.calibration
        return _ok(
            CalibrationResult(
                indexKey=key,
                imageCount=len(index),
                threshold=c.threshold if c else None,
                chosenBy=c.chosen_by if c else None,
                expected=OperatingPointModel(**vars(c.chosen)) if c else None,
                top1=c.top1 if c else None,
                protocol=c.protocol if c else None,
                knownQueries=c.known if c else 0,
                unknownQueries=c.unknown if c else 0,
                changesSince=index.changes_since_calibration,
                uncertainty=c.uncertainty if c else None,
                confirmedAnswers=len(c.taught) if c else 0,
                summary=c.describe() if c else None,
                evidence=c.evidence if c else None,
                adaptation=index.adaptation.to_dict() if index.adaptation else None,
                curve=[OperatingPointModel(**vars(p)) for p in c.points] if c else [],
            )
        )

    @app.get("/shitu-index/{indexKey}/calibration", responses=ERROR_RESPONSES, **calibration_route)
    def get_calibration(indexKey: str) -> dict[str, Any]:
        """The index's threshold curve (known objects accepted vs unknown objects rejected, per
        threshold), the threshold in use and what it promises."""
        return calibration_result(indexKey, engine.index(indexKey))

    @app.post("/shitu-index/{indexKey}/calibration", **calibration_route, **mutating)
    def recalibrate(indexKey: str, body: CalibrateRequest | None = None) -> dict[str, Any]:
        """Refit the projection and remeasure the curve on the index's current entries (after
        adds, removes and relabels; nothing is embedded again)."""
        return calibration_result(indexKey, engine.calibrate(indexKey, adapt=body.adapt if body else None))

    @app.post("/shitu-index/{indexKey}/threshold", **calibration_route, **mutating)
    def set_threshold(indexKey: str, body: ThresholdRequest) -> dict[str, Any]:
        """Make a point of the curve the index's own threshold (used when a request gives none)."""
        return calibration_result(indexKey, engine.set_threshold(indexKey, body.threshold))

    # --- index versions ---
    versions_route = {"tags": ["indices"], "responses": ERROR_RESPONSES}

    @app.get("/shitu-index/{indexKey}/versions", response_model=Envelope[IndexVersions], **versions_route)
    def list_versions(indexKey: str) -> dict[str, Any]:
        """Every kept version of an index, newest first, the current one included: each change
        (build, add, remove, relabel, import, restore) is a version."""
        versions = engine.versions(indexKey)
        return _ok(
            IndexVersions(
                indexKey=indexKey,
                current=next(v["version"] for v in versions if v["current"]),
                historyLimit=engine.settings.history_versions,
                versions=[_index_version(v) for v in versions],
            )
        )

    @app.get("/shitu-index/{indexKey}/versions/{version}", response_model=Envelope[VersionChanges], **versions_route)
    def version_changes(
        indexKey: str,
        version: int,
        against: int | None = Query(None, ge=0, description="Compare with this version (default: the one before)"),
        limit: int = Query(100, ge=0, le=10_000, description="Entries listed per kind of change"),
    ) -> dict[str, Any]:
        """What changed in a version: ids added, removed and relabelled (read from the id maps);
        ``against=0`` compares with an empty index, a newer ``against`` previews a restore."""
        return _ok(_version_changes(indexKey, engine.version_changes(indexKey, version, against, limit=limit)))

    @app.post(
        "/shitu-index/{indexKey}/versions/{version}/restore",
        response_model=Envelope[RestoreResult],
        tags=["indices"],
        **mutating,
    )
    def restore_version(indexKey: str, version: int) -> dict[str, Any]:
        """Make an earlier version current again, as a new version (so a restore can be undone)."""
        report = engine.restore(indexKey, version)
        return _ok(
            RestoreResult(
                indexKey=indexKey,
                version=report.summary["version"],
                restoredFrom=report.summary["restored_from"],
                idMap=_id_map(report.id_map),
                imageCount=len(report.id_map),
            )
        )

    models_route = {"response_model": Envelope[ModelsResult], "tags": ["models"], "responses": ERROR_RESPONSES}

    def _models_result() -> ModelsResult:
        return ModelsResult(
            active=engine.models(), recognitionModels=engine.recognition_models(),
            downloads=engine.model_download_status(),
        )  # fmt: skip

    @app.get("/shitu-models", **models_route)
    def list_models() -> dict[str, Any]:
        """The active models (and where they came from) and the recognition models to choose from."""
        return _ok(_models_result())

    @app.post("/shitu-models/recognition", dependencies=[Depends(require_token)], **models_route)
    def switch_recognition_model(body: SwitchModelRequest) -> dict[str, Any]:
        """Switch the recognition model (409/503 and no change when it is not available here).
        Indices built with another model must be rebuilt before they can be searched."""
        engine.switch_recognition_model(body.modelName)
        return _ok(_models_result())

    @app.get("/health", response_model=Envelope[HealthResult], tags=["service"])
    def health() -> dict[str, Any]:
        """Which models are active and which indices exist."""
        return _ok(
            HealthResult(
                status="ok",
                models=engine.models(),
                indices=engine.index_names(),
                activeIndex=engine.settings.default_index,
                modelDownloads=engine.model_download_status(),
                vectorStore=engine.vector_store,
            )
        )

    @app.api_route(
        "/shitu-{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
        include_in_schema=False,
    )  # fmt: skip
    @app.api_route("/health", methods=["POST", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False)
    def no_such_endpoint(request: Request) -> JSONResponse:
        """Unknown API paths and wrong methods answer in the envelope (not the mounted UI's 404)."""
        allowed: set[str] = set()
        for route in app.router.routes:
            if isinstance(route, APIRoute) and route.endpoint is not no_such_endpoint:
                match, _ = route.matches(request.scope)
                if match == Match.PARTIAL:
                    allowed |= set(route.methods or ())
        if allowed:
            methods = ", ".join(sorted(allowed))
            return error_response(405, f"{request.method} is not allowed on {request.url.path}; use {methods}",
                          {"Allow": methods})  # fmt: skip
        return error_response(404, f"not found: no endpoint {request.url.path} (see /docs)")

    return app


@contextlib.contextmanager
def serving(app: Any, host: str = "127.0.0.1", start_timeout: float = 120.0) -> Iterator[str]:
    """Run an ASGI app (the API, or ``app.build_app()``) under uvicorn on a free port in a thread;
    yields its base URL (with a trailing ``/``). For notebooks, tests and benchmarks."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def serve(engine: Engine | None = None, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Run the API alone with uvicorn (``shitu serve``), after preparing the sample index."""
    import uvicorn

    engine = engine or Engine()
    if engine.ensure_sample_index() is None:
        log.warning("the sample index could not be built; the API starts without it")
    policy = AccessPolicy.for_server(engine.settings.api_token, engine.settings.read_only, host)
    log.info("index changes: %s", policy.describe())

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets=sockets)
            engine.close()  # here: after a SIGTERM, uvicorn re-raises it once run() ends, ending the process

    try:
        Server(uvicorn.Config(create_api(engine, policy), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)).run()  # fmt: skip
    finally:
        engine.close()
