"""The Tune + Optuna sweep end to end: killed driver, resume, soups, release, report."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from po_cluster.cli import main as cli_main
from po_cluster.config import SweepConfig, load_config
from po_cluster.model.checkpoint import load_checkpoint, verify_manifest
from po_cluster.pipelines import run_average
from po_cluster.store.artifacts import open_store
from po_cluster.train.phases import PHASE_KEYS

pytestmark = pytest.mark.slow

NUM_SAMPLES = 4
STEPS = 40


@pytest.fixture(scope="module")
def sweep_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg = {
        "name": "killed", "storage_path": str(root / "sweeps"), "store": str(root / "store"),
        "num_samples": NUM_SAMPLES, "reporting": {"report_every": 20, "checkpoint_every": 20}, "top_k": 3, "seed": 1,
        "space": {"loss_type": ["dpo", "ipo", "kto"], "beta": {"low": 0.02, "high": 0.5},
                  "kl_weight": {"low": 0.05, "high": 0.5}},
        "scheduler": {"grace_period": 2},
        "base": {"model": {"image_tower": "frozen"}, "data": {"n_pairs": 512, "n_reg": 256, "n_val": 100},
                 "optimizer": {"lr": 5e-2, "spectral_lr": 5e-2},
                 "training": {"steps": STEPS, "batch_size": 64, "reg_batch_size": 64}},
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, root / "sweeps" / "killed"


def terminated_trials(state_json: str | None) -> set[str]:
    """Trials that Tune's own saved experiment state records as finished."""
    if not state_json:
        return set()
    try:
        data = json.loads(state_json)
    except json.JSONDecodeError:  # being rewritten right now
        return set()
    trials = (json.loads(entry[0]) for entry in data["trial_data"])
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


def _terminated_trials(experiment: Path) -> set[str]:
    states = sorted(experiment.glob("experiment_state-*.json"))
    return terminated_trials(states[-1].read_text() if states else None)


def _checkpoints(experiment: Path, trial_id: str) -> list[str]:
    return sorted(p.name for p in (experiment / "trials" / trial_id).glob("checkpoint_*"))


def sweep_command(config: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "po_cluster.cli", "sweep", "--config", str(config), "--address", address, *extra]


@dataclass
class Resumed:
    config: Path
    experiment: Path
    running_when_killed: bool
    finished: set[str]  # the trials Tune recorded as finished when the driver was killed
    before: dict[str, list[str]]  # their checkpoints then
    resumed: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def resumed_sweep(ray_cluster, sweep_config) -> Resumed:
    """The sweep's driver killed (SIGKILL) once a trial has finished, then the sweep resumed to its end.
    One sweep serves the module: the resume test checks how it got there, the average test reads the
    finished experiment (a sweep of its own would train the same trials again)."""
    config, experiment = sweep_config
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen(sweep_command(config, ray_cluster), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not _terminated_trials(experiment) and time.time() < deadline and driver.poll() is None:
        time.sleep(1)
    running = driver.poll() is None
    if running:
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = _terminated_trials(experiment)
    before = {trial: _checkpoints(experiment, trial) for trial in finished}
    resumed = subprocess.run(sweep_command(config, ray_cluster, "--resume"), env=env, capture_output=True,
                             text=True, timeout=900)
    return Resumed(config, experiment, running, finished, before, resumed)


def test_killed_sweep_resumes_without_rerunning_finished_trials(resumed_sweep):
    experiment, finished, before, resumed = (resumed_sweep.experiment, resumed_sweep.finished,
                                             resumed_sweep.before, resumed_sweep.resumed)
    assert resumed_sweep.running_when_killed, "the sweep ended before it could be killed; make it longer"
    assert 0 < len(finished) < NUM_SAMPLES
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"sweep killed: {NUM_SAMPLES} trials ({NUM_SAMPLES} with a checkpoint) in {experiment}" in resumed.stdout
    records = json.loads((experiment / "sweep_results.json").read_text())["trials"]
    assert len(records) == NUM_SAMPLES
    assert all(r["checkpoint_path"] for r in records), records
    for trial, checkpoints in before.items():  # a finished trial wrote nothing new: it did not run again
        assert _checkpoints(experiment, trial) == checkpoints
    assert len({r["trial_id"] for r in records}) == NUM_SAMPLES
    # Tracked in the embedded store: the resumed driver logged to the sweep's run and to the trials'
    # runs of before (one run per trial, not one per driver), all finished.
    from mlflow import MlflowClient

    from po_cluster.tracking.sweep import PARENT_TAG

    uri = f"sqlite:///{experiment / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)  # Tune's MLflow logger leaves a process-wide registry uri
    runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    (parent,) = [run for run in runs if PARENT_TAG not in run.data.tags]
    children = [run for run in runs if run.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert sorted(run.data.tags["trial_id"] for run in children) == sorted(r["trial_id"] for r in records)
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert f"tracked: mlflow ui --backend-store-uri sqlite:///{experiment / 'mlflow.db'}" in resumed.stdout


@pytest.fixture(scope="module")
def finished_sweep(resumed_sweep):
    """The resumed sweep, run to its end: what averaging reads (its driver must have succeeded)."""
    done = resumed_sweep.resumed
    assert done.returncode == 0, done.stderr[-3000:]
    return resumed_sweep.config, resumed_sweep.experiment


def test_average_publishes_a_verified_release_and_report(finished_sweep, capsys):
    config, experiment = finished_sweep
    for trial in json.loads((experiment / "sweep_results.json").read_text())["trials"]:
        metrics = trial["metrics"]  # where the trial's time went: phases that fit in its time
        assert set(PHASE_KEYS) | {"time_trial"} <= set(metrics), sorted(metrics)
        assert sum(metrics[k] for k in PHASE_KEYS) <= metrics["time_trial"]
        # frozen towers: the sweep embedded every image once, in its shared-inputs task, not per trial
        assert metrics["image_tower_images"] == 0
    cfg = load_config(config, SweepConfig)
    result = run_average(cfg, cfg.store)
    average = json.loads((experiment / "average.json").read_text())
    assert average == result.to_json()  # the typed result is what average.json holds
    release = Path(average["release_folder"])
    assert release == result.release_folder
    verify_manifest(release)
    model, description = load_checkpoint(release)
    assert description["architecture"] == "po-tiny-rn" and (release / "card.md").is_file()
    card = (release / "card.md").read_text()  # a model card, with where the release came from
    assert f"- sweep: `{cfg.name}`" in card and "## Over t" in card and "| loss.loss_type |" in card
    assert description["lineage"]["sweep"] == cfg.name
    store = open_store(yaml.safe_load(config.read_text())["store"])
    assert [r.release_id for r in store.list_releases()] == [store.latest()]
    assert result.release_id == store.latest() and result.store == cfg.store
    assert set(average["test"]) == {"base", "best_trial", "uniform_soup", "greedy_soup"}
    assert result.metrics == average["test"][result.chosen] and result.trials[0] == result.greedy_members[0]
    # greedy soup starts from the best trial and only adds what does not lower validation
    assert average["validation"]["greedy_soup"]["objective"] >= average["validation"]["best_trial"]["objective"]
    assert cli_main(["report", "--config", str(config)]) == 0
    report = experiment / "report"
    assert capsys.readouterr().out.splitlines()[:2] == [f"report: {report / 'report.md'}",
                                                        f"        {report / 'report.html'}"]
    for name in ("report.md", "report.html", "beta_lambda.png", "tradeoff.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0
    text = (report / "report.md").read_text()
    assert "Best trial per loss" in text and "greedy_soup" in text and "Where the trials' time went" in text
