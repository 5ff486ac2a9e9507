"""The Gradio studio: Recognize / Build index / Manage index / Models & about.

Every handler is a module-level function whose first argument is the :class:`Engine`;
:func:`build_demo` binds them to one engine and wires them to components, so tests call the
same functions directly. User mistakes (:class:`ShiTuError`) become ``gr.Error`` toasts and
change nothing; all index state lives in the engine, the UI only keeps what is on screen.

Static text is translated in the browser with ``gr.I18n`` (:data:`I18N`, passed to
``gr.mount_gradio_app``); text that handlers produce follows the request's
``Accept-Language`` header.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from shitu.access import AccessPolicy
from shitu.config import INDEX_TYPES, METRIC_TYPES, REC_MODELS, WHOLE_IMAGE_MODES
from shitu.engine import ChangeReport, Engine
from shitu.errors import ShiTuError
from shitu.gallery import GalleryBatch, SkippedLine, pairs_from_uploads, read_zip_gallery
from shitu.ids import parse_ids
from shitu.results import Recognition
from shitu.ui_text import TEXT

MAX_TABLE_ROWS = 2000  # the entries table shows at most this many rows; filter by label for more
MAX_PREVIEWS = 48  # thumbnails in the preview gallery

I18N = gr.I18n(**TEXT)
CSS = """
#result-table td, #entries-table td { white-space: normal; }
"""


def lang_of(request: gr.Request | None) -> str:
    """``"zh"`` when the browser prefers Chinese, else ``"en"``."""
    if request is None:
        return "en"
    header = (request.headers.get("accept-language") or "").split(",")[0].strip().lower()
    return "zh" if header.startswith("zh") else "en"


def _t(lang: str, key: str, **values: Any) -> str:
    text = TEXT.get(lang, TEXT["en"]).get(key) or TEXT["en"][key]
    return text.format(**values) if values else text


def _md(text: Any) -> str:
    """User text (labels, file names) made safe for Markdown. Index names need no escaping
    (letters, digits, ``_.-`` only) and are shown in code spans, where escapes would show."""
    out = str(text)
    for ch in "\\`*_[]<>|#":
        out = out.replace(ch, "\\" + ch)
    return out


def user_errors(fn: Callable) -> Callable:
    """Show :class:`ShiTuError` as a toast (no stack trace); the engine has changed nothing."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ShiTuError as exc:
            raise gr.Error(exc.message, print_exception=False) from None

    return wrapper


def _bind(fn: Callable, engine: Engine) -> Callable:
    """``fn`` with the engine filled in, keeping the signature and type hints Gradio reads
    (``gr.Request``, ``gr.SelectData``, ``gr.Progress``); ``functools.partial`` would lose them."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def bound(*args: Any, **kwargs: Any) -> Any:
        return fn(engine, *args, **kwargs)

    bound.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])  # type: ignore[attr-defined]
    return bound


def _progress_callback(progress: gr.Progress | None) -> Callable[[int, int, str], None] | None:
    if progress is None:
        return None

    def report(done: int, total: int, what: str) -> None:
        progress((done, total), desc=what)

    return report


_SCRATCH: Path | None = None


def _scratch_file(filename: str) -> Path:
    """A fresh path for a file handed to the browser (Gradio copies it into its cache);
    files older than an hour are cleared away."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="shitu-ui-"))
    cutoff = time.time() - 3600
    for old in _SCRATCH.iterdir():
        if old.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)
    folder = _SCRATCH / uuid.uuid4().hex
    folder.mkdir()
    return folder / filename


def _index_dropdown(engine: Engine, value: str | None = None) -> dict[str, Any]:
    names = engine.index_names()
    wanted = value or engine.settings.default_index
    return gr.update(choices=names, value=wanted if wanted in names else (names[0] if names else None))


# --- Recognize ------------------------------------------------------------------------------
def threshold_for_index(engine: Engine, name: str | None) -> dict[str, Any]:
    """The recognition-threshold slider follows the chosen index: a whitened index suggests
    its own threshold (its similarities are on another scale)."""
    try:
        return gr.update(value=engine.rec_threshold_for(engine.index(name)))
    except ShiTuError:
        return gr.update()


@user_errors
def recognize_image(
    engine: Engine,
    image: Any,
    index_name: str | None = None,
    det_threshold: float | None = None,
    rec_threshold: float | None = None,
    topk: int | None = None,
    whole_image: str | None = None,
    use_nms: bool = True,
    nms_iou: float = 0.5,
    request: gr.Request | None = None,
) -> tuple[Image.Image, pd.DataFrame, str, str]:
    """Recognise one image; returns (drawn image, table of boxes, timings markdown, JSON file path)."""
    if image is None:
        raise ShiTuError("upload, paste or take a picture first")
    lang = lang_of(request)
    result = engine.recognize(
        image,
        index=index_name or None,
        bgr=False,
        det_threshold=None if det_threshold is None else float(det_threshold),
        rec_threshold=None if rec_threshold is None else float(rec_threshold),
        rec_topk=None if topk is None else int(topk),
        whole_image=whole_image or None,
        nms_iou=float(nms_iou) if use_nms else None,
    )
    path = _scratch_file("shitu_result.json")
    path.write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
    return result.render(), result_table(result, lang), timings_markdown(result, lang), str(path)


def result_table(result: Recognition, lang: str = "en") -> pd.DataFrame:
    """One row per box; unrecognised boxes say so (never ``None``)."""
    rows = []
    for n, obj in enumerate(result.objects, start=1):
        if obj.whole_image:
            detector = _t(lang, "whole_image_box")
        else:
            detector = f"{obj.det_label or '?'} {obj.det_score:.2f}"
        rows.append(
            {
                _t(lang, "col_box"): n,
                _t(lang, "col_label"): obj.label if obj.recognized else _t(lang, "unrecognised"),
                _t(lang, "col_score"): f"{obj.score:.3f}" if obj.recognized else "—",
                _t(lang, "col_topk"): "; ".join(f"{lab} {s:.3f}" for lab, s in zip(obj.labels, obj.scores)) or "—",
                _t(lang, "col_bbox"): ", ".join(str(round(float(v))) for v in obj.bbox),
                _t(lang, "col_detector"): detector,
            }
        )
    columns = [_t(lang, k) for k in ("col_box", "col_label", "col_score", "col_topk", "col_bbox", "col_detector")]
    return pd.DataFrame(rows, columns=columns)


def timings_markdown(result: Recognition, lang: str = "en") -> str:
    stages = " · ".join(
        f"{TEXT[lang].get('stage_' + stage, stage)} {seconds * 1000:.0f} ms"
        for stage, seconds in result.timings.items()
    )
    total = sum(result.timings.values()) * 1000
    found = _t(
        lang,
        "found",
        boxes=len(result.objects),
        recognised=sum(o.recognized for o in result.objects),
        index=result.index_name,
    )
    return f"{found}  \n{stages} · **{_t(lang, 'total')} {total:.0f} ms**"


# --- Build index ----------------------------------------------------------------------------
def _paths(files: Any) -> list[Path]:
    if files is None:
        return []
    if isinstance(files, (str, Path)):
        files = [files]
    return [Path(getattr(f, "name", f)) for f in files if f]


def gallery_from_uploads(files: Any, label_file: Any = None) -> GalleryBatch:
    """Uploaded images + label file, or one .zip (with or without a label file), as a batch.

    A ``.txt`` among the images is taken as the label file when none is given separately.
    Browsers upload files without their folders, so two files with one name are refused.
    """
    paths = _paths(files)
    label_path = _paths(label_file)[0] if _paths(label_file) else None
    if label_path is None:
        texts = [p for p in paths if p.suffix.lower() == ".txt"]
        if len(texts) == 1:
            label_path = texts[0]
    paths = [p for p in paths if p != label_path]
    if not paths:
        raise ShiTuError("no gallery files were uploaded: add the images (or one .zip) first")
    label_bytes = _read_upload(label_path) if label_path else None
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    if zips:
        if len(paths) > 1:
            raise ShiTuError("upload either one .zip or image files, not both")
        batch = read_zip_gallery(str(zips[0]), label_bytes)
    else:
        if label_bytes is None:
            raise ShiTuError("the label file is missing: upload gallery.txt (one `path label` per line)")
        repeated = sorted(name for name, count in Counter(p.name for p in paths).items() if count > 1)
        if repeated:
            raise ShiTuError(
                f"{len(repeated)} file name(s) were uploaded more than once ({', '.join(repeated[:5])}); uploads lose "
                "their folders, so upload the gallery as one .zip instead"
            )
        batch = pairs_from_uploads([(p.name, p) for p in paths], label_bytes)
    if not batch.items:
        reasons = "; ".join(str(s) for s in batch.skipped[:5])
        raise ShiTuError("no image/label pairs could be used" + (f": {reasons}" if reasons else ""))
    return batch


def _read_upload(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ShiTuError(f"cannot read the uploaded file {path.name}: {exc.strerror}") from exc


def change_summary(engine: Engine, report: ChangeReport, lang: str = "en", *, built: bool) -> str:
    """Markdown: what a build or add did, with every skipped line and its reason."""
    stats = report.summary
    head = _t(lang, "built" if built else "added", name=report.index, added=len(report.added_ids))
    lines = [
        head,
        _t(lang, "index_stats", **{k: stats.get(k) for k in ("entries", "labels", "index_type", "metric_type")}),
    ]
    counts = engine.index(report.index).label_counts()
    shown = ", ".join(f"{_md(label)} ({n})" for label, n in sorted(counts.items())[:40])
    lines.append(_t(lang, "labels_line", labels=shown + (" …" if len(counts) > 40 else "")))
    if report.skipped:
        lines.append(_t(lang, "skipped", n=len(report.skipped)))
        lines.append("\n".join(_skipped_item(s) for s in report.skipped[:200]))
    else:
        lines.append(_t(lang, "no_skipped"))
    if built:
        lines.append(_t(lang, "try_it"))
    return "\n\n".join(lines)


def _skipped_item(skipped: SkippedLine) -> str:
    plain = skipped.source.replace("`", "'")
    source = f"`{plain}`" if plain else ""
    where = f"line {skipped.line_no} {source}" if skipped.line_no is not None else source
    return f"- {where.strip()}: {_md(skipped.reason)}"


@user_errors
def build_index(
    engine: Engine,
    files: Any,
    label_file: Any,
    name: str,
    index_type: str = "Flat",
    metric_type: str = "IP",
    skip_invalid: bool = True,
    overwrite: bool = False,
    whiten: bool = False,
    request: gr.Request | None = None,
    progress: gr.Progress = gr.Progress(),
) -> tuple[str, dict, dict]:
    """Build a named index from uploads and make it active; returns (summary markdown,
    Recognize index dropdown, Manage index dropdown)."""
    batch = gallery_from_uploads(files, label_file)
    report = engine.build(
        name,
        batch,
        index_type=index_type,
        metric_type=metric_type,
        overwrite=bool(overwrite),
        skip_invalid=bool(skip_invalid),
        progress=_progress_callback(progress),
        whiten=bool(whiten),
    )
    summary = change_summary(engine, report, lang_of(request), built=True)
    return summary, _index_dropdown(engine, report.index), _index_dropdown(engine, report.index)


# --- Manage index ---------------------------------------------------------------------------
def entries_table(engine: Engine, name: str | None, labels: list[str] | None = None, lang: str = "en") -> pd.DataFrame:
    """Entries of an index (optionally only some labels), at most :data:`MAX_TABLE_ROWS` rows."""
    wanted = set(labels or [])
    rows = [(e.id, e.label, e.source) for e in engine.index(name).entries if not wanted or e.label in wanted]
    columns = [_t(lang, "col_id"), _t(lang, "col_label"), _t(lang, "col_source")]
    return pd.DataFrame(rows[:MAX_TABLE_ROWS], columns=columns)


def previews(engine: Engine, name: str | None, ids: list[int]) -> list[tuple[Image.Image, str]]:
    """Thumbnails with ``#id label`` captions (entries without a stored thumbnail are left out)."""
    index = engine.index(name)
    out = []
    for id_ in ids:
        try:
            entry = index.entry(id_)
        except ShiTuError:
            continue
        if entry.thumbnail:
            out.append((Image.open(io.BytesIO(entry.thumbnail)), f"#{entry.id} {entry.label}"))
        if len(out) >= MAX_PREVIEWS:
            break
    return out


def index_info(engine: Engine, name: str | None, lang: str = "en", shown: int | None = None) -> str:
    index = engine.index(name)
    stats = index.summary()
    text = _t(
        lang,
        "info",
        name=name or engine.settings.default_index,
        entries=stats["entries"],
        labels=stats["labels"],
        index_type=stats["index_type"],
        metric_type=stats["metric_type"],
        dim=stats["dim"],
        model=stats["feature_model"] or "?",
    )
    if shown is not None and shown < stats["entries"]:
        text += "  \n" + _t(lang, "showing", shown=shown, total=stats["entries"])
    if not engine.compatible(index):
        text += "  \n" + _t(lang, "incompatible")
    return text


def _label_choices(engine: Engine, name: str | None) -> dict[str, Any]:
    counts = engine.index(name).label_counts()
    return gr.update(choices=[(f"{label} ({n})", label) for label, n in sorted(counts.items())], value=[])


def _view(engine: Engine, name: str | None, labels: list[str] | None, selected: str | None, lang: str):
    """(info markdown, entries table, previews) for what the Manage tab shows."""
    table = entries_table(engine, name, labels, lang)
    ids = parse_ids(selected or "", allow_empty=True) or [int(i) for i in table.iloc[:, 0].tolist()]  # the id column
    return index_info(engine, name, lang, shown=len(table)), table, previews(engine, name, ids)


@user_errors
def open_index(engine: Engine, name: str | None, request: gr.Request | None = None):
    """Make ``name`` the active index and show it: (info, table, label filter, previews, selected ids)."""
    lang = lang_of(request)
    if not name:  # e.g. the last index was just deleted
        empty = pd.DataFrame(columns=[_t(lang, "col_id"), _t(lang, "col_label"), _t(lang, "col_source")])
        return _t(lang, "no_indices"), empty, gr.update(choices=[], value=[]), [], ""
    engine.index(name)  # must exist
    info, table, thumbs = _view(engine, name, None, None, lang)
    return info, table, _label_choices(engine, name), thumbs, ""


@user_errors
def filter_entries(
    engine: Engine,
    name: str | None,
    labels: list[str] | None,
    selected: str | None = None,
    request: gr.Request | None = None,
):
    """Re-show the entries table for some labels: (info, table, previews)."""
    return _view(engine, name, labels, selected, lang_of(request))


@user_errors
def clear_selection(engine: Engine, name: str | None, labels: list[str] | None, request: gr.Request | None = None):
    """Forget the selected rows: (selected ids, info, table, previews)."""
    return "", *_view(engine, name, labels, None, lang_of(request))


@user_errors
def toggle_selection(
    engine: Engine, name: str | None, selected: str | None, labels: list[str] | None, evt: gr.SelectData
):
    """A click on a table row adds its id to the selection, or takes it out: (ids text, previews).
    With nothing selected, the previews show the rows in the table again."""
    row = evt.row_value or []
    if not row:
        return selected or "", gr.update()
    clicked = int(row[0])
    ids = parse_ids(selected or "", allow_empty=True)
    ids = [i for i in ids if i != clicked] if clicked in ids else [*ids, clicked]
    shown = ids or [int(i) for i in entries_table(engine, name, labels).iloc[:, 0].tolist()]
    return ", ".join(map(str, ids)), previews(engine, name, shown)


@user_errors
def remove_entries(
    engine: Engine,
    name: str | None,
    selected: str | None,
    labels: list[str] | None = None,
    request: gr.Request | None = None,
):
    """Remove the selected ids: (status, info, table, previews, selected ids cleared)."""
    ids = parse_ids(selected or "", allow_empty=True)
    if not ids:
        raise ShiTuError("select rows in the table (or type ids) to remove first")
    engine.remove(name, ids)
    lang = lang_of(request)
    info, table, thumbs = _view(engine, name, labels, None, lang)
    status = _t(lang, "removed", n=len(ids), name=name, ids=", ".join(map(str, ids)))
    return status, info, table, thumbs, ""


@user_errors
def add_entries(
    engine: Engine,
    name: str | None,
    files: Any,
    label_file: Any,
    skip_invalid: bool = True,
    request: gr.Request | None = None,
    progress: gr.Progress = gr.Progress(),
):
    """Append uploads to an index: (summary, info, table, label filter, previews)."""
    batch = gallery_from_uploads(files, label_file)
    report = engine.add(name, batch, skip_invalid=bool(skip_invalid), progress=_progress_callback(progress))
    lang = lang_of(request)
    info, table, thumbs = _view(engine, name, None, None, lang)
    return change_summary(engine, report, lang, built=False), info, table, _label_choices(engine, name), thumbs


@user_errors
def rename_index(engine: Engine, name: str | None, new_name: str, request: gr.Request | None = None):
    """Rename an index: (status, Manage dropdown, Recognize dropdown)."""
    if not name:
        raise ShiTuError("no index is selected")
    new = (new_name or "").strip()
    engine.rename(name, new)
    status = _t(lang_of(request), "renamed", old=name, new=new)
    return status, _index_dropdown(engine, new), _index_dropdown(engine, new)


@user_errors
def delete_index(engine: Engine, name: str | None, confirm: bool, request: gr.Request | None = None):
    """Delete an index once confirmed: (status, Manage dropdown, Recognize dropdown, confirm box reset)."""
    if not name:
        raise ShiTuError("no index is selected")
    if not confirm:
        raise ShiTuError(f"tick the confirmation box to delete {name!r}")
    engine.delete(name)
    status = _t(lang_of(request), "deleted", name=name)
    return status, _index_dropdown(engine), _index_dropdown(engine), False


@user_errors
def export_index(engine: Engine, name: str | None, request: gr.Request | None = None):
    """Write the index as a .zip: (status, download button with the file)."""
    if not name:
        raise ShiTuError("no index is selected")
    data = engine.export_zip(name)
    path = _scratch_file(f"{name}.zip")
    path.write_bytes(data)
    return _t(lang_of(request), "exported", name=name), gr.update(value=str(path), visible=True)


@user_errors
def import_index(engine: Engine, file: Any, name: str, overwrite: bool = False, request: gr.Request | None = None):
    """Import an index .zip under ``name`` (default: the file's name): (status, dropdowns)."""
    paths = _paths(file)
    if not paths:
        raise ShiTuError("no .zip was uploaded")
    name = (name or "").strip() or paths[0].stem
    index = engine.import_zip(name, _read_upload(paths[0]), overwrite=bool(overwrite))
    stats = index.summary()
    status = _t(lang_of(request), "imported", name=name, entries=stats["entries"], labels=stats["labels"])
    return status, _index_dropdown(engine, name), _index_dropdown(engine, name)


# --- Models & about ---------------------------------------------------------------------------
def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _device(engine: Engine) -> str:
    configured = engine.models().get("device") or "auto"
    try:
        import paddle

        return f"{paddle.device.get_device()} (setting: {configured})"
    except Exception:  # noqa: BLE001 - the page must render even if paddle cannot say
        return str(configured)


@user_errors
def models_markdown(engine: Engine, request: gr.Request | None = None) -> str:
    """Which models run and why, the device, library versions and every index's statistics."""
    lang = lang_of(request)
    models = engine.models()
    lines = [_t(lang, "models_header")]
    for stage in ("detection", "recognition"):
        info = models.get(stage) or {}
        where = f" — `{info['model_dir']}`" if info.get("model_dir") else ""
        lines.append(
            f"- **{_t(lang, 'stage_' + stage)}**: `{info.get('model_name')}`, "
            f"{TEXT[lang].get('source_' + str(info.get('source')), info.get('source'))}{where}  \n"
            f"  {_md(info.get('reason', ''))}"
        )
    versions = {
        "paddlex": _version("paddlex"),
        "paddlepaddle": _version("paddlepaddle", "paddlepaddle-gpu"),
        "faiss": _version("faiss-cpu", "faiss-gpu", "faiss"),
        "gradio": _version("gradio"),
    }
    lines.append(f"- **{_t(lang, 'device')}**: {_device(engine)}")
    lines.append(f"- **{_t(lang, 'versions')}**: " + " · ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append(_t(lang, "indices_header"))
    lines.extend(_download_lines(engine.model_download_status(), lang))
    names = engine.index_names()
    if not names:
        lines.append(_t(lang, "no_indices"))
    else:
        lines.append(_t(lang, "indices_table") + "\n|---|---|---|---|---|---|---|---|")
        for name in names:
            try:
                index = engine.index(name)
            except ShiTuError as exc:
                lines.append(f"| {_md(name)} | — | — | — | — | — | {_md(exc.message)} | |")
                continue
            s = index.summary()
            ok = _t(lang, "usable") if engine.compatible(index) else "⚠️ " + _t(lang, "rebuild")
            active = " ★" if name == engine.settings.default_index else ""
            lines.append(
                f"| {_md(name)}{active} | {s['entries']} | {s['labels']} | {s['index_type']} | "
                f"{s['metric_type']} | {s['dim']} | `{s['feature_model']}` | {ok} |"
            )
    return "\n".join(lines)


def recognition_models_table(engine: Engine) -> str:
    """Size, accuracy and speed of the three official recognisers (PaddleX's published figures)."""
    rows = [
        "| model | size | AliProducts recall@1 | GPU (T4) | CPU (8 threads) |",
        "|---|---|---|---|---|",
    ]
    for m in engine.recognition_models():
        size = f"{m['size_mb'] / 1000:.2f} GB" if m["size_mb"] >= 1000 else f"{m['size_mb']:.0f} MB"
        name = f"**{m['name']}** ✓" if m["active"] else m["name"]
        rows.append(f"| {name} | {size} | {m['recall_at_1']:.1f} % | {m['gpu_ms']:.0f} ms | {m['cpu_ms']:.0f} ms |")
    return "\n".join(rows) + "\n\nPaddleX's published figures; offline, the starter pack stands in for them."


def _download_lines(status: dict[str, Any], lang: str) -> list[str]:
    """The background download of official weights, as the Models tab shows it."""
    state = status.get("state")
    if not state or state in ("idle", "nothing to do"):
        return []
    lines = [_t(lang, "downloads_header")]
    for name, model in (status.get("models") or {}).items():
        done, total = model.get("done") or 0, model.get("total") or 0
        if model.get("state") == "downloading":
            size = f"{done / 1e6:.0f} / {total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
            lines.append(f"- ⏳ `{name}`: {size} — " + _t(lang, "starter_meanwhile"))
        else:
            reason = f" — {_md(model['reason'])}" if model.get("reason") else ""
            lines.append(f"- `{name}`: {_md(model.get('state', ''))}{reason}")
    if state == "switched":
        lines.append(_t(lang, "now_official"))
        stale = [name for name, same in (status.get("indices") or {}).items() if not same]
        if stale:
            lines.append(_t(lang, "reembed", names=", ".join(f"`{n}`" for n in stale)))
    elif state == "failed":
        lines.append(_t(lang, "official_failed", reason=_md(status.get("reason") or "")))
    return lines


def refresh_models(engine: Engine, request: gr.Request | None = None):
    """Timer tick while a download runs: (models markdown, timer on/off)."""
    running = bool(engine.model_download_status().get("running"))
    return models_markdown(engine, request), gr.Timer(active=running)


@user_errors
def switch_model(engine: Engine, model_name: str, request: gr.Request | None = None):
    """Switch the recognition model: (models markdown, recognition threshold slider)."""
    if model_name not in REC_MODELS:
        raise ShiTuError(f"unknown recognition model {model_name!r}")
    engine.switch_recognition_model(model_name)
    return models_markdown(engine, request), gr.update(value=engine.default_rec_threshold)


# --- layout ---------------------------------------------------------------------------------
class SessionAccess:
    """Which browser sessions have signed in (kept on the server, keyed by Gradio's session)."""

    def __init__(self, policy: AccessPolicy):
        self.policy = policy
        self._signed_in: set[str] = set()

    def allowed(self, request: gr.Request | None) -> bool:
        return self.policy.open or (request is not None and request.session_hash in self._signed_in)

    def guard(self, fn: Callable) -> Callable:
        """``fn`` (a bound handler with a ``request`` parameter) refused unless changes are allowed."""
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            request = signature.bind_partial(*args, **kwargs).arguments.get("request")
            if not self.allowed(request):
                try:
                    self.policy.check(None)
                except ShiTuError as exc:
                    raise gr.Error(exc.message, print_exception=False) from None
            return fn(*args, **kwargs)

        guarded.__signature__ = signature  # type: ignore[attr-defined]
        return guarded

    def sign_in(self, password: str, request: gr.Request | None = None) -> str:
        client = request.client.host if request is not None and request.client else "?"
        try:
            self.policy.sign_in(password or "", client)
        except ShiTuError as exc:
            raise gr.Error(exc.message, print_exception=False) from None
        if request is not None:
            self._signed_in.add(request.session_hash)
        return _t(lang_of(request), "signed_in")

    def sign_out(self, request: gr.Request | None = None) -> str:
        if request is not None:
            self._signed_in.discard(request.session_hash)
        return _t(lang_of(request), "signed_out")


def build_demo(engine: Engine, policy: AccessPolicy | None = None) -> gr.Blocks:
    """The four-tab studio over ``engine``. Mount it with ``i18n=I18N, css=CSS`` (see app.py).

    ``policy`` decides who may change indices (default: open, as on a private laptop)."""
    access = SessionAccess(policy or AccessPolicy(token=None, restricted=False))

    def bind(fn: Callable) -> Callable:
        return _bind(fn, engine)

    def change(fn: Callable) -> Callable:  # a handler that changes something: sign-in may be needed
        return access.guard(_bind(fn, engine))

    example_paths = engine.sample_queries()
    example_paths = sorted(example_paths, key=lambda p: "two_objects" not in p.name)  # the richest first
    config = engine.config
    names = engine.index_names()
    default = engine.settings.default_index
    active = default if default in names else (names[0] if names else None)

    with gr.Blocks(title="PP-ShiTuV2 Studio", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(I18N("title"))
        gr.Markdown(I18N("intro"))
        if access.policy.restricted and not access.policy.token:
            gr.Markdown(I18N("read_only_notice"), elem_id="read-only-notice")
        elif access.policy.restricted:
            with gr.Accordion(I18N("sign_in_section"), open=False, elem_id="sign-in"):
                with gr.Row():
                    password = gr.Textbox(label=I18N("access_token"), type="password", max_lines=1, scale=3)
                    sign_in_btn = gr.Button(I18N("sign_in_btn"), scale=1)
                    sign_out_btn = gr.Button(I18N("sign_out_btn"), scale=1)
                sign_in_status = gr.Markdown(elem_id="sign-in-status")
            sign_in_btn.click(access.sign_in, password, sign_in_status, api_name="sign_in")
            password.submit(access.sign_in, password, sign_in_status, api_visibility="private")
            sign_out_btn.click(access.sign_out, None, sign_in_status, api_name="sign_out")
        with gr.Tabs():
            # ---------------------------------------------------------------- Recognize
            with gr.Tab(I18N("tab_recognize"), id="recognize") as tab_recognize:
                with gr.Row():
                    with gr.Column(scale=1):
                        query = gr.Image(
                            label=I18N("query_image"),
                            sources=["upload", "webcam", "clipboard"],
                            type="numpy",
                            height=360,
                            elem_id="query-image",
                        )
                        rec_index = gr.Dropdown(names, value=active, label=I18N("index_to_search"), elem_id="rec-index")
                        recognize_btn = gr.Button(I18N("recognize_btn"), variant="primary")
                        with gr.Accordion(I18N("options"), open=False):
                            det_threshold = gr.Slider(
                                0.05,
                                0.95,
                                value=engine.default_det_threshold,
                                step=0.01,
                                label=I18N("det_threshold"),
                                info=I18N("det_threshold_info"),
                            )
                            rec_threshold = gr.Slider(
                                0.0,
                                1.0,
                                value=threshold_for_index(engine, active).get("value", engine.default_rec_threshold),
                                step=0.01,
                                label=I18N("rec_threshold"),
                                info=I18N("rec_threshold_info"),
                            )
                            topk = gr.Slider(1, 10, value=config.rec_topk, step=1, label=I18N("topk"))
                            whole_image = gr.Radio(
                                list(WHOLE_IMAGE_MODES),
                                value=config.whole_image,
                                label=I18N("whole_image"),
                                info=I18N("whole_image_info"),
                            )
                            use_nms = gr.Checkbox(value=config.nms_iou is not None, label=I18N("use_nms"))
                            nms_iou = gr.Slider(
                                0.05, 0.95, value=config.nms_iou or 0.5, step=0.05, label=I18N("nms_iou")
                            )
                    with gr.Column(scale=1):
                        result_image = gr.Image(
                            label=I18N("result_image"),
                            type="pil",
                            format="jpeg",
                            interactive=False,
                            height=420,
                            elem_id="result-image",
                        )
                        timings = gr.Markdown(elem_id="timings")
                        result_json = gr.File(label=I18N("result_json"), interactive=False, height=60)
                examples = gr.Examples(
                    [[str(p)] for p in example_paths], inputs=[query], label=I18N("examples"), examples_per_page=8
                )
                result_table_df = gr.Dataframe(
                    label=I18N("result_table"), interactive=False, wrap=True, elem_id="result-table"
                )
            # ---------------------------------------------------------------- Build index
            with gr.Tab(I18N("tab_build"), id="build"):
                gr.Markdown(I18N("build_help"))
                with gr.Row():
                    build_files = gr.File(
                        label=I18N("gallery_files"),
                        file_count="multiple",
                        file_types=["image", ".zip", ".txt"],
                        height=220,
                        elem_id="build-files",
                    )
                    build_labels = gr.File(
                        label=I18N("label_file"),
                        file_count="single",
                        file_types=[".txt"],
                        height=220,
                        elem_id="build-labels",
                    )
                with gr.Row():
                    build_name = gr.Textbox(
                        label=I18N("index_name"), value="my_gallery", max_lines=1, elem_id="build-name"
                    )
                    build_type = gr.Radio(list(INDEX_TYPES), value="Flat", label=I18N("index_type"))
                    build_metric = gr.Radio(list(METRIC_TYPES), value="IP", label=I18N("metric_type"))
                with gr.Row():
                    build_skip = gr.Checkbox(value=True, label=I18N("skip_invalid"))
                    build_overwrite = gr.Checkbox(value=False, label=I18N("overwrite"))
                    build_whiten = gr.Checkbox(value=False, label=I18N("whiten"))
                build_btn = gr.Button(I18N("build_btn"), variant="primary", elem_id="build-btn")
                build_summary = gr.Markdown(elem_id="build-summary")
            # ---------------------------------------------------------------- Manage index
            with gr.Tab(I18N("tab_manage"), id="manage") as tab_manage:
                with gr.Row():
                    manage_index = gr.Dropdown(
                        names, value=active, label=I18N("active_index"), scale=3, elem_id="manage-index"
                    )
                    label_filter = gr.Dropdown([], multiselect=True, label=I18N("filter_labels"), scale=3)
                    refresh_btn = gr.Button(I18N("refresh"), scale=1)
                info = gr.Markdown(elem_id="manage-info")
                with gr.Row():
                    with gr.Column(scale=3):
                        entries = gr.Dataframe(
                            label=I18N("entries"), interactive=False, max_height=420, elem_id="entries-table"
                        )
                    with gr.Column(scale=2):
                        thumbs = gr.Gallery(
                            label=I18N("previews"), columns=4, height=420, allow_preview=True, elem_id="previews"
                        )
                with gr.Row():
                    selected = gr.Textbox(label=I18N("selected_ids"), max_lines=1, scale=4, elem_id="selected-ids")
                    remove_btn = gr.Button(I18N("remove_btn"), variant="stop", scale=1, elem_id="remove-btn")
                    clear_btn = gr.Button(I18N("clear_btn"), scale=1)
                manage_status = gr.Markdown(elem_id="manage-status")
                with gr.Accordion(I18N("add_section"), open=False):
                    with gr.Row():
                        add_files = gr.File(
                            label=I18N("gallery_files"),
                            file_count="multiple",
                            file_types=["image", ".zip", ".txt"],
                            height=160,
                        )
                        add_labels = gr.File(label=I18N("label_file"), file_types=[".txt"], height=160)
                    add_skip = gr.Checkbox(value=True, label=I18N("skip_invalid"))
                    add_btn = gr.Button(I18N("add_btn"), variant="primary")
                with gr.Accordion(I18N("rename_section"), open=False):
                    with gr.Row():
                        new_name = gr.Textbox(label=I18N("new_name"), max_lines=1)
                        rename_btn = gr.Button(I18N("rename_btn"))
                    with gr.Row():
                        confirm_delete = gr.Checkbox(value=False, label=I18N("confirm_delete"))
                        delete_btn = gr.Button(I18N("delete_btn"), variant="stop")
                with gr.Accordion(I18N("transfer_section"), open=False):
                    with gr.Row():
                        export_btn = gr.Button(I18N("export_btn"))
                        download_btn = gr.DownloadButton(I18N("download_btn"), visible=False)
                    with gr.Row():
                        import_file = gr.File(label=I18N("import_file"), file_types=[".zip"], height=120)
                        with gr.Column():
                            import_name = gr.Textbox(label=I18N("import_name"), max_lines=1)
                            import_overwrite = gr.Checkbox(value=False, label=I18N("overwrite"))
                            import_btn = gr.Button(I18N("import_btn"))
            # ---------------------------------------------------------------- Models & about
            with gr.Tab(I18N("tab_models"), id="models") as tab_models:
                models_md = gr.Markdown(elem_id="models-info")
                with gr.Row():
                    rec_model = gr.Dropdown(
                        list(REC_MODELS),
                        value=config.recognition.model_name,
                        label=I18N("rec_model"),
                        info=I18N("switch_info"),
                        scale=3,
                    )
                    switch_btn = gr.Button(I18N("switch_btn"), scale=1)
                gr.Markdown(recognition_models_table(engine), elem_id="rec-models-table")

        # ---------------------------------------------------------------- events
        rec_inputs = [query, rec_index, det_threshold, rec_threshold, topk, whole_image, use_nms, nms_iou]
        rec_outputs = [result_image, result_table_df, timings, result_json]
        recognize_btn.click(bind(recognize_image), rec_inputs, rec_outputs, api_name="recognize")
        examples.load_input_event.then(bind(recognize_image), rec_inputs, rec_outputs, api_visibility="undocumented")
        # index choices are per visitor: refreshing the list keeps this visitor's choice
        keep = lambda current: _index_dropdown(engine, current)  # noqa: E731
        tab_recognize.select(keep, rec_index, rec_index, api_visibility="private")
        rec_index.change(bind(threshold_for_index), rec_index, rec_threshold, api_visibility="private")

        build_btn.click(
            change(build_index),
            [
                build_files,
                build_labels,
                build_name,
                build_type,
                build_metric,
                build_skip,
                build_overwrite,
                build_whiten,
            ],
            [build_summary, rec_index, manage_index],
            api_name="build_index",
        )

        view_outputs = [info, entries, label_filter, thumbs, selected]
        open_event = dict(fn=bind(open_index), inputs=manage_index, outputs=view_outputs)
        manage_index.input(**open_event, api_name="open_index")
        refresh_btn.click(keep, manage_index, manage_index, api_visibility="private").then(
            **open_event, api_visibility="private"
        )
        tab_manage.select(keep, manage_index, manage_index, api_visibility="private").then(
            **open_event, api_visibility="private"
        )
        label_filter.input(
            bind(filter_entries),
            [manage_index, label_filter, selected],
            [info, entries, thumbs],
            api_name="filter_entries",
        )
        entries.select(
            bind(toggle_selection), [manage_index, selected, label_filter], [selected, thumbs], api_visibility="private"
        )
        clear_btn.click(
            bind(clear_selection),
            [manage_index, label_filter],
            [selected, info, entries, thumbs],
            api_name="clear_selection",
        )
        remove_btn.click(
            change(remove_entries),
            [manage_index, selected, label_filter],
            [manage_status, info, entries, thumbs, selected],
            api_name="remove_entries",
        )
        add_btn.click(
            change(add_entries),
            [manage_index, add_files, add_labels, add_skip],
            [manage_status, info, entries, label_filter, thumbs],
            api_name="add_entries",
        )
        rename_btn.click(
            change(rename_index),
            [manage_index, new_name],
            [manage_status, manage_index, rec_index],
            api_name="rename_index",
        ).success(**open_event, api_visibility="private")
        delete_btn.click(
            change(delete_index),
            [manage_index, confirm_delete],
            [manage_status, manage_index, rec_index, confirm_delete],
            api_name="delete_index",
        ).success(**open_event, api_visibility="private")
        export_btn.click(change(export_index), manage_index, [manage_status, download_btn], api_name="export_index")
        import_btn.click(
            change(import_index),
            [import_file, import_name, import_overwrite],
            [manage_status, manage_index, rec_index],
            api_name="import_index",
        ).success(**open_event, api_visibility="private")

        tab_models.select(bind(models_markdown), None, models_md, api_visibility="private")
        # while official weights download in the background, the Models tab shows their progress
        download_timer = gr.Timer(2.0, active=bool(engine.model_download_status().get("running")))
        download_timer.tick(bind(refresh_models), None, [models_md, download_timer], api_visibility="private")
        switch_btn.click(change(switch_model), rec_model, [models_md, rec_threshold], api_name="switch_model")

        demo.load(bind(models_markdown), None, models_md, api_visibility="private")
        if active:
            demo.load(**open_event, api_visibility="private")
    return demo
