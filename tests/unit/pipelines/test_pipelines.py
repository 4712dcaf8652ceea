"""The pipelines' typed results, without Ray: what the stages read and write in an experiment folder,
how run_pipeline chains them, and compare_losses's progress callback."""
import json
from pathlib import Path

import pytest

from po_cluster.config import CompareConfig, SweepConfig
from po_cluster.pipelines import cluster
from po_cluster.pipelines.demo import DemoAnswers
from po_cluster.sweep.average import AverageResult, ranked_trials, soup_candidates
from po_cluster.sweep.driver import RESULTS_FILE, SweepResult, TrialRecord, read_sweep

TRIALS = [
    {"trial_id": "a", "config": {"loss_type": "dpo", "beta": 0.1, "kl_weight": 0.2},
     "metrics": {"objective": 0.4, "val_clean": 0.9, "step": 40}, "checkpoint_path": "/ckpt/a", "error": None},
    {"trial_id": "b", "config": {"loss_type": "ipo", "beta": 0.3, "kl_weight": 0.1},
     "metrics": {"objective": 0.7, "val_clean": 0.8, "step": 40}, "checkpoint_path": "/ckpt/b", "error": None},
    {"trial_id": "c", "config": {"loss_type": "kto", "beta": 0.2, "kl_weight": 0.3},
     "metrics": {"step": 0}, "checkpoint_path": None, "error": "RuntimeError('boom')"},
]


def _metrics(clean: float) -> dict[str, float]:
    return {"clean": clean, "attacked": 0.6, "word_only": 0.5, "attack_success": 0.3, "kl": 0.01}


def average_result(**changes) -> AverageResult:
    fields = dict(chosen="greedy_soup", release_folder=Path("/exp/release"), top_k=2, trials=("b", "a"),
                  greedy_members=("b",), validation={"greedy_soup": {**_metrics(0.9), "objective": 0.7}},
                  test={"base": _metrics(0.95), "greedy_soup": _metrics(0.9)},
                  tradeoff=({"t": 0.0, **_metrics(0.95)}, {"t": 1.0, **_metrics(0.9)}))
    return AverageResult(**{**fields, **changes})


@pytest.fixture
def sweep_cfg(tmp_path) -> SweepConfig:
    """A finished sweep's experiment folder (results and average written), as the stages leave it."""
    cfg = SweepConfig(name="unit", storage_path=str(tmp_path / "sweeps"), store=str(tmp_path / "store"))
    folder = tmp_path / "sweeps" / "unit"
    folder.mkdir(parents=True)
    (folder / RESULTS_FILE).write_text(json.dumps({"sweep": cfg.model_dump(mode="json"), "trials": TRIALS}))
    (folder / cluster.AVERAGE_FILE).write_text(json.dumps(average_result().to_json()))
    return cfg


def test_trial_records_round_trip_the_results_file_format():
    records = [TrialRecord.from_json(t, "test") for t in TRIALS]
    assert [r.to_json() for r in records] == TRIALS
    assert records[1].objective == 0.7 and records[2].objective is None
    assert [r.trial_id for r in ranked_trials(records)] == ["b", "a"]  # no checkpoint, no objective: left out


def test_soups_take_the_top_k_of_the_best_trials_image_tower_mode():
    def trial(name: str, objective: float, mode: str) -> TrialRecord:
        return TrialRecord(name, {"image_tower": mode}, {"objective": objective}, f"/ckpt/{name}")

    records = [trial("a", 0.9, "lora:r8a16"), trial("b", 0.8, "full"), trial("c", 0.7, "lora:r8a16"),
               trial("d", 0.6, "lora:r8a16")]
    assert [r.trial_id for r in soup_candidates(records, 2)] == ["a", "c"]
    assert [r.trial_id for r in soup_candidates(records[1:2], 3)] == ["b"]
    with pytest.raises(ValueError, match="no finished trial"):
        soup_candidates([], 3)


def test_bad_trial_records_are_refused_naming_the_file():
    with pytest.raises(ValueError, match="results.json: a trial must be a JSON object"):
        TrialRecord.from_json(["a"], "results.json")
    with pytest.raises(ValueError, match="results.json: trial 'a' has a non-object 'metrics'"):
        TrialRecord.from_json({"trial_id": "a", "metrics": 0.5}, "results.json")


def test_read_sweep_returns_the_finished_sweep(sweep_cfg):
    result = read_sweep(sweep_cfg)
    assert isinstance(result, SweepResult) and not result.ran  # read back, not run
    assert result.name == "unit" and result.uri.endswith("/sweeps/unit")
    assert [t.trial_id for t in result.trials] == ["a", "b", "c"] and result.with_checkpoint == 2


def test_read_sweep_before_the_sweep_says_so(tmp_path):
    cfg = SweepConfig(name="none", storage_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no {RESULTS_FILE} in .*none: run \\(or resume\\) the sweep"):
        read_sweep(cfg)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / RESULTS_FILE).write_text(json.dumps({"trials": {"a": 1}}))
    with pytest.raises(ValueError, match="expected a list of trials"):
        read_sweep(cfg)


def test_average_result_is_written_as_average_json_was():
    result = average_result()
    assert result.metrics == _metrics(0.9)  # the chosen candidate on the evaluation sets
    assert result.release_id is None and result.store is None  # not published
    assert list(result.to_json()) == ["chosen", "top_k", "trials", "greedy_members", "validation", "test",
                                      "tradeoff", "attacks", "release_folder"]
    assert result.to_json()["release_folder"] == "/exp/release" and result.to_json()["trials"] == ["b", "a"]
    with pytest.raises(AttributeError):
        result.chosen = "best_trial"  # frozen


def test_run_report_writes_the_report_of_a_local_experiment(sweep_cfg, tmp_path):
    report = cluster.run_report(sweep_cfg)
    assert isinstance(report, cluster.ReportResult) and report.uri is None  # local: nothing uploaded
    assert report.markdown == tmp_path / "sweeps" / "unit" / "report" / "report.md"
    assert report.html.is_file() and (report.markdown.parent / "tradeoff.png").stat().st_size > 0
    text = report.markdown.read_text()
    assert "3 trials." in text and "Release: **greedy_soup**" in text


def _fake_stages(monkeypatch, calls: list) -> None:
    sweep = SweepResult("unit", "/exp", (), ran=False)
    monkeypatch.setattr(cluster, "sweep_or_resume", lambda cfg, rerun: calls.append(("sweep", rerun)) or sweep)
    monkeypatch.setattr(cluster, "run_average", lambda cfg, store: calls.append(("average", store)) or
                        average_result(release_id="r-1", store=store))
    monkeypatch.setattr(cluster, "run_report", lambda cfg: calls.append(("report",)) or
                        cluster.ReportResult(Path("r.md"), Path("r.html")))
    answers = DemoAnswers("r-1", "http://127.0.0.1:1", "s", "square", "circle", (("circle", 0.9),), {}, {})
    monkeypatch.setattr("po_cluster.pipelines.demo.ask_release",
                        lambda store, release_id: calls.append(("ask", store, release_id)) or answers)


def test_run_pipeline_chains_the_stages_and_reports_each(monkeypatch, sweep_cfg):
    calls, seen = [], []
    _fake_stages(monkeypatch, calls)
    result = cluster.run_pipeline(sweep_cfg, "/the/store", rerun=True, on_stage=seen.append)
    assert calls == [("sweep", True), ("average", "/the/store"), ("report",)]  # nothing served unless asked
    assert isinstance(result, cluster.PipelineResult) and result.served is None
    assert seen == [result.sweep, result.average, result.report]
    assert result.average.release_id == "r-1" and result.average.store == "/the/store"

    calls.clear()
    served = cluster.run_pipeline(sweep_cfg, "/the/store", ask_served=True)
    assert calls[-1] == ("ask", "/the/store", "r-1")  # the release just published, from that store
    assert served.served.release_id == "r-1"


def test_compare_losses_reports_progress_per_run_and_returns_rows(monkeypatch, tmp_path):
    from po_cluster.pipelines import compare
    from po_cluster.train.run import RunResult

    def fake_training(run, session, callbacks):
        for step in (1, 2):
            for callback in callbacks:
                callback.on_step_end(step, {"loss": 1.0 / step})
        return RunResult(Path(run.output_dir) / run.name, {"clean": 0.5}, {"clean": 0.8}, {}, 1.5)

    monkeypatch.setattr(compare, "train", fake_training)
    monkeypatch.setattr(compare, "evaluation_sets", lambda: {})
    steps = []
    cfg = CompareConfig(base={"name": "cmp"}, losses={"dpo": {"beta": 0.2}, "ipo": {}}, ablation=None)
    result = compare.compare_losses(cfg, str(tmp_path), progress=lambda run, step, m: steps.append((run.name, step)))
    assert steps == [("cmp-dpo", 1), ("cmp-dpo", 2), ("cmp-ipo", 1), ("cmp-ipo", 2)]
    assert [row["model"] for row in result.rows][:2] == ["base", "dpo (beta=0.2, kl_weight=0.3)"]
    assert result.checkpoints == {"dpo": tmp_path / "cmp-dpo", "ipo": tmp_path / "cmp-ipo"}
    assert "checkpoints:" in result.table() and f"  ipo: {tmp_path / 'cmp-ipo'}" in result.table()


def test_a_compare_row_names_the_settings_that_tell_it_apart():
    from po_cluster.config import LossConfig
    from po_cluster.pipelines.compare import loss_settings

    assert loss_settings(LossConfig(loss_type="kto", beta=0.5, kl_weight=0.3)) == "beta=0.5, kl_weight=0.3"
    # the anchor loss has no β; unset, its weight is 1
    assert loss_settings(LossConfig(loss_type="anchor", kl_weight=1.0)) == \
        "kl_weight=1, anchor_weight=1, anchor_space=logits"
    assert loss_settings(LossConfig(loss_type="dpo", beta=0.3, anchor_weight=2.0, anchor_space="embedding")) == \
        "beta=0.3, kl_weight=0.3, anchor_weight=2, anchor_space=embedding"
    # a space set on the base for the anchor row leaves the paper's rows as they were
    assert loss_settings(LossConfig(loss_type="ipo", beta=0.02, anchor_space="embedding")) == "beta=0.02, kl_weight=0.3"

def test_the_sweep_reports_the_head_ablation_only_where_asked_and_typographic(tmp_path, monkeypatch):
    from po_cluster.config import SweepConfig
    from po_cluster.pipelines import ablate as ablate_module
    from po_cluster.pipelines.cluster import _comparators

    calls = []

    def fake_ablate(run, cfg, output_dir):
        calls.append((run.name, cfg.max_heads, output_dir))
        return ablate_module.AblationResult(tmp_path, ablate_module.Selection(0.0, ()), {}, {"clean": 0.5}, 1.0)

    monkeypatch.setattr(ablate_module, "ablate", fake_ablate)
    assert _comparators(SweepConfig(), tmp_path) == {}  # not asked
    bias = SweepConfig(base={"data": {"task": "bias"}}, ablation={"max_heads": 2})
    assert _comparators(bias, tmp_path) == {}  # no word to remove
    asked = SweepConfig(base={"name": "s"}, ablation={"max_heads": 2})
    assert _comparators(asked, tmp_path) == {"head ablation (none worth it)": {"clean": 0.5}}
    assert calls == [("s", 2, tmp_path / "ablation")]


def test_the_report_of_an_anchor_sweep_has_its_map_and_the_attacks_that_still_work(tmp_path):
    from po_cluster.evaluate.report import write_report

    records = [{"trial_id": f"t{i}", "config": {"loss_type": "anchor", "beta": 0.3, "kl_weight": 1.0 + i},
                "metrics": {"objective": 0.5 + i / 10, "val_attacked": 0.6}} for i in range(2)]
    attacks = {"attacked": {"images": 10, "fooled": 2, "words": [{"from": "star", "to": "star", "count": 2}],
                            "confusions": [{"from": "kite", "to": "star", "count": 3}]},
               "styles": {"upper": 0.7, "colour": 0.4}}
    average = {"chosen": "best_trial", "greedy_members": ["t1"], "test": {"base": {"clean": 0.9}},
               "tradeoff": [{"t": 0.0, "clean": 0.9}, {"t": 1.0, "clean": 0.88}], "attacks": attacks}
    markdown, _ = write_report(records, average, tmp_path, "anchor sweep")
    text = markdown.read_text()
    assert (tmp_path / "beta_lambda.png").stat().st_size > 0
    assert "## Attacks that still work on the release (t = 1)" in text
    assert "2 of 10 attacked test images are answered with the written word." in text
    assert "| kite | star | 3 |" in text and "| colour | 0.400 |" in text
