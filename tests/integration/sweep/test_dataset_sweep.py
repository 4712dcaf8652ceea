"""A user's own images, end to end: a class folder built into a dataset (local, or in S3 through moto's
server), a 2-trial sweep on its train split (in memory from the sweep's shared inputs locally; streamed
by Ray Data from the bucket's shards into the Train workers on S3), trials validated on val, soups
chosen on val, the release scored on test, and `evaluate --dataset --split` reading the same splits; and
a sweep with a retention benchmark (local, or with dataset, benchmark and store in the bucket) in which
a trial made to forget is charged by the objective and left out of the soups."""
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


def _sweep_config(root: Path, dataset: str, streaming: bool | None = None) -> Path:
    streaming = dataset.startswith("s3://") if streaming is None else streaming
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "own-data", "storage_path": str(root / "sweeps"), "store": str(root / "store"),
        "num_samples": 2, "reporting": {"report_every": 10, "checkpoint_every": 10}, "top_k": 2, "seed": 3,
        # In memory, the trials train in the Tune trial (a TorchTrainer's start-up per trial is tested
        # where the data streams into its workers, which only Ray Train does).
        **({} if streaming else {"trial_runner": "tune", "scaling": {"cpus_per_worker": 1}}),
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


# ---------------------------------------------------------------- a trial that forgets, charged by retention


def _retention_benchmark(root: Path) -> str:
    """24 world shapes (with no word) as a class-folder benchmark: what the base knows and a run must keep."""
    import numpy as np
    from PIL import Image

    from po_cluster.data import world

    clean = world.image_set("clean", 200, seed=11)
    for shape in ("circle", "square", "star", "triangle"):
        (root / shape).mkdir(parents=True)
        for i in np.flatnonzero(clean.labels == world.SHAPES.index(shape))[:6]:
            Image.fromarray(clean.images[i]).resize((72, 60)).save(root / shape / f"{i}.png")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\na photo of a {c}.\n")
    return str(root)


def test_a_trial_that_forgets_is_refused_by_the_objective_and_the_soups(ray_cluster, dataset, tmp_path):
    # In memory both ways: on S3 the dataset, the retention benchmark and the store are all the bucket's.
    config = _sweep_config(tmp_path, dataset, streaming=False)
    data = yaml.safe_load(config.read_text())
    # seed 4: the first trial starts at the middle of the lr range (0.055), Optuna's second draw is 21
    data["seed"] = 4
    data["space"]["lr"] = {"low": 1e-4, "high": 30.0}
    kept = _retention_benchmark(tmp_path / "kept")
    if dataset.startswith("s3://"):
        from po_cluster.store.location import parent, upload

        bucket = parent(parent(dataset))
        upload(Path(kept), f"{bucket}/benchmarks/kept")
        kept, data["store"] = f"{bucket}/benchmarks/kept", f"{bucket}/store"
    data["base"]["data"]["retention"] = [{"benchmark": f"kept={kept}", "val": 12, "test": None}]
    config.write_text(yaml.safe_dump(data))
    done = subprocess.run(sweep_command(config, ray_cluster), env={**os.environ, "RAY_AUTH_MODE": "token"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    experiment = tmp_path / "sweeps" / "own-data"
    trials = json.loads((experiment / "sweep_results.json").read_text())["trials"]
    by_lr = sorted(trials, key=lambda trial: trial["config"]["lr"])
    careful, reckless = by_lr[0], by_lr[-1]
    assert careful["config"]["lr"] < 0.1 and reckless["config"]["lr"] > 10  # the seed's draw, as intended
    m_careful, m_reckless = careful["metrics"], reckless["metrics"]
    assert {"val_retain_kept", "val_retention"} <= set(m_reckless)  # the benchmark is in the trials' reports
    assert m_reckless["val_retention"] < m_careful["val_retention"] - 0.1, (m_careful, m_reckless)  # it forgot
    assert m_reckless["objective"] < m_careful["objective"]  # the objective charges it
    assert cli_main(["average", "--config", str(config)]) == 0
    average = json.loads((experiment / "average.json").read_text())
    chosen = average["chosen"]
    members = {"greedy_soup": average["greedy_members"], "uniform_soup": average["trials"],
               "best_trial": average["trials"][:1]}[chosen]
    assert reckless["trial_id"] not in members, (chosen, members, average["validation"])  # the soups refuse it
    assert average["validation"][chosen]["retention"] > m_reckless["val_retention"] + 0.1
    assert "retain_kept" in average["test"][chosen]  # the release is scored on the rest of the benchmark
    print(f"lr {careful['config']['lr']:.3g}: val retention {m_careful['val_retention']:.3f}, objective "
          f"{m_careful['objective']:.3f}; lr {reckless['config']['lr']:.3g}: {m_reckless['val_retention']:.3f}, "
          f"{m_reckless['objective']:.3f}; chosen {chosen} {members}, retention "
          f"{average['validation'][chosen]['retention']:.3f}")  # the figures for docs/results.md (pytest -s)
