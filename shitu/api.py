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

import asyncio
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from shitu import net
from shitu.access import AccessPolicy
from shitu.config import Settings
from shitu.engine import ChangeReport, Engine
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
from shitu.limits import RequestLimits, server_config
from shitu.results import Recognition
from shitu.schemas import (
    ERROR_RESPONSES,
    AddImagesRequest,
    BuildIndexRequest,
    BuildIndexResult,
    CalibrateRequest,
    CalibrationResult,
    DetectedObject,
    Envelope,
    HealthResult,
    ImageLabelPair,
    IndexChangeResult,
    IndexListing,
    IndexVersion,
    IndexVersions,
    InferRequest,
    InferResult,
    ModelsResult,
    OperatingPointModel,
    RecResult,
    RelabelImagesRequest,
    RemoveImagesRequest,
    RestoreResult,
    SwitchModelRequest,
    ThresholdRequest,
    VersionChanges,
)

log = logging.getLogger(__name__)

API_PREFIX = "/shitu-"  # every route below except /health starts with it
FETCH_TIMEOUT = net.DEFAULT_TIMEOUT  # seconds per image URL (module-level so tests can shorten it)
FETCH_MAX_BYTES = net.DEFAULT_MAX_BYTES
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_DATA_URI_RE = re.compile(r"^data:[^,;]*(;[^,;]*)*;base64,", re.IGNORECASE)


def _change_result(report: ChangeReport, full: bool, **ids: list[int]) -> IndexChangeResult:
    if full:
        return IndexChangeResult(idMap=_id_map(report.id_map), imageCount=report.image_count)
    return IndexChangeResult(idMap=None, imageCount=report.image_count, **ids)


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


# the report page runs no script; its CJK glyphs come embedded
REPORT_CSP = "default-src 'none'; img-src data:; font-src data:; style-src 'unsafe-inline'"


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
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return error_response(status, exc.message, headers or None)

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
    # every route, Gradio's (mounted on this app later) too; refusals in the API's envelope
    app.add_middleware(RequestLimits, settings=engine.settings, refuse=error_response)
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
        engine.require(body.indexKey)  # unknown key: 404 before any image is fetched
        batch = pairs_to_batch(body.imageLabelPairs, engine)
        report = engine.add(body.indexKey, batch, skip_invalid=False)
        after = report
        if any(p.bbox is not None for p in body.imageLabelPairs):  # taught from results: keep the threshold true
            after = engine.keep_calibrated(body.indexKey)
        return _ok(_change_result(after, body.returnIdMap, addedIds=report.added_ids))

    @app.post("/shitu-index-remove", tags=["PaddleX"], **changing)
    def remove_images(body: RemoveImagesRequest) -> dict[str, Any]:
        """Remove entries by vector id (PaddleX ``removeImagesFromIndex``); unknown ids change nothing."""
        report = engine.remove(body.indexKey, body.ids)
        return _ok(_change_result(report, body.returnIdMap, removedIds=sorted(set(body.ids))))

    @app.post("/shitu-index-relabel", tags=["indices"], **changing)
    def relabel_images(body: RelabelImagesRequest) -> dict[str, Any]:
        """Give entries a new label, keeping their vectors and ids; an unknown id or an empty label
        changes nothing. (Not in PaddleX's API: there a relabel is a remove and an add.)"""
        report = engine.relabel(body.indexKey, body.ids, body.label)
        return _ok(_change_result(report, body.returnIdMap, changedIds=sorted(set(body.ids))))

    @app.post("/shitu-infer", response_model=Envelope[InferResult], tags=["PaddleX"], responses=ERROR_RESPONSES)
    def infer(body: InferRequest) -> Response:
        """Detect the main objects of an image and label each from the index (PaddleX ``infer``)."""
        engine.require(body.indexKey)  # unknown key: 404 before the image is fetched
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
        info, page = engine.info(indexKey), engine.entries(indexKey, offset, limit)
        return _ok(
            IndexListing(
                indexKey=indexKey,
                imageCount=info.entries,
                labelCount=info.labels,
                indexType=info.index_type,
                metricType=info.metric_type,
                featureModel=info.feature_model,
                offset=offset,
                limit=limit,
                idMap={str(e.id): e.label for e in page.entries},
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

    def calibration_result(key: str) -> dict[str, Any]:
        info = engine.info(key)
        c = info.calibration
        return _ok(
            CalibrationResult(
                indexKey=key,
                imageCount=info.entries,
                threshold=c.threshold if c else None,
                chosenBy=c.chosen_by if c else None,
                expected=OperatingPointModel(**vars(c.expected)) if c else None,
                top1=c.top1 if c else None,
                protocol=c.protocol if c else None,
                knownQueries=c.known_queries if c else 0,
                unknownQueries=c.unknown_queries if c else 0,
                changesSince=info.changes_since_calibration,
                uncertainty=c.uncertainty if c else None,
                confirmedAnswers=c.confirmed_answers if c else 0,
                summary=c.summary if c else None,
                evidence=c.evidence if c else None,
                adaptation=info.adaptation,
                curve=[OperatingPointModel(**vars(p)) for p in c.curve] if c else [],
            )
        )

    @app.get("/shitu-index/{indexKey}/calibration", responses=ERROR_RESPONSES, **calibration_route)
    def get_calibration(indexKey: str) -> dict[str, Any]:
        """The index's threshold curve (known objects accepted vs unknown objects rejected, per
        threshold), the threshold in use and what it promises."""
        return calibration_result(indexKey)

    @app.post("/shitu-index/{indexKey}/calibration", **calibration_route, **mutating)
    def recalibrate(indexKey: str, body: CalibrateRequest | None = None) -> dict[str, Any]:
        """Refit the projection and remeasure the curve on the index's current entries (after
        adds, removes and relabels; nothing is embedded again)."""
        engine.calibrate(indexKey, adapt=body.adapt if body else None)
        return calibration_result(indexKey)

    @app.post("/shitu-index/{indexKey}/threshold", **calibration_route, **mutating)
    def set_threshold(indexKey: str, body: ThresholdRequest) -> dict[str, Any]:
        """Make a point of the curve the index's own threshold (used when a request gives none)."""
        engine.set_threshold(indexKey, body.threshold)
        return calibration_result(indexKey)

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
                current=next(v.version for v in versions if v.current),
                historyLimit=engine.settings.history_versions,
                versions=[IndexVersion.model_validate(v) for v in versions],
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
        diff = engine.version_changes(indexKey, version, against, limit=limit)
        return _ok(VersionChanges.model_validate(diff).model_copy(update={"index": indexKey}))

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

    health_pool = ThreadPoolExecutor(1, thread_name_prefix="shitu-health")  # never behind the model queue

    @app.get("/health", response_model=Envelope[HealthResult], tags=["service"])
    async def health() -> dict[str, Any]:
        """Which models are active and which indices exist. Answered on the event loop (the index
        listing on a thread of its own), so a full request queue never makes it wait."""
        names = await asyncio.get_running_loop().run_in_executor(health_pool, engine.index_names)
        return _ok(
            HealthResult(
                status="ok",
                models=engine.models(),
                indices=names,
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
    settings = getattr(getattr(app, "state", None), "engine", None)
    settings = settings.settings if settings is not None else Settings.from_env()
    server = uvicorn.Server(server_config(app, settings, host=host, port=port, log_level="warning"))
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
        Server(server_config(create_api(engine, policy), engine.settings, host=host, port=port,
                             log_level=log_level, timeout_graceful_shutdown=5)).run()  # fmt: skip
    finally:
        engine.close()
