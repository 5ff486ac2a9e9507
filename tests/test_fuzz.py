"""Random values at every way in: no 5xx, no traceback, and a read-only server changes nothing.

A seeded generator (reproducible: the seed is in each assertion message) throws JSON values that
broke things before — ids past int64, lone surrogates, huge and empty strings, NaN, nested
structures, paths, private URLs — at every HTTP route (whole bodies, and each route's fields one
by one) and at every public named Gradio endpoint (each input). Every answer must be a 2xx, or a
4xx in the product's envelope (Gradio: an event that ends in ``complete`` or ``error``), and the
server must log no traceback.
"""

from __future__ import annotations

import json
import random
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from shitu.engine import Engine
from shitu.gallery import read_label_file

from .conftest import make_settings, stored_state

SEED = 20261207
CASES = 12  # per route and per endpoint
FIELDS = ["indexKey", "imageLabelPairs", "image", "ids", "label", "threshold", "adapt", "returnIdMap",
          "indexType", "metricType", "detThreshold", "recThreshold", "recTopk", "bbox", "limit", "against"]  # fmt: skip


def value(rng: random.Random, depth: int = 0):
    """One JSON value from the kinds that broke servers before."""
    simple = [
        None, True, False, 0, -1, 1, 2**63, 2**64, -(2**63) - 1, 1e308, -0.0, 0.5, float("nan"), float("inf"),
        "", " ", "shop", "sample", "x" * 5000, "bad\ud800x", "\udc80", "0-99999999", "0-100000 " * 50,
        "../../etc/passwd", "/etc/passwd", "http://127.0.0.1:1/x.jpg", "http://%31%32%37.0.0.1/x.jpg",
        "data:image/png;base64,AAAA", "iVBORw0KGgo=", "v3", "元气森林", "\x00\x01", "<script>alert(1)</script>",
    ]  # fmt: skip
    kind = rng.random()
    if depth < 2 and kind < 0.15:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 2 and kind < 0.25:
        return {rng.choice(FIELDS + ["path", "url", "meta"]): value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(simple)


def as_url(obj) -> str:
    return quote(str(obj), safe="", errors="surrogatepass")


def dumps(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, runtime, sample_gallery):
    """(read-only app, open app), each over an engine with a real index."""
    from app import build_app

    root, labels = sample_gallery
    apps = []
    for host in ("0.0.0.0", "127.0.0.1"):  # a public server is read-only without a token
        engine = Engine(make_settings(tmp_path_factory.mktemp("fuzz") / "data"), runtime=runtime)
        engine.build("shop", read_label_file(labels, root))
        apps.append((engine, build_app(engine, prepare_sample=False, host=host)))
    return apps


def api_requests(app, rng: random.Random):
    """``(method, url, body)`` for every API route: whole random bodies, then each field at random."""
    for route in app.routes:
        methods = getattr(route, "methods", None) or set()
        path = getattr(route, "path", "")
        if not path.startswith(("/shitu-", "/health")) or "{rest" in path:
            continue
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            for case in range(CASES):
                url = path
                for name in ("indexKey", "version"):
                    url = url.replace("{" + name + "}", as_url(value(rng)) or "x")
                if case < CASES // 2:
                    body = value(rng)
                else:
                    body = {f: value(rng) for f in FIELDS if rng.random() < 0.4}
                    body.setdefault("indexKey", rng.choice(["shop", "nope", value(rng)]))
                query = f"?limit={as_url(value(rng))}&format={as_url(value(rng))}"
                yield method, url + (query if method == "GET" else ""), body


@pytest.mark.slow  # ~700 requests
@pytest.mark.parametrize("which", ["read-only", "open"])
def test_no_value_makes_a_5xx_or_a_traceback(servers, which, capfd, caplog):
    engine, app = servers[0 if which == "read-only" else 1]
    rng = random.Random(SEED)
    before = stored_state(engine)
    caplog.set_level("WARNING")
    with TestClient(app, raise_server_exceptions=False) as client:
        for method, url, body in api_requests(app, rng):
            resp = client.request(method, url, content=dumps(body), headers={"content-type": "application/json"})
            assert resp.status_code < 500, (SEED, method, url, body, resp.text[:300])
            if resp.status_code >= 400:
                envelope = resp.json()
                assert envelope["errorCode"] == resp.status_code and envelope["errorMsg"], (url, envelope)
        endpoints = [(d["api_name"], len(d.get("inputs", []))) for d in client.get("/config").json()["dependencies"]
                     if d.get("api_name") and d.get("api_visibility", "public") == "public"]  # fmt: skip
        assert len(endpoints) >= 15
        for name, inputs in endpoints:
            for _ in range(CASES):
                data = [value(rng) for _ in range(inputs)]
                posted = client.post(f"/gradio_api/call/{name}", content=dumps({"data": data}),
                                     headers={"content-type": "application/json"})  # fmt: skip
                assert posted.status_code < 500, (SEED, name, data, posted.text[:300])
                if posted.status_code != 200:
                    continue
                stream = client.get(f"/gradio_api/call/{name}/{posted.json()['event_id']}").text
                events = [ln.split(":", 1)[1].strip() for ln in stream.splitlines() if ln.startswith("event:")]
                assert events and events[-1] in ("complete", "error"), (SEED, name, data, stream[-300:])
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out, (captured.err + captured.out)[-3000:]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    if which == "read-only":
        assert stored_state(engine) == before, "a read-only server changed nothing"
