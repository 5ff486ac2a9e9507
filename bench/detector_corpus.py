"""Crash corpus for the starter detector: thousands of varied real inputs through PaddleX's predictor.

The exported starter detector once killed the whole Python process (SIGSEGV in Paddle
Inference's oneDNN concat) on a product photo where NMS kept no box. This script feeds the
exported model dir, through PaddleX's own ``PP-ShiTuV2_det`` predictor with its default CPU
settings, a deterministic corpus built from real photos:

* every drink gallery image (original + 3 random variants each) and every test photo and
  regression photo (about 60 fixed variants each): scales 0.05-3x, crops down to 1 %, 90-degree
  and free rotations, stretches and strips from 1:20 to 20:1, tiny sizes (1x1, 2x3, 8x8 ...),
  greyscale (3-channel, 2-D array, 1-channel PNG file), BGRA, flips, JPEG artefacts,
  letterboxing, tone changes, blur and noise;
* synthetic images: solid colours, noise, gradients and checkerboards from 1x1 up.

Inputs run one at a time in a child process; a child that dies is counted as a crash and
restarted with the next input, one that takes longer than ``--timeout`` is killed and counted
as a hang, and a Python exception is counted as an error. The in-graph work does not depend on
the score threshold (PaddleX applies it afterwards in Python), so inputs run at threshold 0 and
the summary reports both "NMS kept no box" (the input class that crashed format 1) and boxes
at the default threshold.

Run (writes bench/results/detector_corpus.txt)::

    python bench/detector_corpus.py
    python bench/detector_corpus.py --quick --out /tmp/corpus.txt   # no ../shared needed

``--model-dir`` runs another exported dir, e.g. an older conversion, to see what it does.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
MAX_SIDE = 4096  # upscaled variants stop here: a bigger photo only costs time and memory
ASPECTS = (1 / 20, 1 / 10, 1 / 4, 1 / 2, 2.0, 4.0, 10.0, 20.0)  # width / height
TINY_SIZES = ((1, 1), (2, 3), (3, 2), (8, 8), (16, 16), (1, 50), (50, 1), (5, 100))  # (h, w)
REPLY = "@@ "  # the child's answers start with this; anything else on its stdout is log noise
EOF, TIMEOUT = "<eof>", "<timeout>"  # Child.ask results other than an answer


@dataclass(frozen=True)
class Spec:
    """One corpus input: a transform (``family`` + ``params``) of source image ``source`` (-1 =
    synthetic)."""

    family: str
    source: int
    params: tuple


# --------------------------------------------------------------------------------------------
# Building the corpus
# --------------------------------------------------------------------------------------------


def _random_variant(family: str, rng: np.random.Generator) -> tuple:
    """Random parameters for one ``family``."""
    if family == "scale":
        return (float(rng.choice([0.05, 0.1, 0.2, 0.33, 0.5, 0.75, 1.5, 2.0, 3.0])),)
    if family == "crop":
        fw, fh = rng.uniform(0.01, 0.9, size=2)
        return (float(rng.uniform(0, 1 - fw)), float(rng.uniform(0, 1 - fh)), float(fw), float(fh))
    if family == "rot90":
        return (int(rng.integers(1, 4)),)
    if family == "rotate":
        return (float(rng.uniform(-180, 180)),)
    if family in ("aspect", "strip"):
        return (float(rng.choice(ASPECTS)), int(rng.choice([100, 300, 600, 1000])))
    if family == "tiny":
        return tuple(int(v) for v in TINY_SIZES[int(rng.integers(len(TINY_SIZES)))])
    if family == "flip":
        return (int(rng.integers(-1, 2)),)
    if family == "jpeg":
        return (int(rng.integers(1, 40)),)
    if family == "pad":
        return (float(rng.uniform(0.05, 0.5)), int(rng.integers(0, 256)))
    if family == "tone":
        return (float(rng.uniform(0.1, 1.5)), float(rng.uniform(-100, 150)))
    if family == "blur":
        return (int(rng.choice([5, 15, 41])),)
    if family == "noise":
        return (float(rng.uniform(5, 80)), int(rng.integers(1 << 30)))
    return ()  # grey, grey2d, grey_file, bgra


RANDOM_FAMILIES = ("scale", "crop", "rot90", "rotate", "aspect", "strip", "tiny", "grey",
                   "grey2d", "grey_file", "flip", "jpeg", "pad", "tone", "blur", "noise", "bgra")  # fmt: skip


def _fixed_variants() -> list[tuple[str, tuple]]:
    """The full variant set given to each test and regression photo."""
    out: list[tuple[str, tuple]] = [("original", ())]
    out += [("scale", (f,)) for f in (0.05, 0.1, 0.25, 0.5, 0.75, 1.5, 2.0, 3.0)]
    out += [("crop", c) for c in ((0, 0, 0.5, 0.5), (0.5, 0, 0.5, 0.5), (0, 0.5, 0.5, 0.5),
                                  (0.5, 0.5, 0.5, 0.5), (0.25, 0.25, 0.5, 0.5), (0.9, 0.9, 0.1, 0.1),
                                  (0.5, 0.5, 0.01, 0.01))]  # fmt: skip
    out += [("rot90", (k,)) for k in (1, 2, 3)]
    out += [("rotate", (a,)) for a in (-30.0, 15.0, 45.0, 137.0)]
    out += [("aspect", (r, 600)) for r in ASPECTS]
    out += [("strip", (r, 0)) for r in ASPECTS]  # native resolution
    out += [("tiny", hw) for hw in TINY_SIZES]
    out += [("grey", ()), ("grey2d", ()), ("grey_file", ()), ("bgra", ())]
    out += [("flip", (c,)) for c in (-1, 0, 1)]
    out += [("jpeg", (q,)) for q in (2, 10, 30)]
    out += [("pad", (s, c)) for s, c in ((0.1, 255), (0.3, 0), (0.05, 128))]
    out += [("tone", t) for t in ((0.2, 0.0), (1.0, 100.0), (0.3, 80.0), (1.5, -60.0))]
    out += [("blur", (15,)), ("blur", (41,)), ("noise", (25.0, 7)), ("noise", (80.0, 8))]
    return out


def _synthetic_specs(quick: bool) -> list[Spec]:
    sizes = [(1, 1), (2, 3), (8, 8), (300, 300), (261, 300), (1000, 50), (50, 1000)]
    if quick:
        sizes = [(1, 1), (2, 3), (8, 8), (261, 300)]
    colours = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (0, 0, 255), (40, 180, 230)]
    specs = [Spec("solid", -1, (h, w, c)) for h, w in sizes for c in colours]
    specs += [Spec("random", -1, (h, w, i)) for i, (h, w) in enumerate(sizes)]
    specs += [Spec("gradient", -1, (h, w)) for h, w in sizes]
    specs += [Spec("checker", -1, (h, w, cell)) for h, w in sizes for cell in (1, 16)]
    return specs


def build_corpus(
    many: list[Path], full: list[Path], quick: bool, seed: int = 0
) -> tuple[list[Path], list[Spec]]:
    """(sources, specs): each ``many`` image gets its original + random variants, each ``full``
    image the fixed variant set, plus synthetic images."""
    rng = np.random.default_rng(seed)
    sources = list(many) + list(full)
    per_image = 2 if quick else 3
    specs: list[Spec] = []
    for i in range(len(many)):
        specs.append(Spec("original", i, ()))
        for family in rng.choice(RANDOM_FAMILIES, size=per_image, replace=False):
            specs.append(Spec(str(family), i, _random_variant(str(family), rng)))
    for j in range(len(full)):
        specs += [Spec(f, len(many) + j, p) for f, p in _fixed_variants()]
    specs += _synthetic_specs(quick)
    return sources, specs


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------------------------
# Making one input (in the child)
# --------------------------------------------------------------------------------------------


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    w, h = max(1, int(round(w))), max(1, int(round(h)))
    shrink = w * h < img.shape[0] * img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _cap(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return _resize(img, w * MAX_SIDE / max(h, w), h * MAX_SIDE / max(h, w)) if max(h, w) > MAX_SIDE else img


def make_input(spec: Spec, sources: list[Path], workdir: Path) -> np.ndarray | str:
    """The BGR array (or, for ``grey_file``, the path of a 1-channel PNG) for ``spec``."""
    f, p = spec.family, spec.params
    if spec.source < 0:
        h, w = p[0], p[1]
        if f == "solid":
            return np.full((h, w, 3), p[2], np.uint8)
        if f == "random":
            return np.random.default_rng(p[2]).integers(0, 256, (h, w, 3), dtype=np.uint8)
        if f == "gradient":
            ramp = np.linspace(0, 255, max(h, w))
            return np.dstack([np.tile(ramp[:w], (h, 1)), np.tile(ramp[:h, None], (1, w)),
                              np.full((h, w), 90.0)]).astype(np.uint8)  # fmt: skip
        if f == "checker":
            yy, xx = np.indices((h, w)) // p[2]
            return np.repeat((((yy + xx) % 2) * 255).astype(np.uint8)[:, :, None], 3, axis=2)
        raise ValueError(f"unknown synthetic family {f}")
    img = cv2.imread(str(sources[spec.source]), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read {sources[spec.source]}")
    h, w = img.shape[:2]
    if f == "original":
        return img
    if f == "scale":
        return _cap(_resize(img, w * p[0], h * p[0]))
    if f == "crop":
        x0, y0 = int(p[0] * w), int(p[1] * h)
        return img[y0 : y0 + max(1, int(p[3] * h)), x0 : x0 + max(1, int(p[2] * w))].copy()
    if f == "rot90":
        return np.ascontiguousarray(np.rot90(img, p[0]))
    if f == "rotate":
        m = cv2.getRotationMatrix2D((w / 2, h / 2), p[0], 1.0)
        cos, sin = abs(m[0, 0]), abs(m[0, 1])
        bw, bh = int(h * sin + w * cos), int(h * cos + w * sin)
        m[0, 2] += bw / 2 - w / 2
        m[1, 2] += bh / 2 - h / 2
        return cv2.warpAffine(img, m, (bw, bh), borderValue=(255, 255, 255))
    if f == "aspect":  # stretch the whole photo to width/height = ratio, long side p[1]
        ratio, side = p
        return _resize(img, side, side / ratio) if ratio >= 1 else _resize(img, side * ratio, side)
    if f == "strip":  # cut a strip of that ratio from the photo, then scale its long side to p[1]
        ratio, side = p
        sw, sh = (w, min(h, max(1, round(w / ratio)))) if ratio >= 1 else (min(w, max(1, round(h * ratio))), h)
        y0, x0 = (h - sh) // 2, (w - sw) // 2
        strip = img[y0 : y0 + sh, x0 : x0 + sw]
        if side:
            scale = side / max(sh, sw)
            strip = _resize(strip, sw * scale, sh * scale)
        return np.ascontiguousarray(strip)
    if f == "tiny":
        return _resize(img, p[1], p[0])
    if f == "grey":
        return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    if f == "grey2d":
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if f == "grey_file":
        path = workdir / "grey.png"
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
        return str(path)
    if f == "bgra":
        return cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
    if f == "flip":
        return cv2.flip(img, p[0])
    if f == "jpeg":
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, p[0]])
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if f == "pad":  # the photo small in a big plain canvas
        cw, ch = int(w / p[0]), int(h / p[0])
        small = img if max(cw, ch) <= MAX_SIDE else _resize(img, w * MAX_SIDE / max(cw, ch), h * MAX_SIDE / max(cw, ch))
        cw, ch = min(cw, MAX_SIDE), min(ch, MAX_SIDE)
        canvas = np.full((ch, cw, 3), p[1], np.uint8)
        sh, sw = small.shape[:2]
        canvas[(ch - sh) // 2 : (ch - sh) // 2 + sh, (cw - sw) // 2 : (cw - sw) // 2 + sw] = small
        return canvas
    if f == "tone":
        return cv2.convertScaleAbs(img, alpha=p[0], beta=p[1])
    if f == "blur":
        return cv2.GaussianBlur(img, (p[0], p[0]), 0)
    if f == "noise":
        noise = np.random.default_rng(p[1]).normal(0, p[0], img.shape)
        return np.clip(img + noise, 0, 255).astype(np.uint8)
    raise ValueError(f"unknown family {f}")


# --------------------------------------------------------------------------------------------
# The child: load the predictor once, then answer one input per stdin line
# --------------------------------------------------------------------------------------------


def child_main(job_file: Path) -> None:
    import paddlex

    from shitu.starter.detector import DEFAULT_DET_THRESHOLD

    job = json.loads(job_file.read_text())
    sources = [Path(s) for s in job["sources"]]
    specs = [Spec(s["family"], s["source"], tuple(s["params"])) for s in job["specs"]]
    kwargs: dict[str, Any] = {}
    if job["run_mode"]:
        kwargs["engine_config"] = {"run_mode": job["run_mode"]}
    predictor = paddlex.create_model(
        model_name="PP-ShiTuV2_det", model_dir=job["model_dir"], device="cpu", **kwargs
    )
    out = sys.stdout
    out.write(REPLY + "ready\n")
    out.flush()
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        for line in sys.stdin:
            index = int(line)
            try:
                item = make_input(specs[index], sources, Path(tmp))
                shape = cv2.imread(item, cv2.IMREAD_UNCHANGED).shape if isinstance(item, str) else item.shape
                start = time.perf_counter()
                result = next(iter(predictor.predict([item], threshold=0.0)))
                ms = (time.perf_counter() - start) * 1000
                scores = [b["score"] for b in result["boxes"]]
                above = sum(s >= DEFAULT_DET_THRESHOLD for s in scores)
                reply = f"{index} ok {len(scores)} {above} {ms:.2f} {shape[0]} {shape[1]}"
            except Exception as exc:  # noqa: BLE001 - every failure is data here
                reply = f"{index} error {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            out.write(REPLY + reply + "\n")
            out.flush()


# --------------------------------------------------------------------------------------------
# The parent: feed inputs, restart a dead child, count
# --------------------------------------------------------------------------------------------


class Child:
    """A corpus child process, talked to over pipes, with a timeout on each answer."""

    def __init__(self, job_file: Path, log_path: Path) -> None:
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(job_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            bufsize=0,
            cwd=str(ROOT),
        )
        self._buffer = b""
        # Paddle prints its C++ traceback of a fatal signal to stdout: keep the recent noise.
        self.noise: list[str] = []

    def ask(self, line: str | None, timeout: float) -> str:
        """Send ``line`` (if any) and return the next answer, ``EOF`` if the child's stdout closed
        (it died) or ``TIMEOUT``."""
        try:
            if line is not None:
                self.proc.stdin.write(line.encode() + b"\n")
        except BrokenPipeError:
            return EOF
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n", 1)
                text = raw.decode(errors="replace")
                if text.startswith(REPLY):
                    return text[len(REPLY) :]
                self.noise = [*self.noise[-199:], text]
            left = deadline - time.monotonic()
            if left <= 0:
                return TIMEOUT
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return EOF
                self._buffer += chunk

    def close(self, kill: bool = False) -> int:
        """Wait for the child to end (killing it first if ``kill``); its return code."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            # A crashing child may still be printing Paddle's C++ traceback after stdout closed.
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


def _describe_rc(rc: int) -> str:
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return f"exit {rc}"


def _crash_site(child: Child, log_path: Path) -> str:
    """The innermost frame of Paddle's C++ traceback of a dead child (stdout or stderr)."""
    lines = child.noise + log_path.read_text(errors="replace").splitlines()
    # Frames look like "10  phi::funcs::ConcatOneDNNHandler<float>::ConcatOneDNNHandler(...)".
    frames = [ln.split(None, 1)[1] for ln in lines if ln[:1].isdigit() and "  " in ln and " " in ln.strip()]
    return frames[-1].split("(")[0][:160] if frames else ""


def run_corpus(
    job: dict, workdir: Path, timeout: float, progress: bool
) -> dict[str, Any]:
    job_file = workdir / "job.json"
    job_file.write_text(json.dumps(job))
    specs = job["specs"]
    results: list[dict[str, Any] | None] = [None] * len(specs)
    crashes: list[dict[str, Any]] = []
    starts = 0
    child: Child | None = None
    log_path = workdir / "child.log"
    t0 = time.perf_counter()
    for i in range(len(specs)):
        if child is None:
            child = Child(job_file, log_path)
            starts += 1
            if child.ask(None, 600) != "ready":  # loading the model: minutes at most
                rc = child.close(kill=True)
                why = f"{_describe_rc(rc)}: {_crash_site(child, log_path)}"
                raise RuntimeError(f"the corpus child did not start ({why})")
        answer = child.ask(str(i), timeout)
        if answer in (EOF, TIMEOUT):  # died or hung: record, restart with the next input
            hung = answer == TIMEOUT
            rc = child.close(kill=hung)
            what = "hang" if hung else _describe_rc(rc)
            crashes.append({"index": i, "spec": specs[i], "what": what,
                            "site": "" if hung else _crash_site(child, log_path)})  # fmt: skip
            results[i] = {"status": "hang" if hung else "crash"}
            child = None
            continue
        _, status, *rest = answer.split(" ", 2)
        if status == "ok":
            n_all, n_above, ms, h, w = rest[0].split()
            results[i] = {"status": "ok", "boxes": int(n_all), "above": int(n_above),
                          "ms": float(ms), "h": int(h), "w": int(w)}  # fmt: skip
        else:
            results[i] = {"status": "error", "message": rest[0] if rest else ""}
        if progress and (i + 1) % 250 == 0:
            print(f"  {i + 1}/{len(specs)} inputs, {len(crashes)} crashes", flush=True)
    if child is not None:
        child.close()
    return {"results": results, "crashes": crashes, "starts": starts, "wall_s": time.perf_counter() - t0}


def summarise(job: dict, run: dict[str, Any], source_note: str) -> str:
    """The human-readable summary written to the results file."""
    import paddle
    import paddlex

    specs, results = job["specs"], run["results"]
    ok = [r for r in results if r["status"] == "ok"]
    errors = [(s, r) for s, r in zip(specs, results) if r["status"] == "error"]
    hangs = [c for c in run["crashes"] if c["what"] == "hang"]
    crashes = [c for c in run["crashes"] if c["what"] != "hang"]
    meta_path = Path(job["model_dir"]) / "starter.json"
    version = json.loads(meta_path.read_text()).get("format_version") if meta_path.is_file() else "?"
    families = Counter(s["family"] for s in specs)
    aspects = [r["w"] / r["h"] for r in ok]
    ms = np.asarray([r["ms"] for r in ok]) if ok else np.zeros(1)
    lines = [
        "starter detector crash corpus: PaddleX PP-ShiTuV2_det predictor, CPU, "
        f"run_mode {job['run_mode'] or 'PaddleX default (mkldnn = oneDNN on)'}",
        f"model dir: {Path(job['model_dir']).name} (starter format {version}); "
        f"paddle {paddle.__version__}, paddlex {paddlex.__version__}, {os.cpu_count()} CPUs",
        f"sources: {source_note}",
        "",
        f"inputs:   {len(specs)}",
        "  by variant: " + ", ".join(f"{k} {v}" for k, v in sorted(families.items())),
    ]
    if ok:
        lines += [
            f"  sizes: {min(r['h'] for r in ok)}-{max(r['h'] for r in ok)} px high, "
            f"{min(r['w'] for r in ok)}-{max(r['w'] for r in ok)} px wide; "
            f"aspect (w/h) 1:{1 / min(aspects):.0f} to {max(aspects):.0f}:1",
        ]
    lines += [
        "",
        f"crashes (child process died): {len(crashes)}",
        f"hangs (no answer in {job['timeout']:.0f} s): {len(hangs)}",
        f"errors (Python exceptions):   {len(errors)}",
        f"answered normally:            {len(ok)}",
        f"  NMS kept no box at the 0.05 floor (what crashed format 1): {sum(r['boxes'] == 0 for r in ok)}",
        f"  no box at the default threshold {job['threshold']}:          "
        f"{sum(r['above'] == 0 for r in ok)}",
        "",
        f"time: {run['wall_s']:.0f} s wall for {len(specs)} inputs ({len(specs) / run['wall_s']:.1f} inputs/s, "
        f"{run['starts']} child start(s)); predict() median {np.median(ms):.1f} ms, "
        f"p99 {np.percentile(ms, 99):.1f} ms",
    ]
    for c in run["crashes"][:20]:
        spec = c["spec"]
        src = Path(job["sources"][spec["source"]]).name if spec["source"] >= 0 else "synthetic"
        lines.append(f"  {c['what']}: input {c['index']} {src} {spec['family']} {spec['params']} {c['site']}")
    for spec, r in errors[:20]:
        src = Path(job["sources"][spec["source"]]).name if spec["source"] >= 0 else "synthetic"
        lines.append(f"  error: {src} {spec['family']} {spec['params']}: {r['message']}")
    return "\n".join(lines) + "\n"


def _quick_sources(workdir: Path) -> tuple[list[Path], list[Path], str]:
    """Sample-gallery photos (generated from scikit-image's) and the test fixtures' photos."""
    from shitu.sample import write_gallery, write_queries

    write_gallery(workdir / "gallery")
    many = _images_under(workdir / "gallery") + write_queries(workdir / "queries")
    full = _images_under(ROOT / "tests" / "fixtures")
    return many, full, (f"{len(many)} generated sample photos (shitu.sample), "
                        f"{len(full)} test fixture photo(s) with the full variant set")  # fmt: skip


def _shared_sources(data: Path) -> tuple[list[Path], list[Path], str]:
    gallery = _images_under(data / "drink_dataset" / "gallery")
    tests = _images_under(data / "drink_dataset" / "test_images")
    regressions = _images_under(data / "regressions") if (data / "regressions").is_dir() else []
    if not gallery:
        raise SystemExit(f"no gallery images under {data / 'drink_dataset'} (use --quick without ../shared)")
    return gallery, tests + regressions, (
        f"{len(gallery)} drink gallery images (original + 3 random variants each), "
        f"{len(tests)} test photos + {len(regressions)} regression photo(s) (full variant set each)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="a small corpus from the generated sample photos (no ../shared needed)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="the shared data folder (holds drink_dataset/ and regressions/)")
    parser.add_argument("--starter-dir", type=Path, default=None,
                        help="the starter pack folder (default: <SHITU_DATA_DIR>/models/starter)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="run this exported detector dir instead of the starter pack's")
    parser.add_argument("--run-mode", default=None, help="PaddleX run_mode (default: PaddleX's CPU default)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N inputs")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before an input counts as a hang")
    parser.add_argument("--out", type=Path, default=None,
                        help="summary file (default: bench/results/detector_corpus.txt; --quick: print only)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()  # fmt: skip
    if args.child:
        child_main(args.child)
        return

    from shitu.config import Settings
    from shitu.starter.detector import DEFAULT_DET_THRESHOLD, ensure_starter_detector

    with tempfile.TemporaryDirectory(prefix="detector-corpus-") as tmp:
        workdir = Path(tmp)
        many, full, note = _quick_sources(workdir) if args.quick else _shared_sources(args.data)
        sources, specs = build_corpus(many, full, args.quick, args.seed)
        if args.limit:
            specs = specs[: args.limit]
        if args.model_dir:
            model_dir = args.model_dir
        else:
            model_dir = ensure_starter_detector(args.starter_dir or Settings.from_env().models_dir / "starter")
        job = {
            "model_dir": str(model_dir.resolve()),
            "sources": [str(s) for s in sources],
            "specs": [asdict(s) for s in specs],
            "run_mode": args.run_mode,
            "timeout": args.timeout,
            "threshold": DEFAULT_DET_THRESHOLD,
        }
        print(f"{len(specs)} inputs from {note}", flush=True)
        run = run_corpus(job, workdir, args.timeout, progress=True)
        summary = summarise(job, run, note)
    print(summary, end="")
    out = args.out or (None if args.quick else ROOT / "bench" / "results" / "detector_corpus.txt")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(summary)
    # Non-zero when any input crashed, hung or raised, so CI and the smoke test can rely on it.
    sys.exit(1 if any(r["status"] != "ok" for r in run["results"]) else 0)


if __name__ == "__main__":
    main()
