"""The command line as a user runs it: JSON output, training end to end, clear errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from po_cluster.cli import main

ROOT = Path(__file__).resolve().parents[3]

PO = [sys.executable, "-m", "po_cluster.cli"]


@pytest.mark.slow  # the fixed evaluation sets in full: `make test` runs it, `make unit` does not
def test_evaluate_json_prints_the_documented_keys(capsys):
    assert main(["evaluate", "--json", "--t", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"clean", "attacked", "word_only", "own_word", "attack_success", "kl", "retention", "bias_gap",
                        "attacked_styles", "retain_colour", "retain_size", "bias_stereotyped", "bias_counter"}
    assert out["retention"] == pytest.approx((out["retain_colour"] + out["retain_size"]) / 2)
    assert out["bias_gap"] == pytest.approx(out["bias_stereotyped"] - out["bias_counter"])
    # the shipped base model: it reads, is fooled, knows colours and sizes, and is biased (its card's numbers)
    assert 0.85 <= out["clean"] <= 0.95 and out["word_only"] >= 0.8 and out["attacked"] <= 0.3 <= out["own_word"]
    assert out["attacked_styles"] <= 0.3  # it reads the held-out styles too
    assert out["retention"] >= 0.8 and out["bias_gap"] >= 0.3


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


@pytest.mark.slow  # the fixed evaluation sets in full: `make test` runs it, `make unit` does not
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


@pytest.mark.slow  # the fixed evaluation sets in full: `make test` runs it, `make unit` does not
def test_evaluate_finds_a_release_id_in_the_store_of_the_environment(release_template, tmp_path, capsys,
                                                                      monkeypatch):
    from po_cluster.store.artifacts import open_store

    store = str(tmp_path / "env-store")
    release_id = open_store(store).publish_release(release_template)
    monkeypatch.setenv("PO_CLUSTER_STORE", store)
    assert main(["evaluate", release_id, "--json", "--t", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["kl"] < 1e-6  # t = 0: the release is its own reference


def test_resolve_target_passes_folders_and_looks_ids_up_in_the_store(release_template, tmp_path):
    from po_cluster.config import SHIPPED_BASE
    from po_cluster.model.targets import resolve_target
    from po_cluster.store.artifacts import StoreError, open_store

    assert resolve_target(str(release_template)) == str(release_template)
    assert resolve_target(SHIPPED_BASE) == SHIPPED_BASE
    assert resolve_target("s3://bucket/store/releases/latest", None) == "s3://bucket/store/releases/latest"
    store = str(tmp_path / "store")
    release_id = open_store(store).publish_release(release_template)
    pulled = Path(resolve_target(release_id, store))
    assert pulled.is_dir() and pulled != release_template and (pulled / "card.md").is_file()
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at r-other"):
        resolve_target("r-other")  # not a folder, and no store to look it up in
    with pytest.raises(StoreError, match="no release r-other"):
        resolve_target("r-other", store)


@pytest.mark.parametrize(("flag", "env", "configured", "expected"), [
    ("flag", "env", "config", "flag"),
    (None, "env", "config", "env"),
    (None, "", "config", "config"),  # an empty variable is no setting (not the current folder)
    (None, None, "config", "config"),
    (None, None, None, "./artifacts"),
    (None, "", None, "./artifacts"),
])
def test_default_store_precedence_is_flag_env_config_default(monkeypatch, flag, env, configured, expected):
    from po_cluster.cli.common import default_store

    if env is None:
        monkeypatch.delenv("PO_CLUSTER_STORE", raising=False)
    else:
        monkeypatch.setenv("PO_CLUSTER_STORE", env)
    assert default_store(flag, configured) == expected


def test_embed_config_store_follows_the_same_precedence(tmp_path, monkeypatch):
    from po_cluster.cli import build_parser
    from po_cluster.cli.embed import config_from_args

    config = tmp_path / "embed.yaml"
    config.write_text("input: images\noutput: out\nstore: from-config\n")

    def store(*flags: str) -> str:
        return config_from_args(build_parser().parse_args(["embed", *flags])).store

    monkeypatch.delenv("PO_CLUSTER_STORE", raising=False)
    assert store("--config", str(config)) == "from-config"
    assert store("--input", "i", "--output", "o") == "./artifacts"
    monkeypatch.setenv("PO_CLUSTER_STORE", "from-env")
    assert store("--config", str(config)) == "from-env"
    assert store("--config", str(config), "--store", "from-flag") == "from-flag"


def _sweep_config(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "cli", "storage_path": str(tmp_path / "sweeps"), **fields}))
    return path


@pytest.fixture
def fake_average(monkeypatch):
    """run_average replaced: each call is recorded and answered with a small published result."""
    from po_cluster.pipelines import cluster
    from po_cluster.sweep.average import AverageResult

    calls = []

    def run_average(cfg, store, top_k=None, publish=True):
        calls.append({"name": cfg.name, "store": store, "top_k": top_k, "publish": publish})
        return AverageResult("greedy_soup", Path("/exp/release"), 2, ("a", "b"), ("a",), {}, {},
                             release_id="r-1" if publish else None, store=store if publish else None)

    monkeypatch.setattr(cluster, "run_average", run_average)
    return calls


def test_average_publishes_to_the_store_of_flag_env_or_config(tmp_path, monkeypatch, capsys, fake_average):
    config = str(_sweep_config(tmp_path, store="cfg-store"))
    monkeypatch.delenv("PO_CLUSTER_STORE", raising=False)
    assert main(["average", "--config", config]) == 0
    assert capsys.readouterr().out.splitlines() == ["release candidate: greedy_soup → /exp/release",
                                                    "published release r-1 to cfg-store"]
    monkeypatch.setenv("PO_CLUSTER_STORE", "env-store")  # the store `serve` and `evaluate` read, too
    assert main(["average", "--config", config]) == 0
    assert main(["average", "--config", config, "--store", "flag-store", "--top-k", "3", "--no-publish"]) == 0
    assert [c["store"] for c in fake_average] == ["cfg-store", "env-store", "flag-store"]
    assert fake_average[-1]["top_k"] == 3 and not fake_average[-1]["publish"]
    assert "published" not in capsys.readouterr().out.splitlines()[-1]


def test_pipeline_serves_only_on_a_ray_of_its_own_and_prints_each_stage(tmp_path, monkeypatch, capsys):
    from po_cluster.pipelines import cluster
    from po_cluster.pipelines.demo import DemoAnswers
    from po_cluster.sweep.average import AverageResult
    from po_cluster.sweep.driver import SweepResult

    calls = []

    def run_pipeline(cfg, store, rerun=False, ask_served=False, on_stage=None):
        calls.append({"store": store, "rerun": rerun, "ask_served": ask_served})
        on_stage(SweepResult(cfg.name, "/exp", (), ran=False))
        on_stage(AverageResult("best_trial", Path("/exp/release"), 1, ("a",), ("a",), {}, {}, release_id="r-2",
                               store=store))
        on_stage(cluster.ReportResult(Path("/exp/report/report.md"), Path("/exp/report/report.html"), "s3://b/r/"))
        if ask_served:
            answer = {"t": 1.0, "scores": [{"label": "square", "probability": 0.9}]}
            on_stage(DemoAnswers("r-2", "http://127.0.0.1:9", store, "square", "circle", (("circle", 0.8),),
                                 {**answer, "t": 0.0}, answer))

    monkeypatch.setattr(cluster, "connect_ray", lambda address: address is None)  # ours unless joined
    monkeypatch.setattr(cluster, "run_pipeline", run_pipeline)
    monkeypatch.setenv("PO_CLUSTER_STORE", "env-store")
    config = str(_sweep_config(tmp_path, store="cfg-store"))
    assert main(["pipeline", "--config", config, "--rerun"]) == 0
    out = capsys.readouterr().out
    assert calls[-1] == {"store": "env-store", "rerun": True, "ask_served": True}
    assert "sweep cli already complete in /exp (use --rerun to resume it anyway)" in out
    assert "published release r-2 to env-store" in out and "        s3://b/r/" in out
    assert "served r-2 at http://127.0.0.1:9; a square with the word 'circle' written on it:" in out
    assert "shipped base model, in process: circle 0.80" in out and "t=0: square 0.90" in out
    assert "po-cluster serve --store env-store" in out
    assert main(["pipeline", "--config", config, "--address", "10.0.0.1:6379", "--store", "s"]) == 0
    assert calls[-1] == {"store": "s", "rerun": False, "ask_served": False}  # a shared cluster: no serving
    assert "served" not in capsys.readouterr().out


def test_compare_prints_one_table_with_a_bar_per_loss(tmp_path, monkeypatch, capsys):
    from po_cluster.pipelines import compare
    from po_cluster.train.run import RunResult

    def fake_training(run, session, callbacks):
        for step in range(1, run.training.steps + 1):
            for callback in callbacks:
                callback.on_step_end(step, {"loss": 0.5})
        return RunResult(Path(run.output_dir) / run.name, {"clean": 0.5}, {"clean": 0.7}, {}, 2.0)

    monkeypatch.setattr(compare, "train", fake_training)
    monkeypatch.setattr(compare, "evaluation_sets", lambda: {})
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"base": {"name": "c", "training": {"steps": 5}},
                                      "losses": {"dpo": {}, "kto": {}}, "ablation": None}))
    assert main(["compare", "--config", str(config), "--output-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "c-dpo" in captured.err and "c-kto" in captured.err  # one progress bar per run, on stderr
    lines = captured.out.splitlines()
    assert lines[0].replace("|", " ").split()[:2] == ["model", "clean"]
    assert sum(1 for line in lines if "base" in line or "dpo (" in line or "kto (" in line) == 3
    assert f"  kto: {tmp_path / 'c-kto'}" in lines


COMMAND_CONFIGS = {"train": "RunConfig", "compare": "CompareConfig", "sweep": "SweepConfig",
                   "average": "SweepConfig", "report": "SweepConfig", "pipeline": "SweepConfig"}


@pytest.mark.parametrize("doc", ["README.md", "Makefile"])
def test_documented_commands_name_configs_of_their_kind(doc):
    import po_cluster.config as config

    text = (ROOT / doc).read_text()
    found = re.findall(r"po-cluster (\w+) --config (configs/[\w.-]+\.yaml)", text)
    assert found, f"no `po-cluster <command> --config configs/…` in {doc}"
    for command, path in found:
        if command in COMMAND_CONFIGS:  # a bad pairing fails here as it would for the user
            config.load_config(ROOT / path, getattr(config, COMMAND_CONFIGS[command]))
