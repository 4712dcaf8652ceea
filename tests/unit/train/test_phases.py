"""The trial's phase clock: seconds per phase, cumulative, on one clock (no Ray)."""
import pytest

from po_cluster.train.phases import PHASE_KEYS, PhaseClock


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_phases_add_up_and_time_trial_counts_from_the_driver_start():
    tick = FakeClock()
    clock = PhaseClock(started_at=1000.0, clock=tick, wall=lambda: 1004.0)  # the worker entered 4 s in
    with clock.phase("model_load"):
        tick.now += 2.0
    tick.now += 0.5  # between phases: counted by time_trial alone
    for _ in range(3):
        clock.start("train_steps")
        tick.now += 1.0
        clock.stop("train_steps")
    summary = clock.summary()
    assert summary["time_worker_start"] == 4.0 and summary["time_model_load"] == 2.0
    assert summary["time_train_steps"] == summary["train_seconds"] == 3.0
    assert summary["steps_per_second"] == 1.0
    assert summary["time_trial"] == 4.0 + 5.5 and summary["trial_started_at"] == 1000.0
    assert sum(summary[k] for k in PHASE_KEYS) == 9.0 <= summary["time_trial"]
    assert summary["time_checkpoint"] == 0.0 and set(PHASE_KEYS) <= set(summary)


def test_a_worker_without_a_driver_start_reports_no_trial_time():
    summary = PhaseClock(clock=FakeClock()).summary()
    assert "time_trial" not in summary and "time_worker_start" not in summary and "trial_started_at" not in summary
    assert summary["time_train_steps"] == 0.0


def test_a_phase_counts_even_when_its_body_raises():
    tick = FakeClock()
    clock = PhaseClock(clock=tick)
    with pytest.raises(ValueError), clock.phase("checkpoint"):
        tick.now += 1.5
        raise ValueError("disk full")
    assert clock.seconds["checkpoint"] == 1.5 and clock.counts["checkpoint"] == 1


def test_phases_do_not_nest_and_unknown_ones_are_refused():
    clock = PhaseClock(clock=FakeClock())
    with pytest.raises(KeyError, match="unknown phase"):
        clock.start("tea_break")
    clock.start("validation")
    with pytest.raises(RuntimeError, match="do not nest"):
        clock.start("checkpoint")
    with pytest.raises(RuntimeError, match="not running"):
        clock.stop("checkpoint")
