"""MLflow tracking of a sweep against a real `mlflow server` on 127.0.0.1: one parent run, a child
run per trial with its metrics by step, the average's artifacts and the release registered as a
model version whose source is its store URI; and the same sweep with the server stopped."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from po_cluster.config import SweepConfig
from po_cluster.pipelines import read_sweep, run_average, run_report, run_sweep
from po_cluster.tracking.client import TrackingUnavailable
from po_cluster.tracking.sweep import PARENT_TAG, TRACKING_FILE

pytestmark = pytest.mark.slow

STEPS, REPORT_EVERY = 40, 20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """`mlflow server` in its own process: sqlite backend and proxied artifacts in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (folder / "server.log").open("w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", str(folder / "server-artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while not self.healthy():
            assert self.process.poll() is None and time.time() < deadline, (folder / "server.log").read_text()[-3000:]
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def sweep_config(root: Path, name: str, tracking_uri: str, store: str) -> SweepConfig:
    """The integration sweep of test_sweep.py cut to two trials (one per loss), tracked at `tracking_uri`.
    The trials train in the Tune trial (`trial_runner: tune`): tracking is the subject, and a TorchTrainer
    per trial (tests/integration/sweep) would add its start-up to each."""
    return SweepConfig.model_validate({
        "name": name, "storage_path": str(root / "sweeps"), "store": store, "num_samples": 2, "top_k": 2,
        "trial_runner": "tune", "scaling": {"cpus_per_worker": 1},
        "reporting": {"report_every": REPORT_EVERY, "checkpoint_every": REPORT_EVERY}, "seed": 3,
        "space": {"loss_type": ["dpo", "ipo"], "beta": {"low": 0.02, "high": 0.5},
                  "kl_weight": {"low": 0.05, "high": 0.5}},
        "scheduler": {"grace_period": 2},
        "tracking": {"uri": tracking_uri, "registered_model": f"{name}-release"},
        "base": {"model": {"image_tower": "frozen"}, "data": {"n_pairs": 512, "n_reg": 256, "n_val": 100},
                 "optimizer": {"lr": 5e-2, "spectral_lr": 5e-2},
                 "training": {"steps": STEPS, "batch_size": 64, "reg_batch_size": 64}},
    })


def run_stages(cfg: SweepConfig) -> tuple[list[warnings.WarningMessage], float]:
    """sweep, average (published), report: the pipeline's stages; the tracking warnings and seconds."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrackingUnavailable)
        run_sweep(cfg)
        run_average(cfg, cfg.store)
        run_report(cfg)
    seconds = time.perf_counter() - start
    return [w for w in caught if issubclass(w.category, TrackingUnavailable)], seconds


@pytest.fixture()
def s3_store(moto_s3, bucket, monkeypatch) -> str:
    """A release store in S3 (moto): a tracking server takes a store URI as a model source, not a local path."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint_url)
    return f"s3://{bucket}/store"


def test_sweep_and_average_are_tracked_on_a_server(ray_cluster, mlflow_server, s3_store, tmp_path):
    from mlflow import MlflowClient

    cfg = sweep_config(tmp_path, "tracked", mlflow_server.url, s3_store)
    said, seconds = run_stages(cfg)
    assert not said, [str(w.message) for w in said]
    print(f"\n2-trial sweep + average + report, tracked on a server: {seconds:.1f} s")
    client = MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    records = {r.trial_id: r for r in read_sweep(cfg).trials}
    for child in children:
        record = records[child.data.tags["trial_id"]]
        assert child.info.status == "FINISHED"
        assert {"loss_type", "beta", "kl_weight", "lr", "image_tower", "seed"} <= set(child.data.params)
        assert child.data.params["loss_type"] == record.config["loss_type"]
        assert float(child.data.params["beta"]) == pytest.approx(record.config["beta"])
        assert child.data.tags["checkpoint_path"] == record.checkpoint_path
        for metric in ("objective", "val_attacked", "val_clean"):
            history = client.get_metric_history(child.info.run_id, metric)
            assert [m.step for m in history] == [REPORT_EVERY, STEPS], metric
        assert history[-1].value == pytest.approx(record.metrics["val_clean"])
    average = {a.path for a in client.list_artifacts(parent.info.run_id, "average")}
    assert average == {"average/average.json", "average/soups.md", "average/card.md"}
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/tradeoff.png", "report/beta_lambda.png"} <= report
    versions = client.search_model_versions("name = 'tracked-release'")
    assert len(versions) == 1
    release_id = parent.data.tags["release_uri"].rsplit("/", 1)[-1]
    assert versions[0].source == f"{s3_store}/releases/{release_id}" == parent.data.tags["release_uri"]
    assert versions[0].run_id == parent.info.run_id and versions[0].tags["release_id"] == release_id
    assert float(versions[0].tags["test_clean"]) == pytest.approx(client.get_run(parent.info.run_id)
                                                                   .data.metrics["release_test_clean"], rel=1e-5)
    assert not (tmp_path / "sweeps" / "tracked" / "mlflow.db").exists()  # the server is the store


def test_a_stopped_server_is_said_once_and_the_sweep_goes_on(ray_cluster, mlflow_server, tmp_path):
    mlflow_server.stop()
    cfg = sweep_config(tmp_path, "untracked", mlflow_server.url, str(tmp_path / "store"))
    said, seconds = run_stages(cfg)
    print(f"\n2-trial sweep + average + report, server stopped: {seconds:.1f} s")
    assert len(said) == 1, [str(w.message) for w in said]
    message = str(said[0].message)
    assert mlflow_server.url in message and "going on without tracking" in message
    assert len(read_sweep(cfg).trials) == 2
    assert (tmp_path / "store" / "releases" / "latest.json").is_file()
    assert not (tmp_path / "sweeps" / "untracked" / TRACKING_FILE).exists()
