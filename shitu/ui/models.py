"""The Models tab (and the banner at the top of the page): which models run, where they came from
and why, the official weights downloading in the background, and switching the recognition model."""

from __future__ import annotations

import functools
import html
from importlib import metadata
from typing import TYPE_CHECKING, Any

import gradio as gr

from shitu.config import REC_MODELS
from shitu.engine import Engine  # a runtime import: Gradio reads the handlers' type hints
from shitu.errors import ShiTuError
from shitu.i18n import STARTER_MODELS, TEXT
from shitu.i18n import text as tr
from shitu.ui.events import I18N, PRIVATE, Wiring, lang_of, md_safe, user_errors

if TYPE_CHECKING:
    from shitu.ui.recognize import RecognizeTab

DOWNLOAD_POLL_S = 2.0  # how often the tab looks at a background download while one runs


def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _device(engine: Engine, lang: str = "en") -> str:
    configured = engine.models().get("device") or "auto"
    try:
        import paddle

        return tr(lang, "device_line", device=paddle.device.get_device(), setting=configured)
    except Exception:  # noqa: BLE001 - the page must render even if paddle cannot say
        return str(configured)


def _model_line(info: dict[str, Any], lang: str) -> str:
    """What runs one stage, in words: the starter pack's converted models by what they are."""
    source = str(info.get("source"))
    known = STARTER_MODELS.get(str(info.get("model_dir") or ""), {})
    what = known.get(lang) or known.get("en")
    name = f"`{info.get('model_name')}`"
    if source == "starter" and what:
        return tr(lang, "starter_model", name=name, what=what)
    where = f" (`{info['model_dir']}`)" if info.get("model_dir") and source != "official" else ""
    return f"{name}{where}, {TEXT[lang].get('source_' + source, source)}"


def models_banner(engine: Engine, request: gr.Request | None = None) -> str:
    """One line at the top: which models answer, and what that means for accuracy."""
    lang = lang_of(request)
    models = engine.models()
    sources = {str((models.get(stage) or {}).get("source")) for stage in ("detection", "recognition")}
    if "starter" in sources:
        key = "banner_starter"
    elif sources == {"official"}:
        key = "banner_official"
    else:
        key = "banner_local"
    rec = (models.get("recognition") or {}).get("model_name")
    fast = sorted({str(e.get("name")) for stage in ("detection", "recognition")
                   if (e := (models.get(stage) or {}).get("engine") or {}).get("engine", "paddle") != "paddle"})
    on = f" · {tr(lang, 'engine_line')} {html.escape(' + '.join(fast))}" if fast else ""  # use_hpip's engines
    return f'<div class="shitu-banner {key}">{tr(lang, key, model=html.escape(str(rec)))}{on}</div>'


@user_errors
def models_markdown(engine: Engine, request: gr.Request | None = None) -> str:
    """Which models run and why, the device, library versions and every index's statistics."""
    lang = lang_of(request)
    models = engine.models()
    lines = [tr(lang, "models_header")]
    for stage in ("detection", "recognition"):
        info = models.get(stage) or {}
        reason = md_safe(info.get("reason", ""))
        if lang != "en" and reason:
            reason = f"{tr(lang, 'details_en')}{reason}"
        lines.append(f"- **{tr(lang, 'stage_' + stage)}**: {_model_line(info, lang)}  \n  {reason}")
        ran_by = (info.get("engine") or {}).get("description")
        if ran_by:
            lines.append(f"  \n  {tr(lang, 'engine_line')}: {md_safe(str(ran_by))}")
    versions = {
        "paddlex": _version("paddlex"),
        "paddlepaddle": _version("paddlepaddle", "paddlepaddle-gpu"),
        "faiss": _version("faiss-cpu", "faiss-gpu", "faiss"),
        "gradio": _version("gradio"),
    }
    lines.append(f"- **{tr(lang, 'device')}**: {_device(engine, lang)}")
    lines.append(f"- **{tr(lang, 'vector_store')}**: {tr(lang, 'store_' + engine.vector_store)}")
    lines.append(f"- **{tr(lang, 'versions')}**: " + " · ".join(f"{k} {v}" for k, v in versions.items()))
    downloads = download_lines(engine.model_download_status(), lang)
    if downloads:  # the official weights' own section, before the indices' (headings need a blank line)
        lines += ["", *downloads]
    lines += ["", tr(lang, "indices_header"), ""]
    names = engine.index_names()
    if not names:
        lines.append(tr(lang, "no_indices"))
    else:
        lines.append(tr(lang, "indices_table") + "\n|---|---|---|---|---|---|---|---|")
        for name in names:
            try:
                info = engine.info(name)
            except ShiTuError as exc:
                lines.append(f"| {md_safe(name)} | — | — | — | — | — | {md_safe(exc.message)} | |")
                continue
            ok = tr(lang, "usable") if info.compatible else "⚠️ " + tr(lang, "rebuild")
            active = " ★" if name == engine.settings.default_index else ""
            lines.append(
                f"| {md_safe(name)}{active} | {info.entries} | {info.labels} | {info.index_type} | "
                f"{info.metric_type} | {info.dim} | `{info.feature_model}` | {ok} |"
            )
    return "\n".join(lines)


def recognition_models_table(engine: Engine, lang: str = "en") -> str:
    """Size, accuracy and speed of the three official recognisers (PaddleX's published figures)."""
    rows = [tr(lang, "rec_models_table"), "|---|---|---|---|---|"]
    for m in engine.recognition_models():
        size = f"{m['size_mb'] / 1000:.2f} GB" if m["size_mb"] >= 1000 else f"{m['size_mb']:.0f} MB"
        name = f"**{m['name']}** ✓" if m["active"] else m["name"]
        rows.append(f"| {name} | {size} | {m['recall_at_1']:.1f} % | {m['gpu_ms']:.0f} ms | {m['cpu_ms']:.0f} ms |")
    return "\n".join(rows) + "\n\n" + tr(lang, "rec_models_note")


def download_lines(status: dict[str, Any], lang: str) -> list[str]:
    """The background download of official weights, as the Models tab shows it."""
    state = status.get("state")
    if not state or state in ("idle", "nothing to do"):
        return []
    lines = [tr(lang, "downloads_header")]
    for name, model in (status.get("models") or {}).items():
        done, total = model.get("done") or 0, model.get("total") or 0
        if model.get("state") == "downloading":
            size = f"{done / 1e6:.0f} / {total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
            lines.append(f"- ⏳ `{name}`: {size} — " + tr(lang, "starter_meanwhile"))
        else:
            state = str(model.get("state", ""))
            reason = model.get("reason") or ""
            reason = f" — {tr(lang, 'details_en')}{md_safe(reason)}" if reason else ""
            lines.append(f"- `{name}`: {TEXT[lang].get('download_' + state, md_safe(state))}{reason}")
    if state == "switched":
        lines.append(tr(lang, "now_official"))
        stale = [name for name, same in (status.get("indices") or {}).items() if not same]
        if stale:
            lines.append(tr(lang, "reembed", names=", ".join(f"`{n}`" for n in stale)))
    elif state == "failed":
        lines.append(tr(lang, "official_failed", reason=tr(lang, "details_en") + md_safe(status.get("reason") or "")))
    return lines


def refresh_models(engine: Engine, request: gr.Request | None = None):
    """Timer tick while a download runs: (models markdown, timer on/off, banner)."""
    running = bool(engine.model_download_status().get("running"))
    return models_markdown(engine, request), gr.Timer(active=running), models_banner(engine, request)


@user_errors
def switch_model(engine: Engine, model_name: str, request: gr.Request | None = None):
    """Switch the recognition model: (models markdown, recognition threshold slider, banner)."""
    if model_name not in REC_MODELS:
        raise ShiTuError(f"unknown recognition model {model_name!r}")
    engine.switch_recognition_model(model_name)
    return (
        models_markdown(engine, request),
        gr.update(value=engine.default_rec_threshold),
        models_banner(engine, request),
    )


@user_errors
def set_high_performance(engine: Engine, enabled: bool, request: gr.Request | None = None):
    """High-performance inference on or off: (models markdown, banner, the switch as it now is)."""
    engine.use_high_performance(bool(enabled))
    return models_markdown(engine, request), models_banner(engine, request), high_performance_on(engine)


def high_performance_on(engine: Engine) -> bool:
    """Whether use_hpip is asked for now (each model's engine says whether it got it)."""
    return bool(engine.models().get("use_hpip"))


def active_rec_model(engine: Engine) -> str:
    """The recognition model that really runs (what the model dropdown must show)."""
    return str(engine.models()["recognition"]["model_name"])


def initial_view(engine: Engine, request: gr.Request | None = None):
    """What the page shows when it opens, read then: (models markdown, banner, the recognition
    model that runs, the recognisers' table, the download timer: on while a download runs, whether
    high-performance inference is on)."""
    running = bool(engine.model_download_status().get("running"))
    return (models_markdown(engine, request), models_banner(engine, request), active_rec_model(engine),
            recognition_models_table(engine, lang_of(request)), gr.Timer(active=running),
            high_performance_on(engine))  # fmt: skip


# --- the tab ---------------------------------------------------------------------------------------------
class ModelsTab:
    """The tab's components, made inside the page's ``gr.Tabs``; the page's load fills them in
    (:func:`initial_view`)."""

    def __init__(self) -> None:
        with gr.Tab(I18N("tab_models"), id="models") as self.tab:
            self.info = gr.Markdown(elem_id="models-info")
            with gr.Row():
                self.model = gr.Dropdown(
                    list(REC_MODELS), label=I18N("rec_model"), info=I18N("switch_info"), scale=3, elem_id="rec-model"
                )
                self.switch_button = gr.Button(I18N("switch_btn"), scale=1)
            self.hpi = gr.Checkbox(label=I18N("hpi_toggle"), info=I18N("hpi_info"), elem_id="use-hpip")
            self.models_table = gr.Markdown(elem_id="rec-models-table")
            # while official weights download in the background, the tab shows their progress
            self.timer = gr.Timer(DOWNLOAD_POLL_S, active=False)

    def switched(self, banner: gr.HTML, recognize: RecognizeTab) -> list:
        """A switch's outputs: this tab, the Recognize threshold (the new model's default), the banner."""
        return [self.info, recognize.threshold, banner, self.model]

    def add_endpoints(self, w: Wiring, banner: gr.HTML, recognize: RecognizeTab) -> None:
        """The named endpoints for programmatic callers (the plain handlers: an error stays an error)."""
        w.endpoint("switch_model", w.change(switch_model), self.model, self.switched(banner, recognize)[:-1])

    def wire(self, w: Wiring, banner: gr.HTML, recognize: RecognizeTab) -> None:
        """The page's own events: private, user errors as toasts, long jobs with a progress bar."""
        self.tab.select(w.bind(models_markdown), None, self.info, **PRIVATE)
        self.timer.tick(w.bind(refresh_models), None, [self.info, self.timer, banner], **PRIVATE)
        switch = w.change(switch_model)

        @functools.wraps(switch)
        def switch_and_show(*args: Any, **kwargs: Any) -> tuple:
            return (*switch(*args, **kwargs), gr.skip())

        def put_back_model(outputs: list, _request: Any) -> list:  # a failed switch changes nothing
            outputs[-1] = gr.update(value=active_rec_model(w.engine))
            return outputs

        outputs = self.switched(banner, recognize)
        self.switch_button.click(
            w.soft(switch_and_show, outputs, on_error=put_back_model), self.model, outputs, **PRIVATE
        )

        def put_back_hpi(outputs: list, _request: Any) -> list:  # a failed switch changes nothing
            outputs[-1] = gr.update(value=high_performance_on(w.engine))
            return outputs

        hpi_outputs = [self.info, banner, self.hpi]
        # .input: a person's click (the page's own load sets the box without switching anything)
        self.hpi.input(w.soft(w.change(set_high_performance), hpi_outputs, on_error=put_back_hpi), self.hpi,
                       hpi_outputs, concurrency_limit=1, concurrency_id="model-switch", **PRIVATE)  # fmt: skip

    def load(self, demo: gr.Blocks, w: Wiring, banner: gr.HTML) -> None:
        """What the tab shows when a page opens, read then."""
        shown = [self.info, banner, self.model, self.models_table, self.timer, self.hpi]
        demo.load(w.soft(w.bind(initial_view), shown), None, shown, **PRIVATE)
