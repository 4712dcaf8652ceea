"""The command line as a user runs it: JSON output, training end to end, clear errors."""
import json
import subprocess
import sys

import yaml

from po_cluster.cli import main

PO = [sys.executable, "-m", "po_cluster.cli"]


def test_evaluate_json_prints_the_documented_keys(capsys):
    assert main(["evaluate", "--json", "--t", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"clean", "attacked", "word_only", "attack_success", "kl"}
    # the shipped base model: it reads, and is fooled (its card's numbers)
    assert out["clean"] >= 0.9 and out["word_only"] >= 0.8 and out["attacked"] <= 0.5


def test_train_then_evaluate_a_checkpoint(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "output_dir": str(tmp_path / "runs"), "model": {"image_tower": "frozen"},
        "data": {"n_pairs": 256, "n_reg": 128}, "loss": {"beta": 0.1, "kl_weight": 0.1},
        "optimizer": {"lr": 0.05}, "training": {"steps": 30, "batch_size": 64, "reg_batch_size": 64}}))
    assert main(["train", "--config", str(config)]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    checkpoint = tmp_path / "runs" / "tiny"
    plot = tmp_path / "curve.png"
    assert main(["evaluate", str(checkpoint), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "trade-off over t" in text and plot.stat().st_size > 0
    assert main(["evaluate", str(checkpoint), "--json", "--t", "0"]) == 0
    at_zero = json.loads(capsys.readouterr().out)
    assert at_zero["kl"] < 1e-6  # t = 0 is the starting model


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
