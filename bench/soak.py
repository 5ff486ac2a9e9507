"""A bounded soak of the real server: many clients, a CLI writer beside it, invariants checked.

``clients`` threads send a mix of PaddleX's requests to one index on a server at 127.0.0.1
(``/shitu-infer`` with the sample gallery's photos, ``/shitu-index-add`` of one pair,
``/shitu-index-remove`` of an id that client added earlier, ``GET /health``), and optionally
one ``python -m shitu append`` after another writes to the same index from a separate process
(same ``SHITU_DATA_DIR``). Every few seconds and at the end it checks, over HTTP and on disk:

* every acknowledged add (the id its answer's ``idMap`` gave the client's unique label) is
  present with that label unless that client removed it; removed ids stay gone;
* no id is handed out twice; every acknowledged CLI append is present exactly once;
* ``imageCount == len(idMap)``, and on disk ``ntotal == len(id_map)``
  (:func:`shitu.stores.layout.load_index` under the index's lock, so no save is read half-done).

It reports per-endpoint latency (p50/p99), throughput and status counts; a 5xx is a failure.
Only 127.0.0.1 is contacted; the run stops by itself after ``seconds`` (the requests in flight
then finish) and sends at most ``MAX_REQUESTS_PER_CLIENT`` requests per client.

    python bench/soak.py [--seconds 30] [--clients 8] [--no-cli-writer]

starts ``app.build_app(Engine())`` (API + UI) under uvicorn on a free port, soaks it, prints a
table and writes ``bench/results/soak.txt``.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shitu.api import serving  # noqa: E402
from shitu.stores.files import FileStore as IndexStore  # noqa: E402
from shitu.stores.layout import load_index  # noqa: E402

RESULTS = REPO / "bench" / "results" / "soak.txt"
MAX_REQUESTS_PER_CLIENT = 20_000
REQUEST_TIMEOUT = 120.0  # seconds; a request slower than this counts as an error, not a hang
CLI_TIMEOUT = 300.0
MIX = (("infer", 0.45), ("add", 0.25), ("remove", 0.15), ("health", 0.15))
ENDPOINTS = {
    "infer": "POST /shitu-infer",
    "add": "POST /shitu-index-add",
    "remove": "POST /shitu-index-remove",
    "health": "GET /health",
    "listing": "GET /shitu-index/{key}",
    "cli": "python -m shitu append",
}


@dataclass
class _State:
    """What the clients were told, and what the checks found (all under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[int, str] = field(default_factory=dict)  # id → label, every add ever acknowledged
    removing: set[int] = field(default_factory=set)  # removal sent (landed or not)
    removed: set[int] = field(default_factory=set)  # removal acknowledged
    cli_acked: list[str] = field(default_factory=list)  # labels of acknowledged CLI appends
    cli_pending: set[str] = field(default_factory=set)  # appends started, not acknowledged
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    checks: int = 0

    def record(self, what: str, seconds: float, status: int, detail: str = "") -> None:
        with self.lock:
            self.latencies.setdefault(what, []).append(seconds)
            counts = self.statuses.setdefault(what, {})
            counts[status] = counts.get(status, 0) + 1
            if status != 200 and len(self.errors) < 50:
                self.errors.append(f"{ENDPOINTS[what]} → {status}: {detail[:300]}")

    def violate(self, message: str) -> None:
        with self.lock:
            if len(self.violations) < 100:
                self.violations.append(message)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _gallery_lines(label_file: Path) -> list[str]:
    return [line.split("\t")[0] for line in label_file.read_text(encoding="utf-8").splitlines() if line.strip()]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _check_local(base_url: str) -> str:
    host = urlparse(base_url).hostname
    if host != "127.0.0.1":
        raise ValueError(f"the soak only talks to 127.0.0.1, not {host!r}")
    return base_url.rstrip("/")


# --- the workload ------------------------------------------------------------------------------


def _post(session: requests.Session, state: _State, what: str, url: str, payload: dict) -> dict | None:
    """One request, timed and counted; the envelope's ``result`` if it succeeded."""
    start = time.perf_counter()
    try:
        resp = session.post(url, json=payload, timeout=REQUEST_TIMEOUT)
    except requests.RequestException as exc:
        state.record(what, time.perf_counter() - start, 0, f"{type(exc).__name__}: {exc}")
        return None
    state.record(what, time.perf_counter() - start, resp.status_code, resp.text)
    if resp.status_code != 200:
        return None
    body = resp.json()
    if body.get("errorCode") != 0:
        state.violate(f"{ENDPOINTS[what]}: HTTP 200 with errorCode {body.get('errorCode')}")
        return None
    return body["result"]


def _client(cid: int, base: str, key: str, images: list[str], deadline: float, state: _State, seed: int) -> None:
    rng = random.Random(seed * 1000 + cid)
    session = requests.Session()
    mine: list[int] = []  # ids this client added and has not removed yet
    ops, weights = zip(*MIX)
    for n in range(MAX_REQUESTS_PER_CLIENT):
        if time.monotonic() >= deadline:
            break
        op = rng.choices(ops, weights)[0]
        if op == "remove" and not mine:
            op = "health"
        if op == "infer":
            payload = {"image": rng.choice(images), "indexKey": key, "visualize": rng.random() < 0.2}
            result = _post(session, state, "infer", f"{base}/shitu-infer", payload)
            if result is not None and not isinstance(result.get("detectedObjects"), list):
                state.violate("infer answered without detectedObjects")
        elif op == "add":
            label = f"client{cid}-{n}"
            payload = {"imageLabelPairs": [{"image": rng.choice(images), "label": label}], "indexKey": key}
            result = _post(session, state, "add", f"{base}/shitu-index-add", payload)
            if result is None:
                continue
            ids = [int(i) for i, lab in result["idMap"].items() if lab == label]
            if len(ids) != 1:
                state.violate(f"add of {label!r} acknowledged, but the answer's idMap has it {len(ids)} times")
                continue
            with state.lock:
                if ids[0] in state.acked:
                    state.violations.append(f"id {ids[0]} handed out twice ({state.acked[ids[0]]!r}, {label!r})")
                state.acked[ids[0]] = label
            mine.append(ids[0])
            if len(result["idMap"]) != result["imageCount"]:
                state.violate(f"add answered imageCount {result['imageCount']} for {len(result['idMap'])} ids")
        elif op == "remove":
            gone = mine.pop(rng.randrange(len(mine)))
            with state.lock:
                state.removing.add(gone)
            result = _post(session, state, "remove", f"{base}/shitu-index-remove", {"ids": [gone], "indexKey": key})
            if result is not None:
                with state.lock:
                    state.removed.add(gone)
                if str(gone) in result["idMap"]:
                    state.violate(f"remove of id {gone} acknowledged, but the answer still lists it")
        else:
            start = time.perf_counter()
            try:
                resp = session.get(f"{base}/health", timeout=REQUEST_TIMEOUT)
                state.record("health", time.perf_counter() - start, resp.status_code, resp.text)
            except requests.RequestException as exc:
                state.record("health", time.perf_counter() - start, 0, f"{type(exc).__name__}: {exc}")
    session.close()


def _cli_writer(key: str, root: Path, rels: list[str], deadline: float, state: _State, env: dict[str, str],
                workdir: Path) -> None:  # fmt: skip
    """``python -m shitu append`` of one photo under a unique label, again and again."""
    for k in range(10_000):
        if time.monotonic() >= deadline:
            return
        label = f"cli-{k}"
        labels = workdir / f"cli-{k}.txt"
        labels.write_text(f"{rels[k % len(rels)]}\t{label}\n", encoding="utf-8")
        cmd = [sys.executable, "-m", "shitu", "append", "--index", key, "--gallery-root", str(root),
               "--labels", str(labels)]  # fmt: skip
        with state.lock:
            state.cli_pending.add(label)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        status = 200 if proc.returncode == 0 and "added 1" in out else 500
        state.record("cli", time.perf_counter() - start, status, f"exit {proc.returncode}: {err.strip()[-300:]}")
        if status == 200:
            with state.lock:
                state.cli_pending.discard(label)
                state.cli_acked.append(label)


# --- the invariants -----------------------------------------------------------------------------


def _check(base: str, key: str, state: _State, store: IndexStore | None, *, final: bool) -> None:
    """Everything acknowledged so far is there, over HTTP and on disk; counts agree."""
    with state.lock:
        must_have = {i: lab for i, lab in state.acked.items() if i not in state.removing}
        cli_labels = list(state.cli_acked)
        # only removals acknowledged before the snapshot below must be gone from it: one that is
        # acknowledged while the listing is on its way may or may not be in it
        removed_before = set(state.removed)
    start = time.perf_counter()
    try:
        resp = requests.get(f"{base}/shitu-index/{key}", params={"limit": 10_000}, timeout=REQUEST_TIMEOUT)
    except requests.RequestException as exc:
        state.record("listing", time.perf_counter() - start, 0, f"{type(exc).__name__}: {exc}")
        return
    state.record("listing", time.perf_counter() - start, resp.status_code, resp.text)
    if resp.status_code != 200:
        return
    listing = resp.json()["result"]
    views = [("HTTP", {int(i): lab for i, lab in listing["idMap"].items()})]
    if listing["imageCount"] != len(listing["idMap"]):
        state.violate(f"listing: imageCount {listing['imageCount']} but {len(listing['idMap'])} ids")
    if store is not None:
        with store.locked(key):  # the lock every writer takes: no save is read half-done
            on_disk = load_index(store.path(key))
        if on_disk.index.ntotal != len(on_disk.id_map):
            state.violate(f"on disk: {on_disk.index.ntotal} vectors but {len(on_disk.id_map)} labels")
        views.append(("disk", on_disk.id_map))
    with state.lock:  # removals sent since the snapshot may have landed
        removing = set(state.removing)
        state.checks += 1
    for where, id_map in views:
        lost = {i: lab for i, lab in must_have.items() if i not in removing and id_map.get(i) != lab}
        if lost:
            example = list(lost.items())[:5]
            state.violate(f"{where}: {len(lost)} acknowledged adds missing or relabelled, e.g. {example}")
        back = sorted(i for i in removed_before if i in id_map)
        if back:
            state.violate(f"{where}: removed ids came back: {back[:10]}")
        counts: dict[str, int] = {}
        for lab in id_map.values():
            counts[lab] = counts.get(lab, 0) + 1
        wrong = {lab: counts.get(lab, 0) for lab in cli_labels if counts.get(lab, 0) != 1}
        if wrong:
            state.violate(f"{where}: acknowledged CLI appends not present exactly once: {wrong}")
        if final:
            twice = sorted(lab for lab, c in counts.items() if c > 1 and lab.startswith(("client", "cli-")))
            if twice:
                state.violate(f"{where}: labels added once appear more than once: {twice[:10]}")


def _checker(base: str, key: str, state: _State, store: IndexStore | None, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        _check(base, key, state, store, final=False)


# --- the run -------------------------------------------------------------------------------------


def run_soak(
    base_url: str,
    seconds: float,
    clients: int,
    cli_writer: bool,
    *,
    data_dir: Path | None = None,
    gallery: tuple[Path, Path] | None = None,
    index: str | None = None,
    env: dict[str, str] | None = None,
    check_every: float = 5.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Soak the server at ``base_url`` (127.0.0.1 only) for ``seconds`` with ``clients`` threads.

    ``data_dir``: the server's ``SHITU_DATA_DIR`` (needed for ``cli_writer`` and the on-disk
    checks); ``gallery``: ``(root, label file)`` of photos (default: the sample gallery, written
    to a temp dir); ``index``: the key of the index it builds first (default: a fresh one);
    ``env``: the CLI writer's environment (default: this one, with ``SHITU_DATA_DIR``).
    Returns the measurements and every invariant violation found (none expected).
    """
    base = _check_local(base_url)
    if cli_writer and data_dir is None:
        raise ValueError("the CLI writer needs the server's data_dir")
    seconds, clients = max(1.0, float(seconds)), max(1, min(int(clients), 64))
    with tempfile.TemporaryDirectory(prefix="shitu-soak-") as tmp:
        if gallery is None:
            from shitu.sample import write_gallery

            root = Path(tmp) / "gallery"
            gallery = (root, write_gallery(root))
        root, label_file = gallery
        rels = _gallery_lines(label_file)
        images = [_b64(root / rel) for rel in rels]
        key = index or f"soak-{uuid.uuid4().hex[:8]}"
        first = [{"image": images[k], "label": "seed"} for k in range(0, len(images), max(1, len(images) // 6))]
        resp = requests.post(f"{base}/shitu-index-build", json={"imageLabelPairs": first, "indexKey": key},
                             timeout=CLI_TIMEOUT)  # fmt: skip
        if resp.status_code != 200:
            raise RuntimeError(f"could not build the soak index: {resp.status_code} {resp.text[:300]}")
        store = IndexStore(Path(data_dir) / "indices", lock_dir=Path(data_dir) / "locks") if data_dir else None
        cli_env = dict(env if env is not None else os.environ)
        if data_dir is not None:
            cli_env["SHITU_DATA_DIR"] = str(data_dir)
        cli_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), cli_env.get("PYTHONPATH", "")) if p)

        state = _State()
        stop = threading.Event()
        start = time.monotonic()
        deadline = start + seconds
        threads = [
            threading.Thread(target=_client, args=(c, base, key, images, deadline, state, seed), name=f"client-{c}")
            for c in range(clients)
        ]
        if cli_writer:
            threads.append(threading.Thread(target=_cli_writer, name="cli-writer",
                                            args=(key, root, rels, deadline, state, cli_env, Path(tmp))))  # fmt: skip
        checker = threading.Thread(target=_checker, args=(base, key, state, store, check_every, stop), daemon=True)
        for t in threads:
            t.start()
        checker.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        stop.set()
        checker.join(REQUEST_TIMEOUT)
        _check(base, key, state, store, final=True)

    return _summary(state, key, elapsed, clients, cli_writer)


def _summary(state: _State, key: str, elapsed: float, clients: int, cli_writer: bool) -> dict[str, Any]:
    endpoints = {}
    for what, values in state.latencies.items():
        counts = state.statuses.get(what, {})
        endpoints[ENDPOINTS[what]] = {
            "count": len(values),
            "ok": counts.get(200, 0),
            "4xx": sum(c for s, c in counts.items() if 400 <= s < 500),
            "5xx": sum(c for s, c in counts.items() if s >= 500),
            "no_answer": counts.get(0, 0),
            "p50_ms": 1000 * percentile(values, 50),
            "p99_ms": 1000 * percentile(values, 99),
            "max_ms": 1000 * max(values),
        }
    http = [v for w, v in state.latencies.items() if w != "cli"]
    requests_sent = sum(len(v) for v in http)
    return {
        "index": key,
        "seconds": elapsed,
        "clients": clients,
        "cli_writer": cli_writer,
        "requests": requests_sent,
        "throughput_rps": requests_sent / elapsed if elapsed else 0.0,
        "endpoints": endpoints,
        "status_5xx": sum(e["5xx"] for name, e in endpoints.items() if name != ENDPOINTS["cli"]),
        "unexpected": list(state.errors),
        "violations": list(state.violations),
        "acked_adds": len(state.acked),
        "acked_removes": len(state.removed),
        "cli_appends": len(state.cli_acked),
        "checks": state.checks,
    }


def format_report(result: dict[str, Any]) -> str:
    """The result as a plain-text table (what ``bench/results/soak.txt`` holds)."""
    lines = [
        f"soak: {result['seconds']:.1f} s, {result['clients']} clients, "
        f"CLI writer {'on' if result['cli_writer'] else 'off'}, index {result['index']!r}",
        f"HTTP requests: {result['requests']} ({result['throughput_rps']:.2f}/s); 5xx: {result['status_5xx']}; "
        f"other non-200: {len(result['unexpected'])}",
        f"acknowledged: {result['acked_adds']} adds, {result['acked_removes']} removes, "
        f"{result['cli_appends']} CLI appends; invariant checks: {result['checks']}, "
        f"violations: {len(result['violations'])}",
        "",
        f"{'endpoint':<26}{'count':>7}{'ok':>7}{'4xx':>6}{'5xx':>6}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}",
    ]
    for name, e in sorted(result["endpoints"].items()):
        lines.append(f"{name:<26}{e['count']:>7}{e['ok']:>7}{e['4xx']:>6}{e['5xx']:>6}"
                     f"{e['p50_ms']:>10.1f}{e['p99_ms']:>10.1f}{e['max_ms']:>10.1f}")  # fmt: skip
    for title, items in (("non-200 answers", result["unexpected"]), ("violations", result["violations"])):
        if items:
            lines += ["", f"{title}:", *(f"  {item}" for item in items[:20])]
    return "\n".join(lines) + "\n"


# --- a server to soak ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--no-cli-writer", action="store_true", help="no `python -m shitu append` beside the server")
    parser.add_argument("--data-dir", type=Path, help="the server's data dir (default: a new temp dir)")
    parser.add_argument("--model-dir", type=Path, help="model cache (default: $SHITU_MODEL_DIR)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from app import build_app
    from shitu.engine import Engine

    with tempfile.TemporaryDirectory(prefix="shitu-soak-data-") as tmp:
        data_dir = (args.data_dir or Path(tmp)).resolve()
        os.environ["SHITU_DATA_DIR"] = str(data_dir)  # the CLI writer inherits it
        if args.model_dir:
            os.environ["SHITU_MODEL_DIR"] = str(args.model_dir.resolve())
        engine = Engine()
        try:
            with serving(build_app(engine)) as url:
                print(f"soaking {url} for {args.seconds:g} s with {args.clients} clients ...", file=sys.stderr)
                result = run_soak(url, args.seconds, args.clients, not args.no_cli_writer, data_dir=data_dir)
        finally:
            engine.close()
    report = format_report(result)
    print(report, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    ok = result["status_5xx"] == 0 and not result["violations"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
