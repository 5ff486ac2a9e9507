"""The CJK font for drawn results, the gallery report and the studio's pages.

Which font draws Chinese labels, first found first:

1. ``$SHITU_FONT`` (a ``.ttf``/``.otf``/``.ttc`` file);
2. a system font with CJK glyphs (Debian ``fonts-wqy-microhei`` or ``fonts-noto-cjk``, macOS,
   Windows, or what fontconfig offers for Chinese), or PaddleX's cached font;
3. the font this product provisions itself, as it does the starter models: **Noto Sans SC
   Regular** from the npm package ``@expo-google-fonts/noto-sans-sc`` 0.4.3, fetched once into
   ``<models dir>/fonts`` and checked against pinned sha256 values (the tarball, the font and its
   licence). The font is under the SIL Open Font License 1.1 (``OFL.txt`` beside it); the
   package's own JavaScript, which is not used, is under MIT.

Engines tell this module where their model cache is (:func:`use`); the app fetches the font on a
thread at start (:func:`fetch_in_background`) so the first answer does not wait for it, and a
drawing that needs it before then asks for it the same way. Until a font is there (offline, with
nothing cached) captions stay Latin — :func:`covers` says whether a text can be drawn — and one
warning says how to get one.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path

from shitu import npm
from shitu.fsutil import sha256_bytes, sha256_file, write_bytes_atomic

log = logging.getLogger(__name__)

FONT_NPM_PACKAGE = "@expo-google-fonts/noto-sans-sc"
FONT_NPM_VERSION = "0.4.3"
FONT_TARBALL_URL = "https://registry.npmjs.org/@expo-google-fonts/noto-sans-sc/-/noto-sans-sc-0.4.3.tgz"
FONT_TARBALL_SHA256 = "0d69d0f4971d2ff574e3d93cbc218dc950bf3f3f8f8e2c008d97687ed53aee59"  # 57 MB, nine weights
FONT_MEMBER = "package/400Regular/NotoSansSC_400Regular.ttf"
FONT_FILENAME = "NotoSansSC_400Regular.ttf"
FONT_SHA256 = "d45f67f0a7c0ca3f256950777ce6a61cc7ce5f9696d02900cbbaac25f8aa7d16"  # 10.6 MB
LICENSE_MEMBER = "package/LICENSE_FONT"
LICENSE_FILENAME = "OFL.txt"
LICENSE_SHA256 = "1c05c68c34f9708415aada51f17e1b0092d2cea709bf4a94cd38114f9e73d7d9"
FONT_DIR = "fonts"  # under the models dir (``Settings.models_dir``)
WEB_FONT_SUFFIXES = (".ttf", ".otf", ".woff", ".woff2")  # what a browser takes in @font-face (not .ttc)

# Fonts with CJK glyphs, in order of preference, where common systems install them.
CJK_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",  # Debian fonts-wqy-microhei
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # Debian fonts-noto-cjk
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",  # Arch, Fedora
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/System/Library/Fonts/PingFang.ttc",  # macOS
    "/System/Library/Fonts/STHeiti Medium.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.ttc",  # Windows
    "C:/Windows/Fonts/simhei.ttf",
)


class FontUnavailable(RuntimeError):
    """The font could not be fetched or did not match its checksum (the reason, in one line)."""


class _Places:
    """Where provisioned fonts are looked for and fetched into, and whether a fetch may be tried."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dirs: list[Path] = []
        self.offline = False
        self.fetching: threading.Thread | None = None
        self.warned = False
        self.failed: str | None = None


_places = _Places()


def use(models_dir: str | Path, *, offline: bool = False) -> None:
    """Look for (and fetch into) ``<models_dir>/fonts``; ``offline``: never fetch. Engines call it."""
    folder = Path(models_dir) / FONT_DIR
    with _places.lock:
        changed = folder not in _places.dirs
        if changed:
            _places.dirs.insert(0, folder)
        _places.offline = offline
    if changed:
        forget()


def forget() -> None:
    """Look again: after a fetch, or when the places change."""
    _found.cache_clear()
    _verified.cache_clear()


def provisioned(models_dir: str | Path | None = None) -> Path | None:
    """The provisioned font, if it is in ``<models_dir>/fonts`` (default: the places given to
    :func:`use`) and matches its checksum."""
    folders = [Path(models_dir) / FONT_DIR] if models_dir is not None else list(_places.dirs)
    for folder in folders:
        path = folder / FONT_FILENAME
        if _verified(str(path)):
            return path
    return None


@functools.lru_cache(maxsize=16)
def _verified(path: str) -> bool:
    """The file is there and is the font we pinned (checked once per process: ~30 ms)."""
    try:
        return Path(path).is_file() and sha256_file(path) == FONT_SHA256
    except OSError:
        return False


def _fc_match() -> str | None:
    if not shutil.which("fc-match"):
        return None
    try:
        out = subprocess.run(["fc-match", "-f", "%{file}", ":lang=zh"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    path = out.stdout.strip()
    # fc-match always answers something; only accept fonts that are known to be CJK-capable
    return path if path and any(k in path.lower() for k in ("cjk", "wqy", "hei", "song", "ming", "han")) else None


def system_font() -> str | None:
    """``$SHITU_FONT``, else a CJK font the system (or PaddleX's cache) has."""
    env = os.environ.get("SHITU_FONT")
    if env and Path(env).is_file():
        return env
    pdx_cache = Path(os.environ.get("PADDLE_PDX_CACHE_HOME", Path.home() / ".paddlex"))
    for candidate in (*CJK_FONT_CANDIDATES, *(str(p) for p in sorted(pdx_cache.glob("fonts/*.tt[fc]")))):
        if Path(candidate).is_file():
            return candidate
    return _fc_match()


def cjk_font() -> str | None:
    """The font that draws Chinese labels (see the module's doc), or ``None`` for none yet."""
    return _found()


@functools.lru_cache(maxsize=1)
def _found() -> str | None:
    found = system_font()
    if found is not None:
        return found
    path = provisioned()
    return str(path) if path is not None else None


def web_font() -> Path | None:
    """A font file the studio's pages can offer browsers that have no CJK font: ``$SHITU_FONT``
    if a browser can load it, else the provisioned font when it is there."""
    env = os.environ.get("SHITU_FONT")
    if env and Path(env).suffix.lower() in WEB_FONT_SUFFIXES and Path(env).is_file():
        return Path(env)
    return provisioned()


def fetch(models_dir: str | Path) -> Path:
    """Fetch the font into ``<models_dir>/fonts`` once (nothing is fetched when it is there):
    the tarball, the font and its licence are checked against pinned sha256 values and the font
    is written under a temp name, then renamed, so a half-written font is never used. Raises
    :class:`FontUnavailable`."""
    folder = Path(models_dir) / FONT_DIR
    target = folder / FONT_FILENAME
    if provisioned(models_dir) is not None:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=folder) as tmp:
        try:
            tarball = npm.fetch_tarball(FONT_NPM_PACKAGE, FONT_NPM_VERSION, FONT_TARBALL_URL, Path(tmp))
        except npm.RegistryUnreachable as exc:
            raise FontUnavailable(str(exc)) from None
        if sha256_file(tarball) != FONT_TARBALL_SHA256:
            raise FontUnavailable(f"checksum mismatch for the {FONT_NPM_PACKAGE} tarball")
        try:
            with tarfile.open(tarball, mode="r:gz") as tar:
                members = {name: tar.extractfile(name) for name in (FONT_MEMBER, LICENSE_MEMBER)}
                if any(m is None for m in members.values()):
                    raise KeyError(FONT_MEMBER)
                font, licence = (m.read() for m in members.values())  # type: ignore[union-attr]
        except (KeyError, tarfile.TarError, OSError) as exc:
            raise FontUnavailable(f"unexpected layout of the {FONT_NPM_PACKAGE} package: {exc}") from None
    for what, data, expected in (("font", font, FONT_SHA256), ("licence", licence, LICENSE_SHA256)):
        if sha256_bytes(data) != expected:
            raise FontUnavailable(f"checksum mismatch for the {what} in {FONT_NPM_PACKAGE}")
    write_bytes_atomic(folder / LICENSE_FILENAME, licence)
    write_bytes_atomic(target, font)  # last: its presence marks the cache complete
    forget()
    return target


def fetch_in_background() -> threading.Thread | None:
    """Fetch the font on a thread when no font is found, once per process, unless offline or no
    models dir is known; ``None`` when nothing needs to (or may) be fetched. Says once what
    happened: INFO when the font is ready, one WARNING when it cannot be had."""
    if cjk_font() is not None:
        return None
    with _places.lock:
        running = _places.fetching
        unable = "offline: no font is fetched" if _places.offline else None if _places.dirs else "no model cache is set"
        if running is None and unable is None:
            folder = _places.dirs[0].parent
            running = _places.fetching = threading.Thread(target=_fetch_and_say, args=(folder,), name="shitu-font",
                                                          daemon=True)  # fmt: skip
            log.info("fetching a CJK font for Chinese labels (%s %s, 57 MB once) in the background",
                     FONT_NPM_PACKAGE, FONT_NPM_VERSION)  # fmt: skip
            running.start()
    if unable is not None and running is None:
        _warn_missing(unable)
    return running


def _fetch_and_say(models_dir: Path) -> None:
    try:  # in the background of a start-up that needs the cores more: this thread (and npm) at a low priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux: per-process only; leave it
        pass
    try:
        path = fetch(models_dir)
    except (FontUnavailable, OSError) as exc:
        _places.failed = str(exc)
        _warn_missing(str(exc))
        return
    log.info("CJK font ready for drawn labels: %s (SIL Open Font License 1.1)", path.name)


def _warn_missing(reason: str) -> None:
    with _places.lock:
        if _places.warned:
            return
        _places.warned = True
    log.warning(
        "no CJK font (%s): Chinese labels are drawn as their entry ids (#12) until one is available. "
        "Set SHITU_FONT to a .ttf/.otf/.ttc file, install one (Debian: apt-get install fonts-noto-cjk), or start "
        "once with network access to fetch Noto Sans SC from npm.",
        reason,
    )


def warn_if_missing() -> bool:
    """``True`` when a CJK font is there; else say so once (and why) and return ``False``."""
    if cjk_font() is not None:
        return True
    if _places.fetching is None or not _places.fetching.is_alive():
        _warn_missing(_places.failed or ("offline" if _places.offline else "not fetched yet"))
    return False


# --- the same font in web pages ------------------------------------------------------------------------
WEB_FAMILY = "ShiTu CJK"  # the name pages use for it, after the fonts a visitor's system may have
CJK_RANGES = "U+2E80-2FDF, U+3000-33FF, U+3400-4DBF, U+4E00-9FFF, U+F900-FAFF, U+FE30-FE4F, U+FF00-FFEF"
FONT_STACK = (
    'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "PingFang SC", "Hiragino Sans GB", '
    f'"Microsoft YaHei", "Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei", "{WEB_FAMILY}", sans-serif'
)


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return 0x2E80 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF or 0xFE30 <= code <= 0xFE4F or 0xFF00 <= code <= 0xFFEF


def embedded_css(page: str) -> str:
    """An ``@font-face`` rule that carries just the CJK glyphs ``page`` uses (a few KB, as a data
    URI), so a saved page (the gallery report) shows its Chinese on any machine, offline; ``""``
    when the page has no CJK text or there is no font to take them from. (~0.5-1 s the first time
    for a set of characters; the same set again is free.)"""
    chars = "".join(sorted({ch for ch in page if _is_cjk(ch)}))
    path = cjk_font()
    if not chars or path is None:
        return ""
    return _subset_css(path, chars)


@functools.lru_cache(maxsize=32)
def _subset_css(path: str, chars: str) -> str:
    try:
        import base64
        import io

        from fontTools import subset
        from fontTools.ttLib import TTFont

        options = subset.Options()
        options.layout_features, options.name_IDs, options.hinting = [], [], False
        options.drop_tables = [*options.drop_tables, "FFTM"]  # (a FontForge timestamp it would warn about)
        logging.getLogger("fontTools").setLevel(logging.ERROR)
        font = TTFont(path, lazy=True, fontNumber=0)
        subsetter = subset.Subsetter(options)
        subsetter.populate(text=chars)
        subsetter.subset(font)
        buffer = io.BytesIO()
        try:
            font.flavor = "woff2"  # needs brotli (Gradio's dependency)
            font.save(buffer)
            kind = "woff2"
        except ImportError:
            buffer = io.BytesIO()
            font.flavor = None
            font.save(buffer)
            kind = "truetype"
    except Exception as exc:  # noqa: BLE001 - a page without its font still reads, with the reader's own
        log.warning("could not embed the CJK font in the page: %s", exc)
        return ""
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    mime = "font/woff2" if kind == "woff2" else "font/ttf"
    return f'@font-face{{font-family:"{WEB_FAMILY}";src:url(data:{mime};base64,{data}) format("{kind}")}}'


def served_css(url: str) -> str:
    """The studio's ``@font-face`` rule: the font at ``url`` (:func:`web_font`, served by the app),
    loaded only by a browser that shows CJK text and has none of the system fonts before it in
    :data:`FONT_STACK`."""
    return (f'@font-face {{ font-family: "{WEB_FAMILY}"; src: url("{url}"); '
            f"font-display: swap; unicode-range: {CJK_RANGES}; }}")  # fmt: skip
