"""The report's summary of where the trials' time went, from sweep_results.json records (no Ray)."""
import pytest

from po_cluster.evaluate.report import breakdown_section, time_breakdown


def _record(started: float, trial: float, steps: float, **phases: float) -> dict:
    metrics = {"trial_started_at": started, "time_trial": trial, "time_train_steps": steps,
               "time_total_s": 999.0,  # Tune's own time_ key: never a phase
               **{f"time_{k}": v for k, v in phases.items()}}
    return {"trial_id": f"t{started}", "metrics": metrics}


def test_time_breakdown_sums_the_phases_and_their_shares():
    records = [_record(0.0, 10.0, 4.0, worker_start=3.0, checkpoint=1.0), _record(0.0, 10.0, 6.0, worker_start=1.0),
               {"trial_id": "failed", "metrics": {}, "error": "boom"}]  # never reported: left out
    out = time_breakdown(records, wall_seconds=20.0, slots=2)
    assert out["trials"] == 2 and out["total_seconds"] == 20.0
    assert out["seconds"]["train_steps"] == 10.0 and out["seconds"]["worker_start"] == 4.0
    assert out["seconds"]["other"] == 20.0 - 10.0 - 4.0 - 1.0 and out["seconds"]["model_load"] == 0.0
    assert out["share"]["train_steps"] == 0.5 and sum(out["share"].values()) == pytest.approx(1.0)
    assert out["efficiency"] == 10.0 / (20.0 * 2)


def test_without_wall_time_and_slots_the_efficiency_comes_from_the_trials_spans():
    # two at once from 0 to 10, then one from 10 to 16: a 16 s span, at most 2 trials at once
    records = [_record(0.0, 10.0, 5.0), _record(0.0, 10.0, 5.0), _record(10.0, 6.0, 4.0)]
    out = time_breakdown(records)
    assert out["wall_seconds"] == 16.0 and out["slots"] == 2
    assert out["efficiency"] == 14.0 / (16.0 * 2)
    assert time_breakdown(records, slots=4)["efficiency"] == 14.0 / (16.0 * 4)


def test_untimed_trials_give_no_breakdown_and_no_report_section():
    out = time_breakdown([{"trial_id": "old", "metrics": {"objective": 0.5, "train_seconds": 3.0}}])
    assert out["trials"] == 0 and out["efficiency"] is None
    assert breakdown_section(out) == []


def test_the_report_section_is_a_table_with_the_efficiency():
    text = "\n".join(breakdown_section(time_breakdown([_record(0.0, 10.0, 5.0)], wall_seconds=12.5, slots=1)))
    assert "## Where the trials' time went" in text and "| train_steps | 5.0 | 50.0% |" in text
    assert "| other | 5.0 | 50.0% |" in text and "**40.0%**" in text
