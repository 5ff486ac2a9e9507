"""The gallery report (shitu/report.py) on small synthetic galleries with known problems, and its
four ways out: Python (Engine.report, pipeline.evaluate), HTTP, CLI, and the HTML/CSV exports.

The gallery: 6 labels x 8 tight clusters of 64-d vectors, built through GalleryIndex.build, with
one photo of "e" labelled "f" (mislabelled), an exact copy of a photo of label 2 stored under
"b&q" (a conflicting duplicate), a label with one image and one with two. The report must flag
exactly those, and its recall must equal a brute-force leave-one-out count done here.
"""

from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from shitu.__main__ import main
from shitu.api import create_api
from shitu.calibrate import calibrate_gallery
from shitu.engine import Engine
from shitu.errors import ShiTuError
from shitu.index import GalleryIndex
from shitu.paddlex_api import ShiTuPipeline
from shitu.report import GalleryReport, Limits, curve_svg, gallery_report, map_svg, tsne_2d
from shitu.stores.layout import save_index

from .conftest import MODEL_CACHE, make_settings

DIM = 64
VIEWS = 8
LABELS = ["脉动", "<script>alert('x')</script>", '=HYPERLINK("http://evil")', "b&q", "e", "f"]
MISLABELLED = 4 * VIEWS + 7  # a photo of "e" labelled "f"
ORIGINAL = 2 * VIEWS + 3  # a photo of LABELS[2] ...
DUPLICATE = 6 * VIEWS  # ... and its exact copy, labelled "b&q"
SOLO, DUO = DUPLICATE + 1, (DUPLICATE + 2, DUPLICATE + 3)


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return buf.getvalue()


def build_gallery(index_type: str = "Flat", metric_type: str = "IP") -> GalleryIndex:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(8, DIM))
    feats, labels = [], []
    for c, label in enumerate(LABELS):
        for _ in range(VIEWS):
            feats.append(centres[c] + 0.5 * rng.normal(size=DIM))
            labels.append(label)
    labels[MISLABELLED] = "f"
    feats.append(feats[ORIGINAL].copy())
    labels.append("b&q")
    feats.append(centres[6] + 0.5 * rng.normal(size=DIM))
    labels.append("solo")
    for _ in DUO:
        feats.append(centres[7] + 0.5 * rng.normal(size=DIM))
        labels.append("duo")
    thumbs = [jpeg((40 * (k % 6), 200, 90)) for k in range(len(labels))]
    return GalleryIndex.build(
        np.asarray(feats, np.float32), labels, index_type=index_type, metric_type=metric_type,
        thumbnails=thumbs, sources=[f"photos/{k}.jpg" for k in range(len(labels))],
    )  # fmt: skip


def brute_force(index: GalleryIndex) -> dict:
    """Leave-one-out by hand: every entry against every other, full similarity matrix; equal
    similarities (to 5 decimals: the duplicate's two copies) in storage order, as the report does."""
    ids, x = index.vectors()
    labels = np.array([index.id_map[int(i)] for i in ids])
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    columns = np.broadcast_to(np.arange(len(x)), sims.shape)
    order = np.lexsort((columns, -np.round(sims, 5)), axis=-1)
    counts = {lab: int((labels == lab).sum()) for lab in set(labels)}
    evaluable = np.array([counts[lab] >= 2 for lab in labels])
    top1 = labels[order[:, 0]] == labels
    top5 = (labels[order[:, :5]] == labels[:, None]).any(axis=1)
    per_label = {
        lab: (round(float(top1[(labels == lab)].mean()), 4), round(float(top5[(labels == lab)].mean()), 4))
        for lab in counts
        if counts[lab] >= 2
    }
    wrong = {int(ids[i]) for i in np.flatnonzero(evaluable & ~top1)}
    return {
        "r1": round(float(top1[evaluable].mean()), 4),
        "r5": round(float(top5[evaluable].mean()), 4),
        "per_label": per_label,
        "wrong": wrong,
        "evaluable": int(evaluable.sum()),
    }


@pytest.fixture(scope="module")
def gallery() -> GalleryIndex:
    return build_gallery()


@pytest.fixture(scope="module")
def rep(gallery) -> GalleryReport:
    return gallery_report(gallery, name="demo")


# --- what the report finds -------------------------------------------------------------------


@pytest.mark.parametrize(("index_type", "metric_type"), [("Flat", "IP"), ("HNSW32", "L2"), ("IVF", "IP")])
def test_flags_exactly_the_planted_problems_and_recall_matches_brute_force(index_type, metric_type):
    index = build_gallery(index_type, metric_type)
    r = gallery_report(index)
    expected = brute_force(index)
    assert (r.entries, r.labels, r.evaluable, r.evaluated, r.sampled) == (52, 8, 51, 51, False)
    assert (r.recall_at_1, r.recall_at_5) == (expected["r1"], expected["r5"])
    # the planted problems and their one side effect: #36 ("e") is nearest to the mislabelled "e" photo
    assert expected["wrong"] == {ORIGINAL, DUPLICATE, MISLABELLED, MISLABELLED - 3}
    assert r.recall_at_1 == round(47 / 51, 4)
    for row in r.per_label:
        if row.images >= 2:
            assert (row.recall_at_1, row.recall_at_5) == expected["per_label"][row.label], row.label
        else:
            assert (row.queries, row.recall_at_1) == (0, None)
    # suspected mislabelled: exactly the planted one, with the right suggestion
    assert [(s.id, s.label, s.suggested_label, s.agree) for s in r.mislabelled] == [(MISLABELLED, "f", "e", 5)]
    assert r.mislabelled[0].own_similarity < r.mislabelled[0].similarity
    assert r.label_row("e").images == 7 and r.label_row("f").images == 9
    # near duplicates: exactly the planted conflicting pair; the neighbourhood sides with LABELS[2]
    assert [(d.id_a, d.id_b, d.conflicting, d.suggested_label) for d in r.duplicates] == [
        (ORIGINAL, DUPLICATE, True, LABELS[2])
    ]
    assert r.duplicates[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert r.duplicate_counts == {"conflicting": 1, "redundant": 0}
    # too few images
    assert [(f.label, f.images, f.ids, f.status) for f in r.few_images] == [
        ("solo", 1, [SOLO], "cannot be evaluated"), ("duo", 2, list(DUO), "fragile")
    ]  # fmt: skip
    # outliers: the leave-one-out top-1 errors, as brute force finds them
    assert {o.id for o in r.outliers} == expected["wrong"]
    assert r.outlier_count == 4
    # confused pairs: both directions summed, examples per side
    pairs = {frozenset((p.label_a, p.label_b)): p for p in r.confused_pairs}
    assert set(pairs) == {frozenset((LABELS[2], "b&q")), frozenset(("e", "f"))}
    assert pairs[frozenset(("e", "f"))].errors == 2  # #39 answered "e", #36 answered "f"
    dup_pair = pairs[frozenset((LABELS[2], "b&q"))]
    assert (dup_pair.errors, dup_pair.a_to_b, dup_pair.b_to_a) == (2, 1, 1)
    assert r.confused_pairs[0] is dup_pair  # most errors first
    examples = {(e.id, e.matched_id) for e in dup_pair.examples_a + dup_pair.examples_b}
    assert examples == {(ORIGINAL, DUPLICATE), (DUPLICATE, ORIGINAL)}
    # worst labels first
    assert r.per_label[0].recall_at_1 == min(x.recall_at_1 for x in r.per_label if x.recall_at_1 is not None)
    assert r.label_row("f").confused_with == "e" and r.label_row("f").confused_count == 1


def test_map_has_every_entry_outliers_marked_and_labels_kept_apart(rep):
    pts = rep.map_points
    assert len(pts) == rep.map_total == 52 and not rep.map_sampled
    assert {p.id for p in pts if p.outlier} == {ORIGINAL, DUPLICATE, MISLABELLED, MISLABELLED - 3}
    xy = np.array([[p.x, p.y] for p in pts])
    assert xy.min() >= 0 and xy.max() <= 1
    # readable: each photo's nearest point on the map comes from the same cluster (true label)
    cluster = np.array([min(p.id // VIEWS, 6) for p in pts])
    cluster[[p.id == DUPLICATE for p in pts]] = ORIGINAL // VIEWS
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    main_clusters = cluster < 6
    assert np.mean((cluster[d.argmin(1)] == cluster)[main_clusters]) >= 0.95
    # deterministic
    again = gallery_report(build_gallery(), name="demo")
    assert [(p.id, p.x, p.y) for p in again.map_points] == [(p.id, p.x, p.y) for p in pts]


def test_tsne_separates_clusters_and_handles_tiny_inputs():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(10, 32))
    labels = np.repeat(np.arange(10), 30)
    x = centres[labels] + 0.3 * rng.normal(size=(300, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    y = tsne_2d(x)
    d = ((y[:, None] - y[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert np.mean(labels[d.argmin(1)] == labels) >= 0.98
    for n in (1, 2, 3, 4, 5, 6):
        out = tsne_2d(x[:n])
        assert out.shape == (n, 2) and np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("n", [5, 8, 12, 16, 32])
def test_small_maps_keep_every_point_apart_and_report_progress(n):
    """A few dozen photos with no cluster structure: early exaggeration must not squeeze the map
    into one spot that Barnes-Hut cannot pull apart (it did at these sizes with openTSNE's own
    learning rate, n / exaggeration)."""
    x = np.random.default_rng(0).normal(size=(n, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    seen: list[tuple[int, int]] = []
    y = tsne_2d(x, progress=lambda done, total: seen.append((done, total)))
    assert len(np.unique(y.round(3), axis=0)) == n
    assert y.min() == 0 and y.max() == 1
    assert seen[-1] == (300, 300) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_threshold_curve_is_the_index_calibration_or_computed_from_the_gallery(gallery, rep):
    own = getattr(gallery, "calibration", None)
    ids, x = gallery.vectors()
    computed = calibrate_gallery(x, [gallery.id_map[int(i)] for i in ids])
    expected = own if own is not None else computed
    assert rep.calibration_source == ("index" if own is not None else "computed")
    assert rep.calibration.threshold == expected.threshold and rep.calibration.points == expected.points

    class Bare:  # an index object without a calibration attribute: the report computes one
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name == "calibration":
                raise AttributeError(name)
            return getattr(self._inner, name)

    bare = gallery_report(Bare(gallery))  # type: ignore[arg-type]
    assert bare.calibration_source == "computed"
    # integer label codes inside the report give the same curve as the labels themselves
    assert bare.calibration.threshold == computed.threshold and bare.calibration.points == computed.points


def test_sampled_path_above_the_full_limit():
    """Above the full limit: a seeded sample of queries against the full gallery, an approximate
    all-entry pass for mislabels and duplicates, every mislabel confirmed exactly."""
    limits = Limits(full_limit=20, sample_queries=30, map_points=24)
    index = build_gallery()
    r = gallery_report(index, limits=limits)
    assert r.sampled and r.evaluated == 30 and r.evaluable == 51
    assert sum(row.queries for row in r.per_label) == 30
    assert any("sample of 30" in note for note in r.notes)
    assert [s.id for s in r.mislabelled] == [MISLABELLED]
    assert [(d.id_a, d.id_b, d.conflicting) for d in r.duplicates] == [(ORIGINAL, DUPLICATE, True)]
    assert {o.id for o in r.outliers} <= {ORIGINAL, DUPLICATE, MISLABELLED, MISLABELLED - 3}
    # the map: whole labels (clusters stay whole), within the budget, the planted problems' labels first
    assert 0 < len(r.map_points) <= 24 and r.map_total == 52 and r.map_sampled
    drawn = {p.label for p in r.map_points}
    sizes = {row.label: row.images for row in r.per_label}
    assert all(sum(p.label == lab for p in r.map_points) == sizes[lab] for lab in drawn)
    assert drawn & {LABELS[2], "b&q", "e", "f"}
    assert gallery_report(index, limits=limits).to_dict() == {**r.to_dict(), "timings": ANY, "seconds": ANY}


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY = _Any()


def test_single_entry_and_single_label_galleries():
    one = GalleryIndex.build(np.ones((1, 8), np.float32), ["only"], index_type="Flat")
    r = gallery_report(one)
    assert (r.entries, r.evaluated, r.recall_at_1, r.calibration, len(r.map_points)) == (1, 0, None, None, 1)
    assert "cannot be evaluated" in r.to_html() and r.to_csv("entries").count("\n") == 1
    same = GalleryIndex.build(np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32), ["a"] * 6,
                              index_type="Flat")  # fmt: skip
    r = gallery_report(same)
    assert (r.recall_at_1, r.recall_at_5, r.mislabelled, r.calibration_source) == (1.0, 1.0, [], "none")


def test_progress_reports_each_stage(gallery):
    seen: list[tuple[int, int, str]] = []
    gallery_report(gallery, progress=lambda done, total, what: seen.append((done, total, what)))
    assert {"neighbours", "threshold curve", "map"} <= {what for _, _, what in seen}
    assert all(0 <= done <= total for done, total, _ in seen)
    assert (51, 52, "neighbours") not in seen and (52, 52, "neighbours") in seen


# --- exports -----------------------------------------------------------------------------------

VOID = {"meta", "img", "br", "hr", "input", "link", "rect", "line", "polyline", "path"}


class TagChecker(HTMLParser):
    """Fails on a closing tag that does not match the open one; records tags and text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.titles: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in VOID:
            self.stack.append(tag)
        self._in_title = tag == "title"

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        self._in_title = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_title:
            self.titles.append(data)


def test_html_is_one_well_formed_self_contained_page_with_labels_escaped(rep):
    page = rep.to_html()
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.stack == [], checker.stack
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert "Noto Sans CJK SC" in page and "Microsoft YaHei" in page  # a CJK-capable font stack
    # the hostile label is text, never markup
    assert "script" not in checker.tags and "<script" not in page.lower().replace("&lt;script", "")
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    text = "".join(checker.text)
    assert "<script>alert('x')</script>" in text and "脉动" in text and "b&q" in text
    # self-contained: thumbnails inline, nothing fetched
    assert "data:image/jpeg;base64," in page
    fetched = page.replace("http://www.w3.org/2000/svg", "").replace("HYPERLINK(&#34;http://evil&#34;)", "")
    assert "http://" not in fetched and "https://" not in fetched and 'src="http' not in fetched
    assert checker.tags.count("svg") == 2  # the curve and the map
    assert f"脉动 #{0}" in checker.titles
    zh = rep.to_html(lang="zh")
    assert '<html lang="zh-CN">' in zh and "疑似标错" in zh


def test_map_svg_has_one_circle_per_point_rings_for_outliers_and_escaped_tooltips(rep):
    svg = map_svg(rep)
    checker = TagChecker()
    checker.feed(svg)
    assert checker.stack == []
    assert checker.tags.count("circle") == len(rep.map_points) == 52
    assert svg.count('fill="#fff" fill-opacity="0.6"') == 4  # the four outliers are rings
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; #8" in svg
    assert f"f #{MISLABELLED} (outlier)" in checker.titles


def test_curve_svg_marks_the_chosen_and_highlighted_thresholds(rep):
    svg = curve_svg(rep.calibration, highlight=0.5)
    assert svg.count("<polyline") == 3 and f"chosen {rep.calibration.threshold:.3f}" in svg and "in use 0.500" in svg
    assert "<svg" not in curve_svg(None)  # a note instead of an empty plot


def test_csv_tables_parse_and_defuse_formulas(rep):
    labels = list(csv.DictReader(io.StringIO(rep.to_csv("labels"))))
    assert len(labels) == 8
    by_label = {row["label"]: row for row in labels}
    assert "'" + LABELS[2] in by_label and LABELS[2] not in by_label  # a formula stays text
    assert by_label["solo"]["too_few_images"] == "cannot be evaluated" and by_label["solo"]["recall_at_1"] == ""
    assert by_label["脉动"]["recall_at_1"] == "1.0000"
    entries = list(csv.DictReader(io.StringIO(rep.to_csv("entries"))))
    issues = {(int(row["id"]), row["issue"]) for row in entries}
    assert issues == {
        (MISLABELLED, "suspected mislabelled"), (ORIGINAL, "conflicting duplicate"),
        (DUPLICATE, "conflicting duplicate"), (MISLABELLED, "outlier"), (ORIGINAL, "outlier"), (DUPLICATE, "outlier"),
        (MISLABELLED - 3, "outlier"),
    }  # fmt: skip
    row = next(r for r in entries if r["issue"] == "suspected mislabelled")
    assert (row["label"], row["suggested_label"], row["agree"], row["source"]) == ("f", "e", "5/5", "photos/39.jpg")
    pairs = list(csv.DictReader(io.StringIO(rep.to_csv("pairs"))))
    assert sorted((r["errors"], r["a_to_b"], r["b_to_a"]) for r in pairs) == [("2", "1", "1")] * 2
    with pytest.raises(ShiTuError, match="unknown CSV table"):
        rep.to_csv("everything")


def test_to_dict_is_json_and_has_every_section(rep):
    data = json.loads(json.dumps(rep.to_dict(), ensure_ascii=False))
    for key in ("recall_at_1", "recall_at_5", "per_label", "confused_pairs", "mislabelled", "duplicates",
                "few_images", "outliers", "calibration", "map", "timings", "seconds", "evaluation"):  # fmt: skip
        assert key in data
    assert data["evaluation"]["sampled"] is False and data["evaluation"]["evaluated"] == 51
    assert len(data["map"]["points"]) == 52
    assert set(rep.timings) >= {"neighbours", "calibration", "map"} and rep.seconds >= sum(rep.timings.values()) - 1e-3
    assert any("recall@1" in line for line in rep.summary_lines())


# --- the four front ends -----------------------------------------------------------------------


@pytest.fixture
def stored(tmp_path) -> Engine:
    """An engine on a fresh data dir holding the synthetic gallery as index 'demo' (no models needed)."""
    engine = Engine(make_settings(tmp_path / "data"))
    engine._store.put("demo", build_gallery())  # either backend (SHITU_TEST_VECTOR_STORE)
    yield engine
    engine.close()


def test_engine_report_is_cached_per_index_version(stored):
    first = stored.report("demo")
    assert first.name == "demo" and [s.id for s in first.mislabelled] == [MISLABELLED]
    assert stored.report("demo") is first
    stored.relabel("demo", [MISLABELLED], "e")  # fix the planted mistake: a new version
    second = stored.report("demo")
    assert second is not first and second.mislabelled == [] and second.label_row("f").images == 8
    assert stored.report(stored.index("demo")).recall_at_1 == second.recall_at_1
    with pytest.raises(ShiTuError, match="no index named"):
        stored.report("nothing-here")


def test_pipeline_evaluate(stored):
    pipeline = ShiTuPipeline(stored)
    index = stored.index("demo")
    assert [s.id for s in pipeline.evaluate(index).mislabelled] == [MISLABELLED]
    assert ShiTuPipeline(stored, index=index).evaluate().entries == 52
    with pytest.raises(ShiTuError, match="no index given"):
        pipeline.evaluate()


def test_http_report_json_html_csv_and_404(stored):
    client = TestClient(create_api(stored))
    r = client.get("/shitu-index/demo/report")
    assert r.status_code == 200
    body = r.json()
    assert body["errorCode"] == 0 and body["result"]["indexKey"] == "demo"
    assert body["result"]["recall_at_1"] == round(47 / 51, 4)
    assert [s["id"] for s in body["result"]["mislabelled"]] == [MISLABELLED]
    r = client.get("/shitu-index/demo/report", params={"format": "html", "lang": "zh"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert (
        "script-src" not in r.headers["content-security-policy"]
        and "default-src 'none'" in r.headers["content-security-policy"]
    )
    assert "<svg" in r.text and "&lt;script&gt;" in r.text and "图库评估报告" in r.text
    r = client.get("/shitu-index/demo/report", params={"format": "csv", "csv": "entries"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert 'filename="demo-entries.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.content.decode("utf-8-sig"))))
    assert {int(row["id"]) for row in rows} == {MISLABELLED, ORIGINAL, DUPLICATE, MISLABELLED - 3}
    r = client.get("/shitu-index/nothing-here/report")
    assert r.status_code == 404 and r.json()["errorCode"] == 404 and "nothing-here" in r.json()["errorMsg"]
    r = client.get("/shitu-index/demo/report", params={"format": "xml"})
    assert r.status_code == 422 and r.json()["errorCode"] == 422


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SHITU_MODEL_DIR", str(MODEL_CACHE))
    monkeypatch.setenv("SHITU_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SHITU_OFFLINE", "1")
    save_index(build_gallery(), tmp_path / "data" / "indices" / "demo")
    return tmp_path


def test_cli_evaluate_prints_a_summary_and_writes_html_and_csv(cli_env, capsys):
    html_file, csv_dir = cli_env / "out" / "report.html", cli_env / "out" / "csv"
    assert main(["evaluate", "demo", "--html", str(html_file), "--csv", str(csv_dir)]) == 0
    out = capsys.readouterr().out
    assert "52 entries, 8 labels" in out and f"recall@1 {47 / 51:.1%}" in out
    assert "1 suspected mislabelled" in out and "1 conflicting" in out and "time:" in out
    assert html_file.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    for kind in ("labels", "entries", "pairs"):
        assert list(csv.reader(io.StringIO((csv_dir / f"{kind}.csv").read_text(encoding="utf-8-sig"))))
    assert main(["evaluate", str(cli_env / "data" / "indices" / "demo"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mislabelled"][0]["id"] == MISLABELLED
    assert main(["evaluate", "nothing-here"]) == 2
    assert "no index named 'nothing-here'" in capsys.readouterr().err
