"""The command line, in process: build → predict → remove → info, and clean error exits."""

from __future__ import annotations

import json

import pytest

from shitu.__main__ import main

from .conftest import MODEL_CACHE


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SHITU_MODEL_DIR", str(MODEL_CACHE))
    monkeypatch.setenv("SHITU_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SHITU_OFFLINE", "1")
    return tmp_path


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_build_predict_remove_info(cli_env, sample_gallery, sample_queries, capsys):
    root, labels = sample_gallery
    assert main(["build", "--gallery-root", str(root), "--labels", str(labels), "--index", "demo"]) == 0
    assert "24 entries, 6 labels" in capsys.readouterr().out
    out_dir = cli_env / "out"
    query = sample_queries[1]
    assert main(["predict", str(query), "--index", "demo", "--out", str(out_dir), "--json", "--whole-image", "always",
                 "--rec-threshold", "0"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert any(b["whole_image"] and b["labels"][0] == "猫 cat" for b in printed["boxes"])
    assert (out_dir / f"{query.stem}_res.json").exists() and (out_dir / f"{query.stem}_res.jpg").exists()
    ids_file = cli_env / "ids.txt"
    ids_file.write_text("0\n1\n", encoding="utf-8")
    assert main(["remove", "--index", "demo", "--ids-file", str(ids_file)]) == 0
    assert main(["info", "--index", "demo"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["indices"]["demo"]["entries"] == 22
    assert info["models"]["recognition"]["source"] == "starter"


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_index_directory_mode_and_config(cli_env, sample_gallery, capsys):
    root, labels = sample_gallery
    target = cli_env / "idx"
    assert main(["build", "--gallery-root", str(root), "--labels", str(labels), "--index", str(target),
                 "--index-type", "IVF", "--metric-type", "L2"]) == 0  # fmt: skip
    assert (target / "vector.index").exists() and (target / "id_map.yaml").exists()
    assert main(["remove", "--index", str(target), "--ids", "5", "7-8"]) == 0
    capsys.readouterr()
    assert main(["append", "--gallery-root", str(root), "--labels", str(labels), "--index", str(target)]) == 0
    assert "added 24" in capsys.readouterr().out
    from shitu.stores.layout import load_index

    on_disk = load_index(target)
    assert len(on_disk) == 24 - 3 + 24 and {5, 7, 8}.isdisjoint(on_disk.id_map) and max(on_disk.id_map) == 47
    assert main(["relabel", "--index", str(target), "--ids", "0-1", "--label", "renamed"]) == 0
    assert load_index(target).id_map[1] == "renamed"
    query = root / "1" / "0.jpg"
    assert main(["predict", str(query), "--index", str(target), "--json", "--whole-image", "always"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["index"] == str(target.resolve()) and any(b["whole_image"] for b in printed["boxes"])
    assert main(["get-config", "--save-path", str(cli_env / "cfg")]) == 0
    assert (cli_env / "cfg" / "PP-ShiTuV2.yaml").read_text(encoding="utf-8").startswith("pipeline_name: PP-ShiTuV2")


def test_user_errors_exit_2_with_a_message(cli_env, capsys):
    assert main(["remove", "--index", "nothing-here", "--ids", "1"]) == 2
    assert "no index named 'nothing-here'" in capsys.readouterr().err
    assert main(["remove", "--index", "x", "--ids-file", str(cli_env / "missing.txt")]) == 2
    assert "cannot read the id file missing.txt" in capsys.readouterr().err
    assert main(["remove", "--index", "x", "--ids", "true"]) == 2
    assert "not an entry id" in capsys.readouterr().err
    (cli_env / "bad.txt").write_text("missing.jpg label\n", encoding="utf-8")
    assert main(["build", "--gallery-root", str(cli_env), "--labels", str(cli_env / "bad.txt"), "--index", "x"]) == 2
    assert "line 1" in capsys.readouterr().err


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_relabel_takes_ids_lists_and_ranges_and_refuses_bad_input(cli_env, sample_gallery, capsys):
    root, labels = sample_gallery
    assert main(["build", "--gallery-root", str(root), "--labels", str(labels), "--index", "demo"]) == 0
    from shitu.engine import Engine

    def id_map() -> dict[int, str]:
        engine = Engine()  # a fresh engine: what is on disk
        try:
            return engine.index("demo").id_map
        finally:
            engine.close()

    before = id_map()
    capsys.readouterr()
    # separate ids, a comma list and a range, in one --ids
    assert main(["relabel", "--index", "demo", "--ids", "0", "2,3", "20-23", "--label", "renamed"]) == 0
    assert "7 entries now labelled 'renamed'" in capsys.readouterr().out
    after = id_map()
    assert {i for i, label in after.items() if label == "renamed"} == {0, 2, 3, 20, 21, 22, 23}
    assert {i: lab for i, lab in after.items() if lab != "renamed"} == {
        i: lab for i, lab in before.items() if i not in {0, 2, 3, 20, 21, 22, 23}
    }
    ids_file = cli_env / "ids.txt"
    ids_file.write_text("# first two\n0-1\n5\n", encoding="utf-8")
    assert main(["relabel", "--index", "demo", "--ids-file", str(ids_file), "--label", "from file"]) == 0
    assert [i for i, lab in id_map().items() if lab == "from file"] == [0, 1, 5]
    # bad input: exit 2 with a message, and nothing changes
    unchanged = id_map()
    assert main(["relabel", "--index", "demo", "--ids", "1", "999", "--label", "x"]) == 2
    assert "no entries with ids 999" in capsys.readouterr().err
    assert main(["relabel", "--index", "demo", "--ids", "1", "--label", "  "]) == 2
    assert "label is empty" in capsys.readouterr().err
    assert main(["relabel", "--index", "demo", "--ids", "3-1", "--label", "x"]) == 2
    assert "not a usable id range" in capsys.readouterr().err
    assert main(["relabel", "--index", "nothing-here", "--ids", "1", "--label", "x"]) == 2
    assert "no index named 'nothing-here'" in capsys.readouterr().err
    assert id_map() == unchanged


@pytest.mark.slow
def test_predict_says_each_near_miss_and_keeps_stdout_for_its_output(cli_env, sample_gallery, sample_queries):
    """In a process of its own, as a user runs it: with ``--json`` every stdout line is a result (Paddle's
    C++ debug line, ``ReduceMeanCheckIfOneDNNSupport``, used to land among them), and without it an
    unknown box says its near miss, not a bare "unknown"."""
    import os
    import subprocess
    import sys

    root, labels = sample_gallery
    assert main(["build", "--gallery-root", str(root), "--labels", str(labels), "--index", "demo"]) == 0
    query = str(sample_queries[0])
    common = [sys.executable, "-m", "shitu", "predict", query, "--index", "demo", "--rec-threshold", "0.9999"]
    run = dict(capture_output=True, text=True, env=dict(os.environ), timeout=600)
    as_json = subprocess.run([*common, "--json"], **run)
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    lines = as_json.stdout.strip().splitlines()
    assert lines and all(json.loads(line)["boxes"] is not None for line in lines), as_json.stdout
    assert "ReduceMeanCheckIfOneDNNSupport" not in as_json.stdout + as_json.stderr
    plain = subprocess.run(common, **run)
    said = plain.stdout.strip()
    assert said.startswith(query + ": unknown · maybe ") and " < 1.00" in said, said
