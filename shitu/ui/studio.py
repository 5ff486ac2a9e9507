"""The page: the title, the models banner, the sign-in, and the five tabs composed into one Blocks.

Building it reads nothing from the engine: every value that depends on the data (the indices, the
options, the models) is filled in by the page's load events when a visitor opens it, so the page
can be built (and mounted) before the models and the sample gallery are ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr

from shitu import fonts
from shitu.access import AccessPolicy
from shitu.ui import gradio_cache
from shitu.ui.build import BuildTab
from shitu.ui.evaluate import EvaluateTab
from shitu.ui.events import I18N, SessionAccess, Wiring, remembered_index, soft_errors
from shitu.ui.manage import ManageTab
from shitu.ui.models import ModelsTab
from shitu.ui.recognize import RecognizeTab

if TYPE_CHECKING:
    from shitu.engine import Engine

FONT_URL = "fonts/cjk"  # relative to the page: app.py serves it (the provisioned CJK font)
CSS = fonts.served_css(FONT_URL) + f"""
/* Chinese text in the CJK font the studio provides, where the visitor's system has none */
:root, .gradio-container {{ --font: "IBM Plex Sans", ui-sans-serif, {fonts.FONT_STACK} !important; }}
""" + """
#result-table td, #entries-table td { white-space: normal; }
/* the indices table scrolls sideways on a phone instead of wrapping letter by letter */
#models-info table { display: block; overflow-x: auto; width: fit-content; max-width: 100%; border: none;
  padding: 0; }
#models-info th, #models-info td { white-space: nowrap; }
#title h1 { margin-bottom: 0.2em; }
.shitu-banner { padding: 8px 12px; border-radius: 8px; font-size: 0.95em; line-height: 1.4; }
.shitu-banner.banner_starter { background: #fff7e0; border: 1px solid #f0c36d; color: #5c4400; }
.shitu-banner.banner_official { background: #e9f7ef; border: 1px solid #7cc496; color: #1d4d2e; }
.shitu-banner.banner_local { background: #eef2ff; border: 1px solid #a5b4fc; color: #2e3a78; }
#examples .grid-wrap, #evidence .grid-wrap { height: auto !important; max-height: none !important;
  min-height: 0 !important; }
#evidence .caption-label, #examples .caption-label { white-space: normal; overflow: visible;
  text-overflow: clip; line-height: 1.25; max-width: 100%; }
.shitu-progress { margin: 6px 0; }
.shitu-progress .bar { height: 10px; border-radius: 5px; background: #e5e7eb; overflow: hidden; }
.shitu-progress .fill { height: 100%; background: #ea580c; transition: width 0.3s ease; }
.shitu-progress .fill.indeterminate { width: 35%; animation: shitu-slide 1.2s ease-in-out infinite; }
.shitu-progress .text { font-size: 0.95em; margin-top: 4px; }
.shitu-progress.done { color: #15803d; }
@keyframes shitu-slide { from { margin-left: -35%; } to { margin-left: 100%; } }
.shitu-inline-error { color: #b91c1c; background: #fef2f2; border: 1px solid #fecaca; border-radius: 6px;
  padding: 6px 10px; }
@media (max-width: 640px) {
  #query-image, #query-image .image-container { height: 240px !important; max-height: 240px; }
  #result-image, #result-image .image-container { height: auto !important; max-height: 60vh; }
  /* five tabs on a 390 px phone: tight padding so none moves into an overflow menu */
  .tab-container button, [role="tab"] { padding-left: 5px !important; padding-right: 5px !important;
    font-size: 0.92em !important; }
  #title p { font-size: 0.9em; }
  /* the threshold curve keeps readable text: it scrolls sideways inside its box instead of shrinking */
  #eval-curve { overflow-x: auto; }
  #eval-curve svg { min-width: 460px; }
}
"""


# Run by the page when it loads (mount the UI with ``js=JS``): when a long job's progress bar starts
# (a build, an add, an import, a report, a refit), it is scrolled into view once, with the button
# that started it just above — on a desktop where the button sits below the fold as on a phone. Later
# frames of the same job do not scroll again, so a visitor may scroll away while it runs.
JS = """() => {
  const running = new WeakSet();
  const watch = () => {
    for (const bar of document.querySelectorAll('.shitu-progress')) {
      const box = bar.closest('[id]') || bar.parentElement;
      if (bar.classList.contains('done')) { running.delete(box); continue; }
      if (running.has(box)) continue;
      running.add(box);
      const r = bar.getBoundingClientRect();
      if (r.top < 0 || r.bottom > window.innerHeight) bar.scrollIntoView({block: 'center', behavior: 'smooth'});
    }
  };
  new MutationObserver(watch).observe(document.body, {subtree: true, childList: true});
}"""


def sign_in_section(access: SessionAccess) -> None:
    """What a restricted server shows at the top: a sign-in (with a token) or a read-only notice."""
    if access.policy.restricted and not access.policy.token:
        gr.Markdown(I18N("read_only_notice"), elem_id="read-only-notice")
        return
    if not access.policy.restricted:
        return
    with gr.Accordion(I18N("sign_in_section"), open=False, elem_id="sign-in"):
        with gr.Row():
            password = gr.Textbox(label=I18N("access_token"), type="password", max_lines=1, scale=3)
            sign_in_button = gr.Button(I18N("sign_in_btn"), scale=1)
            sign_out_button = gr.Button(I18N("sign_out_btn"), scale=1)
        status = gr.Markdown(elem_id="sign-in-status")
    # the endpoint first: it keeps the plain name; the page's own events are soft and private
    gr.Button(visible=False, elem_classes=["api-only"]).click(access.sign_in, password, status, api_name="sign_in")
    soft_sign_in = soft_errors(access.sign_in, 1)
    sign_in_button.click(soft_sign_in, password, status, api_visibility="private")
    password.submit(soft_sign_in, password, status, api_visibility="private")
    sign_out_button.click(access.sign_out, None, status, api_name="sign_out")


def build_demo(engine: Engine, policy: AccessPolicy | None = None) -> gr.Blocks:
    """The five-tab studio over ``engine``. Mount it with ``i18n=I18N, css=CSS`` (see app.py).

    ``policy`` decides who may change indices (default: open, as on a private laptop). Nothing
    is read from ``engine`` here; each tab's load event reads what it shows when a page opens."""
    gradio_cache.install()  # images the page shows are never rewritten while the browser reads them
    access = SessionAccess(policy or AccessPolicy(token=None, restricted=False))
    w = Wiring(engine, access)
    with gr.Blocks(title="ShiTu Studio", analytics_enabled=False, delete_cache=(300, 900)) as demo:
        w.remembered = remembered_index()  # the index this browser picked last: every tab opens on it
        with gr.Row(elem_id="header"):
            gr.Markdown(I18N("title"), elem_id="title")
        banner = gr.HTML(elem_id="models-banner")
        sign_in_section(access)
        with gr.Tabs(elem_id="tabs"):
            recognize = RecognizeTab()
            build = BuildTab()
            manage = ManageTab()
            evaluate = EvaluateTab()
            models = ModelsTab()

        # named endpoints first, so they keep their plain names (a later event of the same function
        # would otherwise take it): the same handlers, and errors stay errors for their callers
        recognize.add_endpoints(w)
        build.add_endpoints(w, recognize, manage)
        manage.add_endpoints(w, recognize)
        evaluate.add_endpoints(w)
        models.add_endpoints(w, banner, recognize)

        recognize.wire(w)
        build.wire(w, recognize, manage, evaluate)
        manage.wire(w, recognize, evaluate)
        evaluate.wire(w, recognize)
        models.wire(w, banner, recognize)

        # what depends on the data is read when a page opens
        models.load(demo, w, banner)
        recognize.load(demo, w)
        manage.load(demo, w)
        evaluate.load(demo, w)
    return demo
