"""Command line: ``python -m shitu <command>``. One map from subcommand to engine call.

python -m shitu build --gallery-root drinks/ --labels drinks/gallery.txt --index drinks
python -m shitu predict drinks/test_images/ --index drinks --out output/
python -m shitu remove --index drinks --ids 3 17 20-25
python -m shitu info --index drinks
python -m shitu serve --port 8080
python -m shitu get-config --save-path ./my_pipeline
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from shitu.adapt import ADAPT_MODES
from shitu.config import INDEX_TYPES, METRIC_TYPES, WHOLE_IMAGE_MODES, PipelineConfig, Settings
from shitu.engine import Engine
from shitu.errors import ShiTuError, Unavailable
from shitu.gallery import read_label_file
from shitu.ids import parse_ids, read_id_file
from shitu.native_output import native_stdout_filtered


class _Bar:
    """Adapts the pipeline's ``progress(done, total, what)`` callback to tqdm bars."""

    def __init__(self):
        self.bars: dict[str, object] = {}

    def __call__(self, done: int, total: int, what: str) -> None:
        from tqdm import tqdm

        bar = self.bars.get(what)
        if bar is None:
            bar = self.bars[what] = tqdm(total=total, desc=what, unit="img", leave=True)
        bar.update(done - bar.n)

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self.bars.values():
            bar.close()


def _settings(args) -> Settings:
    return Settings.from_env(
        data_dir=args.data_dir, device=args.device, pipeline_config=args.config, offline=args.offline or None
    )


def _engine(args, *, say_models: bool = True) -> Engine:
    # the CLI is one short-lived process: run PaddleX in it (no worker process to start)
    engine = Engine(_settings(args), isolate=False)
    if say_models:
        for stage, info in engine.models().items():
            if isinstance(info, dict):
                print(f"{stage}: {info['description']}", file=sys.stderr)
    return engine


def _index_ref(value: str) -> str | Path:
    """``--index``: a name in the data dir, or a directory path (PaddleX layout) when it
    contains a path separator (write ``./name`` for a directory in the current folder)."""
    return Path(value) if ("/" in value or "\\" in value) else value


def _print_report(report) -> None:
    data = report.to_dict()
    print(f"index {data['index']!r}: {data['entries']} entries, {data['labels']} labels "
          f"({data['index_type']}/{data['metric_type']}); added {data['added']}")  # fmt: skip
    for s in data["skipped"]:
        where = f"line {s['line']}" if s["line"] else s["source"]
        print(f"  skipped {where}: {s['reason']}")
    _print_calibration(data)


def _print_calibration(summary: dict) -> None:
    """What the index learnt from its gallery and the threshold it will use."""
    a = summary.get("adaptation")
    if a:
        state = "on" if a["applied"] else "off"
        print(f"adaptation ({a['mode']}): {state} — {a['reason']}")
    c = summary.get("calibration")
    if c:
        print(f"threshold {c['threshold']:.3f} ({'picked by the user' if c['chosen_by'] == 'user' else 'calibrated'}): "
              f"{c['correct_accepted']:.1%} of known objects answered correctly and accepted (top-1 without a "
              f"threshold {c['top1']:.1%}), {c['unknown_rejected']:.1%} of unknown objects rejected "
              f"({c['protocol']}, {c['known_queries']} queries"
              + (f"; {c['changes_since']} entries changed since: run 'shitu calibrate'" if c["changes_since"] else "")
              + ")")  # fmt: skip
    elif "calibration" in summary:
        print("no calibration: the gallery needs 3+ labels and 10+ entries whose label has a second photo")


def cmd_build(args) -> int:
    engine = _engine(args)
    batch = read_label_file(args.labels, args.gallery_root)
    with _Bar() as bar:
        report = engine.build(
            _index_ref(args.index), batch, index_type=args.index_type, metric_type=args.metric_type,
            overwrite=args.overwrite, skip_invalid=args.skip_invalid, progress=bar, whiten=args.whiten,
            adapt=args.adapt,
        )  # fmt: skip
    _print_report(report)
    return 0


def cmd_append(args) -> int:
    engine = _engine(args)
    batch = read_label_file(args.labels, args.gallery_root)
    with _Bar() as bar:
        report = engine.add(_index_ref(args.index), batch, skip_invalid=args.skip_invalid, progress=bar)
    _print_report(report)
    return 0


def _ids(args) -> list[int]:
    if args.ids and args.ids_file:
        raise ShiTuError("give --ids or --ids-file, not both")
    if args.ids_file:
        return read_id_file(args.ids_file)
    if not args.ids:
        raise ShiTuError("give --ids (e.g. 3 7 192-197) or --ids-file")
    return parse_ids(" ".join(args.ids))


def cmd_remove(args) -> int:
    ids = _ids(args)
    report = _engine(args, say_models=False).remove(_index_ref(args.index), ids)
    print(f"{args.index}: now {report.image_count} entries")
    return 0


def cmd_relabel(args) -> int:
    ids = _ids(args)
    _engine(args, say_models=False).relabel(_index_ref(args.index), ids, args.label)
    print(f"{args.index}: {len(ids)} entr{'y' if len(ids) == 1 else 'ies'} now labelled {args.label!r}")
    return 0


def cmd_predict(args) -> int:
    from tqdm import tqdm

    from shitu.render import caption
    from shitu.results import ShiTuResult

    engine = _engine(args)
    options = {"det_threshold": args.det_threshold, "rec_threshold": args.rec_threshold, "rec_topk": args.topk,
               "whole_image": args.whole_image}  # fmt: skip
    if args.no_nms or args.nms_iou is not None:
        options["nms_iou"] = None if args.no_nms else args.nms_iou
    inputs = args.input if len(args.input) > 1 else args.input[0]
    results = engine.recognize_many(inputs, _index_ref(args.index), **options)
    for rec in tqdm(results, desc="recognising", unit="img", file=sys.stderr):
        # an unknown box says its near miss: "unknown · maybe 农夫山泉 0.84 < 0.85"
        boxes = ", ".join(caption(o, threshold=rec.rec_threshold) for o in rec.objects)
        tqdm.write(f"{rec.input_path}: {boxes or 'nothing found'}", file=sys.stderr if args.json else sys.stdout)
        if args.out:
            res = ShiTuResult(rec)
            res.save_to_json(args.out)
            res.save_to_img(args.out)
        if args.json:
            print(json.dumps(rec.to_dict(), ensure_ascii=False))
    return 0


def cmd_info(args) -> int:
    engine = _engine(args, say_models=False)
    if args.index and isinstance(_index_ref(args.index), Path):
        print(json.dumps(engine.info(_index_ref(args.index)).to_dict(), indent=2, ensure_ascii=False))
        return 0
    info = {"models": engine.models(), "data_dir": str(engine.settings.data_dir), "indices": {}}
    for name in [args.index] if args.index else engine.index_names():
        info["indices"][name] = engine.info(name).to_dict()
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


# --- index versions: versions / changes / restore ---


def cmd_versions(args) -> int:
    versions = _engine(args, say_models=False).versions(_index_ref(args.name))
    if args.json:
        print(json.dumps([dataclasses.asdict(v) for v in versions], indent=2, ensure_ascii=False))
        return 0
    for v in versions:
        print(f"v{v.version:<4} {'current' if v.current else '       '}  {v.time or '?':20}  "
              f"{v.action or '?':18} {v.entries} entries, {v.labels} labels")  # fmt: skip
    return 0


def cmd_changes(args) -> int:
    engine = _engine(args, say_models=False)
    c = engine.version_changes(_index_ref(args.name), args.version, args.against, limit=args.limit)
    if args.json:
        print(json.dumps(c.to_dict(), indent=2, ensure_ascii=False))
        return 0
    against = f"v{c.against}" if c.against else "an empty index"
    print(f"{c.index} v{c.version} ({c.action or 'unknown change'}) against {against}: "
          f"{c.added_count} added, {c.removed_count} removed, {c.relabelled_count} relabelled; "
          f"{c.entries_before} -> {c.entries_after} entries")  # fmt: skip
    listed = (("+", c.added, c.added_count), ("-", c.removed, c.removed_count), ("~", c.relabelled, c.relabelled_count))
    for sign, entries, count in listed:
        for e in entries:
            print(f"  {sign} {e.id}  " + (f"{e.old_label} -> {e.new_label}" if sign == "~" else e.label))
        if count > len(entries):
            print(f"  {sign} ... and {count - len(entries)} more (--limit)")
    return 0


def cmd_restore(args) -> int:
    report = _engine(args, say_models=False).restore(_index_ref(args.name), args.version)
    s = report.summary
    print(f"{report.index}: version {s['restored_from']} restored as version {s['version']} "
          f"({s['entries']} entries, {s['labels']} labels)")  # fmt: skip
    return 0


# --- moving indices to and from Milvus ---


def _milvus_target(args) -> tuple[str, str | None, str]:
    settings = _settings(args)  # SHITU_MILVUS_URI / _TOKEN / _PREFIX: the collections the app serves from
    return args.uri or settings.milvus_target, args.token or settings.milvus_token, settings.milvus_prefix


def cmd_milvus_export(args) -> int:
    engine = _engine(args, say_models=False)
    uri, token, prefix = _milvus_target(args)
    target = args.to or Path(args.index).name
    n = engine.export_to_milvus(_index_ref(args.index), uri, target, token=token, prefix=prefix,
                                overwrite=args.overwrite)  # fmt: skip
    print(f"{args.index} -> Milvus gallery {target!r} at {uri}: {n} entries")
    return 0


def cmd_milvus_import(args) -> int:
    engine = _engine(args, say_models=False)
    uri, token, prefix = _milvus_target(args)
    report = engine.import_from_milvus(_index_ref(args.index), uri, args.source or Path(args.index).name,
                                       token=token, prefix=prefix, overwrite=args.overwrite)  # fmt: skip
    s = report.summary
    print(f"Milvus gallery {args.source or Path(args.index).name!r} -> {args.index}: {s['entries']} entries, "
          f"{s['labels']} labels ({s['index_type']}/{s['metric_type']}), next id {s['next_id']}")  # fmt: skip
    return 0


def cmd_calibrate(args) -> int:
    engine = _engine(args, say_models=False)
    with _Bar() as bar:
        summary = engine.calibrate(_index_ref(args.index), adapt=args.adapt, progress=bar).summary
    c = engine.calibration(_index_ref(args.index))
    if args.json:
        curve = None if c is None else {
            "threshold": c.threshold, "chosen_by": c.chosen_by, "top1": c.top1, "known": c.known_queries,
            "unknown": c.unknown_queries, "protocol": c.protocol, "points": [dataclasses.asdict(p) for p in c.curve],
        }  # fmt: skip
        print(json.dumps({**summary, "curve": curve}, ensure_ascii=False, indent=2))
        return 0
    print(f"index {engine.display_name(_index_ref(args.index))!r}: {summary['entries']} entries, "
          f"{summary['labels']} labels")  # fmt: skip
    _print_calibration(summary)
    if c is not None:
        print("threshold | correct & accepted | wrong & accepted | unknown rejected")
        points = c.curve
        for p in points[:: max(1, len(points) // 12)]:
            print(f"{p.threshold:9.3f} | {p.correct_accepted:18.1%} | {p.wrong_accepted:16.1%} | "
                  f"{p.unknown_rejected:.1%}")  # fmt: skip
    return 0


def cmd_teach(args) -> int:
    try:
        box = [float(v) for v in args.box.replace(",", " ").split()]
    except ValueError:
        raise ShiTuError("--box takes four numbers: x1,y1,x2,y2 (e.g. from 'shitu predict --json')") from None
    report = _engine(args).teach(_index_ref(args.index), args.image, box, args.label, source=str(args.image))
    s = report.summary
    print(f"added #{s['taught_id']} ({args.label}) to {report.index!r}: {s['entries']} entries, {s['labels']} labels")
    _print_calibration(s)
    return 0


def cmd_threshold(args) -> int:
    _print_calibration(_engine(args, say_models=False).set_threshold(_index_ref(args.index), args.value).summary)
    return 0


# --- quality report: evaluate ---


def cmd_evaluate(args) -> int:
    report = _engine(args, say_models=False).report(_index_ref(args.name))
    wrote: list[Path] = []
    try:
        if args.html:
            args.html.parent.mkdir(parents=True, exist_ok=True)
            args.html.write_text(report.to_html(lang=args.lang), encoding="utf-8")
            wrote.append(args.html)
        if args.csv:
            args.csv.mkdir(parents=True, exist_ok=True)
            for kind in ("labels", "entries", "pairs"):
                # utf-8-sig: spreadsheets then read Chinese labels as UTF-8
                (args.csv / f"{kind}.csv").write_text(report.to_csv(kind), encoding="utf-8-sig", newline="")
                wrote.append(args.csv / f"{kind}.csv")
    except OSError as exc:
        raise ShiTuError(f"cannot write the report: {exc.strerror or exc} ({exc.filename})") from None
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        print("\n".join(report.summary_lines()))
    for path in wrote:
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_serve(args) -> int:
    from shitu.api import serve

    serve(Engine(_settings(args)), host=args.host, port=args.port)
    return 0


def cmd_get_config(args) -> int:
    path = PipelineConfig().save(args.save_path)
    print(f"pipeline config written to {path}")
    return 0


def cmd_setup(args) -> int:
    """Prepare models and the sample index now (for images/containers built ahead of time)."""
    engine = _engine(args)
    engine.prepare_models()
    print("sample index:", engine.ensure_sample_index())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shitu", description="PP-ShiTuV2 recognition studio")
    parser.add_argument("--data-dir", type=Path, help="indices and model cache (default: $SHITU_DATA_DIR)")
    parser.add_argument("--config", type=Path, help="PaddleX PP-ShiTuV2 pipeline YAML")
    parser.add_argument("--device", help="cpu, gpu:0, ...")
    parser.add_argument("--offline", action="store_true", help="never try a model hub")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    index_help = "a named index in the data dir, or a directory path such as ./my_index (PaddleX layout)"
    p = add("build", cmd_build, "build an index from a gallery folder and a label file")
    p.add_argument("--gallery-root", required=True, type=Path)
    p.add_argument("--labels", required=True, type=Path, help="PaddleX label file: 'path label' per line")
    p.add_argument("--index", required=True, help=index_help)
    p.add_argument("--index-type", choices=INDEX_TYPES, default="Flat", help="Flat: exact (default)")
    p.add_argument("--metric-type", choices=METRIC_TYPES, default="IP")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--skip-invalid", action="store_true", help="leave out unusable lines instead of failing")
    p.add_argument("--whiten", action="store_true", help="fit database-side whitening on the gallery (200+ images)")
    p.add_argument("--adapt", choices=ADAPT_MODES, default="auto",
                   help="fit the features to the gallery's labels: auto (where held-out recall improves), on, off")

    p = add("calibrate", cmd_calibrate, "refit an index's projection and remeasure its threshold curve")
    p.add_argument("--index", required=True, help=index_help)
    p.add_argument("--adapt", choices=ADAPT_MODES, help="default: the mode the index was built with")
    p.add_argument("--json", action="store_true", help="print the summary and the whole curve as JSON")

    p = add("teach", cmd_teach, "add one box of an image (e.g. a wrong or unknown result) under the right label")
    p.add_argument("image", type=Path)
    p.add_argument("--index", required=True, help=index_help)
    p.add_argument("--box", required=True, help="x1,y1,x2,y2 in image pixels (a bbox of 'shitu predict --json')")
    p.add_argument("--label", required=True)

    p = add("threshold", cmd_threshold, "set an index's own recognition threshold (a point on its curve)")
    p.add_argument("--index", required=True, help=index_help)
    p.add_argument("value", type=float)

    p = add("append", cmd_append, "add a gallery to an existing index")
    p.add_argument("--gallery-root", required=True, type=Path)
    p.add_argument("--labels", required=True, type=Path)
    p.add_argument("--index", required=True, help=index_help)
    p.add_argument("--skip-invalid", action="store_true")

    p = add("remove", cmd_remove, "remove entries by id")
    p.add_argument("--index", required=True, help=index_help)
    p.add_argument("--ids", nargs="+", help="ids and ranges, e.g. 3 7 192-197")
    p.add_argument("--ids-file", type=Path, help="text file with one id (or range) per line")

    p = add("relabel", cmd_relabel, "give entries a new label")
    p.add_argument("--index", required=True, help=index_help)
    p.add_argument("--ids", nargs="+", help="ids and ranges, e.g. 3 7 192-197")
    p.add_argument("--ids-file", type=Path, help="text file with one id (or range) per line")
    p.add_argument("--label", required=True)

    p = add("predict", cmd_predict, "recognise images (files, dirs, URLs)")
    p.add_argument("input", nargs="+")
    p.add_argument("--index", required=True, help=index_help)
    p.add_argument("--out", type=Path, help="write <name>_res.json and <name>_res.jpg here")
    p.add_argument("--json", action="store_true", help="print each result as JSON")
    p.add_argument("--det-threshold", type=float)
    p.add_argument("--rec-threshold", type=float)
    p.add_argument("--topk", type=int)
    p.add_argument("--whole-image", choices=WHOLE_IMAGE_MODES)
    p.add_argument("--nms-iou", type=float)
    p.add_argument("--no-nms", action="store_true")

    p = add("info", cmd_info, "show active models and index statistics")
    p.add_argument("--index", help=index_help)

    p = add("versions", cmd_versions, "list an index's versions (every change is one), newest first")
    p.add_argument("name", help=index_help)
    p.add_argument("--json", action="store_true", help="print them as JSON")

    p = add("changes", cmd_changes, "show what changed in a version: ids added, removed, relabelled")
    p.add_argument("name", help=index_help)
    p.add_argument("version", help="a version number, e.g. 3 or v3")
    p.add_argument("--against", help="compare with this version (default: the one before; 0: an empty index)")
    p.add_argument("--limit", type=int, default=50, help="entries listed per kind of change (default 50)")
    p.add_argument("--json", action="store_true", help="print the changes as JSON")

    p = add("restore", cmd_restore, "make an earlier version current again (as a new version)")
    p.add_argument("name", help=index_help)
    p.add_argument("version", help="a version number, e.g. 3 or v3")

    p = add("evaluate", cmd_evaluate, "a quality report of an index: recall, confusions, suspected mislabels, "
            "near duplicates, threshold curve, map")  # fmt: skip
    p.add_argument("name", help=index_help)
    p.add_argument("--html", type=Path, metavar="FILE", help="write the report as one self-contained HTML page")
    p.add_argument("--csv", type=Path, metavar="DIR", help="write labels.csv, entries.csv and pairs.csv here")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a summary")
    p.add_argument("--lang", choices=("en", "zh"), default="en", help="language of the HTML page")

    def milvus(name: str, func: Callable, help_: str, gallery: str, overwrite: str) -> None:
        p = add(name, func, help_)
        p.add_argument("--index", required=True, help=index_help)
        p.add_argument("--uri", help="Milvus: a local Milvus Lite path ending in .db, or http(s)://host:port "
                       "(default: $SHITU_MILVUS_URI, else <data dir>/milvus.db)")  # fmt: skip
        p.add_argument("--token", help="Milvus token ('user:password' or an API key; default: $SHITU_MILVUS_TOKEN)")
        p.add_argument(gallery, help="the gallery's name in Milvus (default: the index's name)")
        p.add_argument("--overwrite", action="store_true", help=overwrite)

    milvus("milvus-export", cmd_milvus_export, "copy an index into a Milvus collection (ids, labels, sources, "
           "thumbnails, unprojected vectors, metadata); needs pymilvus (+ milvus-lite for a local file)",
           "--to", "replace a gallery of that name in Milvus")  # fmt: skip
    milvus("milvus-import", cmd_milvus_import, "make an index from a Milvus gallery (the projection is refitted "
           "and the threshold curve remeasured, as a build would)",
           "--source", "replace an index of that name")  # fmt: skip

    p = add("serve", cmd_serve, "serve the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)

    p = add("get-config", cmd_get_config, "write the default pipeline YAML")
    p.add_argument("--save-path", type=Path, default=Path("."))

    add("setup", cmd_setup, "prepare the models and the sample index")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        with native_stdout_filtered():
            return args.func(args)
    except Unavailable as exc:  # try again later / fix the installation
        print(f"error: {exc.message}", file=sys.stderr)
        return 3
    except ShiTuError as exc:  # fix the input
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


def main_exit() -> None:
    """The ``shitu`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
