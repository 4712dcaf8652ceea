"""`po-cluster train` then `po-cluster evaluate` on its checkpoint, as a user runs them."""
import json

import pytest
import yaml

from po_cluster.cli import main

pytestmark = pytest.mark.slow


def test_train_then_evaluate_a_checkpoint(tmp_path, capsys, monkeypatch):
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
    monkeypatch.setenv("PO_CLUSTER_STORE", str(tmp_path / "no-store"))  # a folder is never looked up in a store
    assert main(["evaluate", str(checkpoint), "--json", "--t", "0"]) == 0
    at_zero = json.loads(capsys.readouterr().out)
    assert at_zero["kl"] < 1e-6  # t = 0 is the starting model
    assert not (tmp_path / "no-store").exists()
