"""A sweep whose storage_path is in S3 (moto's server over HTTP): killed, resumed from
the bucket, and its release published to the bucket."""
import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from po_cluster.cli import main as cli_main
from po_cluster.store.artifacts import open_store
from po_cluster.store.location import StoreConfig
from test_sweep import STEPS, sweep_command, terminated_trials

pytestmark = pytest.mark.slow


def _latest_state(client, bucket: str, prefix: str) -> str | None:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    states = sorted(o["Key"] for o in listed if o["Key"].rsplit("/", 1)[-1].startswith("experiment_state-"))
    return client.get_object(Bucket=bucket, Key=states[-1])["Body"].read().decode() if states else None


def test_sweep_on_s3_is_killed_resumes_from_the_bucket_and_publishes(ray_cluster, moto_s3, bucket, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint_url)
    monkeypatch.delenv("PO_CLUSTER_STORE", raising=False)  # the config's store is the one published to
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "s3sweep", "storage_path": f"s3://{bucket}/sweeps", "store": f"s3://{bucket}/store",
        "num_samples": 3, "reporting": {"report_every": 20, "checkpoint_every": 20}, "top_k": 2, "seed": 2,
        # TorchTrainer trials (the default runner): a trial in the Tune process ends before the driver
        # could be killed with one trial finished, and Train's checkpoints in the bucket are tested here
        "space": {"loss_type": ["dpo", "kto", "ipo"], "beta": {"low": 0.05, "high": 0.5},
                  "kl_weight": {"low": 0.05, "high": 0.5}},
        "base": {"model": {"image_tower": "frozen"}, "data": {"n_pairs": 512, "n_reg": 256, "n_val": 100},
                 "optimizer": {"lr": 5e-2}, "training": {"steps": STEPS, "batch_size": 64, "reg_batch_size": 64}},
    }))
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen(sweep_command(config, ray_cluster), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    client, prefix = moto_s3.client(), "sweeps/s3sweep/"
    deadline = time.time() + 600
    while not terminated_trials(_latest_state(client, bucket, prefix)) and time.time() < deadline \
            and driver.poll() is None:
        time.sleep(1)
    assert driver.poll() is None, "the sweep ended before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert 0 < len(terminated_trials(_latest_state(client, bucket, prefix))) < 3

    resumed = subprocess.run(sweep_command(config, ray_cluster, "--resume"), env=env, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert client.head_object(Bucket=bucket, Key=prefix + "sweep_results.json")
    assert client.head_object(Bucket=bucket, Key=prefix + "optuna-study.journal")
    journal = client.get_object(Bucket=bucket, Key=prefix + "optuna-study.journal")["Body"].read().decode()
    created = [line for line in journal.splitlines() if json.loads(line)["op_code"] == 4]  # CREATE_TRIAL
    assert len(created) >= 3, "the stored study holds the trials of both runs"

    monkeypatch.chdir(tmp_path)  # local scratch (release folder) goes under tmp_path
    capsys.readouterr()
    assert cli_main(["average", "--config", str(config)]) == 0
    store = open_store(f"s3://{bucket}/store", StoreConfig(endpoint_url=moto_s3.endpoint_url))
    releases = store.list_releases()
    assert len(releases) == 1 and store.latest() == releases[0].release_id
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("release candidate: ") and printed[0].endswith("runs/sweeps/s3sweep/release")
    assert printed[1] == f"published release {store.latest()} to s3://{bucket}/store"
    assert (store.pull_release("latest") / "card.md").is_file()
    assert cli_main(["report", "--config", str(config)]) == 0  # written locally, uploaded beside the sweep
    assert capsys.readouterr().out.splitlines()[-1] == f"        s3://{bucket}/sweeps/s3sweep/report/"
    assert client.head_object(Bucket=bucket, Key=prefix + "report/report.html")
    assert client.head_object(Bucket=bucket, Key=prefix + "average.json")
