"""Settings from the environment and the PaddleX-compatible pipeline YAML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shitu.config import PipelineConfig, Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SHITU_MAX_IMAGE_PIXELS", "abc", "SHITU_MAX_IMAGE_PIXELS='abc'"),
        ("SHITU_MAX_REQUEST_BYTES", "-5", "SHITU_MAX_REQUEST_BYTES"),
        ("SHITU_OFFLINE", "perhaps", "SHITU_OFFLINE='perhaps'"),
        ("SHITU_READ_ONLY", "sometimes", "SHITU_READ_ONLY"),
    ],
)
def test_a_bad_environment_value_is_one_clear_line(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env()
    assert caught.value.message.startswith(message) and "\n" not in caught.value.message


def test_values_are_parsed(monkeypatch, tmp_path):
    monkeypatch.setenv("SHITU_URL_ALLOWLIST", "images.local, cdn.local")
    monkeypatch.setenv("SHITU_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SHITU_OFFLINE", "1")
    settings = Settings.from_env(max_image_pixels=1000)
    assert settings.url_allowlist == ("images.local", "cdn.local") and settings.offline
    assert settings.data_dir == tmp_path and settings.max_image_pixels == 1000
    with pytest.raises(TypeError, match="unknown settings"):
        Settings.from_env(max_image_pixel=5)


@pytest.mark.slow
def test_the_app_and_the_cli_stop_with_one_line_on_a_bad_setting(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHITU_MAX_IMAGE_PIXELS": "abc"}
    for argv in ([sys.executable, "app.py"], [sys.executable, "-m", "shitu", "info"]):
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        assert "SHITU_MAX_IMAGE_PIXELS='abc'" in done.stderr and "Traceback" not in done.stderr, done.stderr[-800:]


def test_not_set_is_none_and_an_explicit_threshold_is_kept(tmp_path):
    config = PipelineConfig()
    assert config.rec_threshold is None and config.det_threshold is None
    path = config.save(tmp_path)
    assert "rec_threshold: null" in path.read_text(encoding="utf-8")
    path.write_text(path.read_text(encoding="utf-8").replace("rec_threshold: null", "rec_threshold: 0.5"))
    assert PipelineConfig.load(path).rec_threshold == 0.5
