"""MLflow tracking without a server or Ray cluster: the config section, the embedded sqlite store,
a closed port (one warning, no exception), a training run logged and read back, and a release
registered as a model version whose source is its store URI."""
from __future__ import annotations

import socket
import warnings
from pathlib import Path

import pytest
import yaml

from po_cluster.config import ConfigError, RunConfig, SweepConfig, TrackingConfig, parse_config
from po_cluster.tracking import client as tracking
from po_cluster.tracking.client import TrackingUnavailable, open_tracker, run_params


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Each test sees tracking's warn-once state empty (it is per process by design)."""
    monkeypatch.setattr(tracking, "_said", set())
    monkeypatch.setattr(tracking, "_down", set())


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory) -> str:
    """One embedded store for the tests that only need one (creating its tables takes seconds)."""
    folder = tmp_path_factory.mktemp("mlflow")
    assert open_tracker(TrackingConfig(), folder, "created") is not None
    return tracking.embedded_uri(folder)


def closed_port_uri() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # bound, then closed: nothing listens there


@pytest.mark.parametrize("tracking_section, reason", [
    ({"uri": "localhost:5000"}, "expected a URI"),
    ({"enable": False}, "Extra inputs are not permitted"),
    ({"enabled": "sometimes"}, "valid boolean"),
])
def test_bad_tracking_sections_name_the_field(tracking_section, reason):
    with pytest.raises(ConfigError, match="tracking") as error:
        parse_config({"tracking": tracking_section}, "sweep.yaml", SweepConfig)
    assert reason in str(error.value)


def test_tracking_is_on_by_default_with_an_embedded_store(tmp_path):
    assert SweepConfig().tracking == RunConfig().tracking == TrackingConfig()
    assert TrackingConfig().enabled and TrackingConfig().uri is None
    assert tracking.resolve_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.ui_hint("sqlite:////x/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////x/mlflow.db"


def test_disabled_tracking_opens_nothing(tmp_path):
    assert open_tracker(TrackingConfig(enabled=False), tmp_path / "run", "run") is None
    assert not (tmp_path / "run").exists()


def test_embedded_store_keeps_its_database_and_artifacts_in_the_folder(tmp_path):
    first = open_tracker(TrackingConfig(), tmp_path, "sweep-a")
    assert first is not None and (tmp_path / "mlflow.db").is_file()
    again = open_tracker(TrackingConfig(), tmp_path, "sweep-a")
    assert again is not None and again.experiment_id == first.experiment_id
    run = first.client.create_run(first.experiment_id)
    first.client.log_text(run.info.run_id, "x", "note.txt")
    assert (tmp_path / "mlartifacts").is_dir() and not Path("mlruns").exists()


def test_a_closed_port_is_said_once_and_raises_nothing(tmp_path):
    uri = closed_port_uri()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert open_tracker(TrackingConfig(uri=uri), tmp_path, "sweep") is None
        assert open_tracker(TrackingConfig(uri=uri), tmp_path, "sweep") is None  # average after the sweep
    said = [w for w in caught if issubclass(w.category, TrackingUnavailable)]
    assert len(said) == 1 and uri in str(said[0].message) and "going on without tracking" in str(said[0].message)
    assert not (tmp_path / "mlflow.db").exists()


def test_run_params_hold_what_trials_are_compared_by():
    params = run_params(parse_config({"loss": {"loss_type": "kto", "beta": 0.5},
                                      "model": {"image_tower": {"last_blocks": 2}}}).model_dump(mode="json"))
    assert params["loss_type"] == "kto" and params["beta"] == "0.5" and params["loss.beta"] == "0.5"
    assert params["image_tower"] == '{"last_blocks": 2}' and params["seed"] == "0" and params["lr"] == "0.0005"
    assert not any(key.startswith(("tracking", "output_dir")) for key in params)


@pytest.mark.slow  # a real (tiny) training run: the fixed evaluation sets cost most of it
def test_train_logs_a_run_with_metrics_by_step(tmp_path, capsys):
    from mlflow import MlflowClient

    from po_cluster.cli import main

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "output_dir": str(tmp_path / "runs"), "model": {"image_tower": "frozen"},
        "data": {"n_pairs": 64, "n_reg": 64, "n_val": 50},
        "training": {"steps": 4, "batch_size": 16, "reg_batch_size": 16}}))
    assert main(["train", "--config", str(config)]) == 0
    uri = f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    assert capsys.readouterr().out.splitlines()[-1] == f"tracked: mlflow ui --backend-store-uri {uri}"
    client = MlflowClient(uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.data.params["loss_type"] == "dpo" and run.data.params["steps"] == "4"
    assert run.data.tags["checkpoint_path"] == str((tmp_path / "runs" / "tiny").resolve())
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert {"before_clean", "after_clean", "after_attacked"} <= set(run.data.metrics)
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_train_goes_on_when_tracking_is_down(tmp_path, capsys):
    from po_cluster.cli import main

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "output_dir": str(tmp_path / "runs"), "tracking": {"uri": closed_port_uri()},
        "data": {"n_pairs": 64, "n_reg": 64, "n_val": 50}, "model": {"image_tower": "frozen"},
        "training": {"steps": 2, "batch_size": 16, "reg_batch_size": 16}}))
    with pytest.warns(TrackingUnavailable):
        assert main(["train", "--config", str(config)]) == 0
    assert "tracked:" not in capsys.readouterr().out
    assert (tmp_path / "runs" / "tiny" / "model.safetensors").is_file()


def average_result(tmp_path: Path, store: str):
    """What `average` returns once published: its numbers, and a release folder with its card."""
    from po_cluster.sweep.average import AverageResult

    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "card.md").write_text("# po-cluster release: greedy_soup\n")
    metrics = {"clean": 0.9, "attacked": 0.7, "word_only": 0.2, "attack_success": 0.1, "kl": 0.01}
    return AverageResult("greedy_soup", folder, 2, ("t1", "t2"), ("t1",),
                         {"greedy_soup": {**metrics, "objective": 0.7}}, {"base": metrics, "greedy_soup": metrics},
                         release_id="20261202-000000-abcd", store=store)


def test_average_registers_the_release_at_its_store_uri_on_the_sweeps_run(tmp_path, shared_db):
    from mlflow import MlflowClient

    from po_cluster.sweep.experiment import open_experiment
    from po_cluster.tracking.release import log_average
    from po_cluster.tracking.sweep import TRACKING_FILE

    cfg = SweepConfig(name="soups", storage_path=str(tmp_path / "sweeps"), tracking=TrackingConfig(uri=shared_db))
    experiment = open_experiment(cfg)
    result = average_result(tmp_path, str(tmp_path / "store"))
    log_average(cfg, experiment, result)
    log_average(cfg, experiment, result)  # a second average: the same run, a second version
    recorded = experiment.read_json(TRACKING_FILE)
    assert recorded["uri"] == shared_db
    client = MlflowClient(shared_db, registry_uri=shared_db)  # Tune's logger sets a global registry uri
    versions = client.search_model_versions("name = 'soups'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    expected = f"{(tmp_path / 'store').absolute()}/releases/{result.release_id}"
    assert {v.source for v in versions} == {expected} and {v.run_id for v in versions} == {recorded["run_id"]}
    assert versions[0].tags["test_attacked"] == "0.7" and versions[0].tags["chosen"] == "greedy_soup"
    parent = client.get_run(recorded["run_id"])
    assert parent.data.metrics["release_test_attacked"] == 0.7 and parent.data.tags["release_uri"] == expected
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "average")} == {
        "average/average.json", "average/soups.md", "average/card.md"}
    assert len(client.search_runs([parent.info.experiment_id])) == 1


def test_a_server_is_not_given_a_local_release_folder(tmp_path):
    from po_cluster.tracking.client import Tracker
    from po_cluster.tracking.release import register_release

    tracker = Tracker("http://127.0.0.1:1", "0", "x", client=None)  # refused before any call is made
    with pytest.raises(ValueError, match="publish to an s3:// store"):
        register_release(tracker, "m", "run", average_result(tmp_path, str(tmp_path)), str(tmp_path / "r"))
