"""What a stranger's requests cost the server: time and memory, for the attacks of issue #26.

Starts ``python app.py`` from a checkout (this one, or ``--repo`` another, e.g. the code before a
change) as a public, read-only server on an empty data dir with the offline starter pack, then:

* ``filter_entries`` — Gradio's read-only Manage filter called with ``"0-100000 " * N`` (ids typed
  as ranges), by its named endpoint: seconds and the server's peak RSS growth;
* ``event-body`` — a 100 MiB body posted to ``/gradio_api/run/filter_entries``: the status and seconds
  until it is answered;
* ``health`` — ``/health`` latency (median and max) while ``--parallel`` clients post ``/shitu-infer``;
* ``pixels`` — a 13000×13000 PNG (0.5 MB) to ``/shitu-infer``: status, seconds, peak RSS growth.

    python bench/limits.py [--repo ../old-checkout] [--out bench/results/limits.json]

Prints one line per measurement and the load average at start and end.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python app.py`` in a child process, its RSS sampled every 20 ms."""

    def __init__(self, repo: Path, data: Path, model_dir: Path | None):
        self.port = free_port()
        env = {**os.environ, "PORT": str(self.port), "HOST": "0.0.0.0", "SHITU_DATA_DIR": str(data),
               "SHITU_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
        if model_dir:
            env["SHITU_MODEL_DIR"] = str(model_dir)
        self.log = open(data.parent / "app.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=repo, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        self.base = f"http://127.0.0.1:{self.port}"
        self.peak = 0
        self._sampling = True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        proc = psutil.Process(self.proc.pid)
        while self._sampling:
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            time.sleep(0.02)

    def rss(self) -> int:
        proc = psutil.Process(self.proc.pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))

    def wait_ready(self, limit: float = 600) -> None:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit("the server stopped: see " + self.log.name)
            try:
                if requests.get(f"{self.base}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not become ready")

    def measure(self, work):
        """``(result, seconds, peak RSS growth in MB)`` of ``work()``."""
        time.sleep(0.3)
        before = self.rss()
        self.peak = before
        t = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - t
        time.sleep(0.3)
        return result, seconds, (self.peak - before) / 2**20

    def stop(self) -> None:
        self._sampling = False
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def gradio_call(base: str, name: str, data: list) -> str:
    posted = requests.post(f"{base}/gradio_api/call/{name}", json={"data": data}, timeout=600)
    if posted.status_code != 200:
        return f"HTTP {posted.status_code}"
    stream = requests.get(f"{base}/gradio_api/call/{name}/{posted.json()['event_id']}", timeout=600).text
    events = [ln.split(":", 1)[1].strip() for ln in stream.splitlines() if ln.startswith("event:")]
    return events[-1] if events else "no event"


def big_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 180, 160)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--model-dir", type=Path, default=os.environ.get("SHITU_TEST_MODEL_DIR"))
    ap.add_argument("--parallel", type=int, default=200)
    ap.add_argument("--ranges", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "limits.json")
    args = ap.parse_args()
    rows: dict[str, object] = {"repo": str(args.repo), "load_average_start": os.getloadavg(), "cores": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="shitu-limits-"))
    server = Server(args.repo, tmp / "data", args.model_dir)
    try:
        server.wait_ready()
        for n in args.ranges:
            outcome, seconds, grew = server.measure(lambda n=n: gradio_call(server.base, "filter_entries",
                                                                             ["sample", [], "0-100000 " * n]))
            rows[f"filter_entries_{n}"] = {"outcome": outcome, "seconds": seconds, "rss_growth_mb": grew}
            print(f"filter_entries x{n}: {outcome}, {seconds:.2f} s, +{grew:.0f} MB", flush=True)

        def huge_event() -> int:
            body = b'{"data": ["sample", [], "' + b"1 " * (50 << 20) + b'"]}'
            try:
                return requests.post(f"{server.base}/gradio_api/run/filter_entries", data=body,
                                     headers={"content-type": "application/json"}, timeout=600).status_code
            except requests.RequestException as exc:
                return f"{type(exc).__name__}"  # type: ignore[return-value]

        status, seconds, grew = server.measure(huge_event)
        rows["event_body_100MiB"] = {"status": status, "seconds": seconds, "rss_growth_mb": grew}
        print(f"100 MiB event body: {status}, {seconds:.2f} s, +{grew:.0f} MB", flush=True)

        photo = next((REPO / "tests").glob("**/*.jpg"), None)
        image = base64.b64encode(photo.read_bytes() if photo else big_png(320)).decode()
        stop = threading.Event()
        statuses: list[int] = []

        def infer() -> None:
            try:
                statuses.append(requests.post(f"{server.base}/shitu-infer", json={"image": image},
                                              timeout=600).status_code)  # fmt: skip
            except requests.RequestException:
                statuses.append(-1)

        latencies: list[float] = []

        def probe() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    requests.get(f"{server.base}/health", timeout=120)
                except requests.RequestException:
                    pass
                latencies.append(time.perf_counter() - t)
                time.sleep(0.1)

        prober = threading.Thread(target=probe)
        prober.start()
        t = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda _: infer(), range(args.parallel)))
        took = time.perf_counter() - t
        stop.set()
        prober.join()
        rows["health_under_load"] = {
            "parallel": args.parallel, "all_answered_s": took, "health_median_s": statistics.median(latencies),
            "health_max_s": max(latencies), "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        }  # fmt: skip
        print(f"/health during {args.parallel} parallel infers: median {statistics.median(latencies):.3f} s, "
              f"max {max(latencies):.2f} s; answers {rows['health_under_load']['statuses']} in {took:.1f} s")

        png = base64.b64encode(big_png(13000)).decode()
        status, seconds, grew = server.measure(
            lambda: requests.post(f"{server.base}/shitu-infer", json={"image": png}, timeout=600).status_code
        )
        rows["pixels_13000"] = {"status": status, "seconds": seconds, "rss_growth_mb": grew}
        print(f"13000x13000 PNG to /shitu-infer: {status}, {seconds:.2f} s, +{grew:.0f} MB", flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rows["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(f"load average {rows['load_average_start'][0]:.2f} -> {rows['load_average_end'][0]:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
