"""A user's own images, end to end: a class folder built into a dataset (local, or in S3 through moto's
server), a 2-trial sweep on its train split (in memory from the sweep's shared inputs locally; streamed
by Ray Data from the bucket's shards into the Train workers on S3), trials validated on val, soups
chosen on val, the release scored on test, and `evaluate --dataset --split` reading the same splits."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from po_cluster.cli import main as cli_main
from po_cluster.data.typographic import TypographicConfig, build_typographic
from test_sweep import sweep_command
from typo_helpers import labelled_folder

pytestmark = pytest.mark.slow


def _sweep_config(root: Path, dataset: str) -> Path:
    streaming = dataset.startswith("s3://")
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "own-data", "storage_path": str(root / "sweeps"), "store": str(root / "store"),
        "num_samples": 2, "reporting": {"report_every": 10, "checkpoint_every": 10}, "top_k": 2, "seed": 3,
        "space": {"loss_type": ["dpo"], "beta": {"low": 0.1, "high": 0.5}, "kl_weight": {"low": 0.1, "high": 0.5}},
        "base": {"model": {"image_tower": "frozen"},
                 "data": {"dataset": dataset, "n_val": 10_000, "streaming": streaming},
                 # Streamed, a pass over this tiny train split is a few batches, and each pass costs Ray Data
                 # its task start-ups: smaller batches and fewer steps keep the passes few.
                 "optimizer": {"lr": 5e-2}, "training": {"steps": 10 if streaming else 20,
                                                         "batch_size": 16 if streaming else 32,
                                                         "reg_batch_size": 8 if streaming else 32}},
    }))
    return path


def _evaluate(capsys, target: str, dataset: str, split: str) -> dict:
    capsys.readouterr()
    assert cli_main(["evaluate", target, "--dataset", dataset, "--split", split, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(params=["local", "s3"])
def dataset(request, tmp_path):
    if request.param == "local":
        out = str(tmp_path / "dataset")
    else:
        moto_s3, bucket = request.getfixturevalue("moto_s3"), request.getfixturevalue("bucket")
        request.getfixturevalue("monkeypatch").setenv("AWS_ENDPOINT_URL", moto_s3.endpoint_url)
        out = f"s3://{bucket}/datasets/own"
    source = labelled_folder(tmp_path / "photos", per_class=10)
    build_typographic(TypographicConfig(source=str(source), out=out, variants=2, seed=5, image_size=64))
    return out


def test_sweep_on_a_dataset_is_chosen_on_val_and_scored_on_test(ray_cluster, dataset, tmp_path, capsys):
    config = _sweep_config(tmp_path, dataset)
    done = subprocess.run(sweep_command(config, ray_cluster), env={**os.environ, "RAY_AUTH_MODE": "token"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = tmp_path / "sweeps" / "own-data"
    trials = json.loads((experiment / "sweep_results.json").read_text())["trials"]
    assert len(trials) == 2
    if dataset.startswith("s3://"):  # the streamed rows' π_ref: one cache beside the shards, for every trial
        from po_cluster.store.location import list_files

        assert len([name for name in list_files(f"{dataset}/ref") if name.endswith("/ref.json")]) == 1
    # A trial's last report is its checkpoint's score on the val split (n_val caps nothing here).
    trial = trials[0]
    on_val = _evaluate(capsys, str(experiment / trial["checkpoint_path"]), dataset, "val")
    assert on_val["attacked"] == pytest.approx(trial["metrics"]["val_attacked"], abs=1e-6)
    assert on_val["clean"] == pytest.approx(trial["metrics"]["val_clean"], abs=1e-6)

    assert cli_main(["average", "--config", str(config)]) == 0
    average = json.loads((experiment / "average.json").read_text())
    release = average["release_folder"]
    chosen = average["chosen"]
    on_test = _evaluate(capsys, release, dataset, "test")
    for key, value in on_test.items():  # the release card's numbers are the test split's
        assert average["test"][chosen][key] == pytest.approx(value, abs=1e-6), key
    assert _evaluate(capsys, release, dataset, "val")["attacked"] == \
        pytest.approx(average["validation"][chosen]["attacked"], abs=1e-6)
    base = _evaluate(capsys, "po-cluster:typo-shapes-base", dataset, "test")
    assert base["attacked"] == pytest.approx(average["test"]["base"]["attacked"], abs=1e-6)
    assert set(on_test) >= {"clean", "attacked", "attack_success", "kl"}
