"""A bounded soak of the real server (bench/soak.py): API + UI under uvicorn, 8 clients and a
CLI writer in another process on one index; nothing acknowledged may be lost, nothing may 5xx.

30 seconds by default; ``SHITU_SOAK_SECONDS=600`` soaks longer. Times are reported, never asserted.
"""

from __future__ import annotations

import os

import pytest

from bench.soak import format_report, run_soak
from shitu.api import serving

from .conftest import MODEL_CACHE

pytestmark = pytest.mark.slow


def test_soak_server_with_clients_and_a_cli_writer(engine, sample_gallery):
    from app import build_app

    seconds = float(os.environ.get("SHITU_SOAK_SECONDS", "30"))
    env = dict(os.environ, SHITU_MODEL_DIR=str(MODEL_CACHE), SHITU_OFFLINE="1")
    with serving(build_app(engine)) as url:
        result = run_soak(
            url, seconds, 8, True, data_dir=engine.settings.data_dir, gallery=sample_gallery, env=env, seed=1
        )
    print(format_report(result))
    assert result["status_5xx"] == 0, result["unexpected"]
    assert result["violations"] == []
    assert result["unexpected"] == [], "every request and CLI append should have succeeded"
    assert result["acked_adds"] > 0 and result["acked_removes"] > 0 and result["cli_appends"] > 0
    assert result["checks"] >= 2  # at least one periodic check and the final one
    used = {name.split()[-1] for name in result["endpoints"]}
    assert {"/shitu-infer", "/shitu-index-add", "/shitu-index-remove", "/health", "append"} <= used
