"""The HTTP API's request and answer bodies, in PaddleX's field names (camelCase) where PaddleX has the
route, so PaddleX clients work unchanged; the index, calibration and version answers are read off the
engine's read models (:mod:`shitu.views`) by :class:`FromEngine`."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AliasChoices, AliasGenerator, BaseModel, ConfigDict, Field, StrictInt, StringConstraints
from pydantic.alias_generators import to_camel

from shitu.adapt import ADAPT_MODES
from shitu.config import INDEX_TYPES, METRIC_TYPES, REC_MODELS

T = TypeVar("T")

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


class FromEngine(BaseModel):
    """An answer read off one of the engine's read models (:mod:`shitu.views`): fields named as the
    engine names them, sent in camelCase (the API's spelling), with a field's own alias where the
    API says it otherwise (PaddleX's ``imageCount`` for entries)."""

    model_config = ConfigDict(
        from_attributes=True,
        populate_by_name=True,
        alias_generator=AliasGenerator(
            validation_alias=lambda name: AliasChoices(name, to_camel(name)), serialization_alias=to_camel
        ),
    )


def renamed(name: str, api_name: str, **field: Any) -> Any:
    """Field ``name`` of the engine's model, sent as ``api_name`` (read back by either)."""
    return Field(serialization_alias=api_name, validation_alias=AliasChoices(name, api_name), **field)


class IndexVersion(FromEngine):
    version: int
    current: bool = Field(description="True for the version searched now")
    time: str | None = Field(description="When it was committed (UTC, ISO 8601)")
    action: str | None = Field(description="What made it: build, import, add 3, remove 2, relabel 1, restore v4, ...")
    entries: int | None = renamed("entries", "imageCount")
    labels: int | None = renamed("labels", "labelCount")
    feature_model: str | None
    index_type: str | None
    metric_type: str | None


class IndexVersions(BaseModel):
    indexKey: str
    current: int = Field(description="The current version's number")
    historyLimit: int = Field(description="How many earlier versions are kept (SHITU_HISTORY_VERSIONS)")
    versions: list[IndexVersion] = Field(description="Newest first, the current one included")


class EntryLabel(FromEngine):
    id: int
    label: str


class EntryRelabel(FromEngine):
    id: int
    old_label: str
    new_label: str


class VersionChanges(FromEngine):
    index: str = renamed("index", "indexKey")
    version: int
    against: int = Field(description="The version compared with (0: an empty index)")
    action: str | None
    time: str | None
    entries_before: int = renamed("entries_before", "imageCountBefore")
    entries_after: int = renamed("entries_after", "imageCount")
    added_count: int
    removed_count: int
    relabelled_count: int
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


