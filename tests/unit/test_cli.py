"""The command line as a user runs it: JSON output, training end to end, clear errors."""
import json
import subprocess
import sys

from po_cluster.cli import main

PO = [sys.executable, "-m", "po_cluster.cli"]


def test_evaluate_json_prints_the_documented_keys(capsys):
    assert main(["evaluate", "--json", "--t", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"clean", "attacked", "word_only", "attack_success", "kl"}
    # the shipped base model: it reads, and is fooled (its card's numbers)
    assert out["clean"] >= 0.9 and out["word_only"] >= 0.8 and out["attacked"] <= 0.5


def test_bad_config_is_one_clear_line_and_exit_2(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("loss:\n  beta: -1\n")
    result = subprocess.run([*PO, "train", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "loss.beta" in result.stderr and "greater than 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_tampered_checkpoint_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not weights")
    (folder / "manifest.json").write_text(json.dumps({"files": {"model.safetensors": {"sha256": "0" * 64,
                                                                                         "size": 11}}}))
    result = subprocess.run([*PO, "evaluate", str(folder)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "model.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_a_release_by_id_from_a_store(release_template, tmp_path, capsys):
    from po_cluster.store.artifacts import open_store

    store = str(tmp_path / "store")
    release_id = open_store(store).publish_release(release_template)
    assert main(["evaluate", release_id, "--store", store, "--json"]) == 0
    by_id = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "latest", "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_id
    assert main(["evaluate", "r-missing", "--store", store]) == 1
    assert "no release r-missing" in capsys.readouterr().err
