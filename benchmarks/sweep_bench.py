"""Where a sweep's time goes (shares and ratios, not absolute times).

The demo sweep (configs/demo-sweep.yaml) scaled down to a few trials of a few steps,
on a local 2-CPU Ray cluster in a temporary folder: per phase of the trials (model
load, data prep, validation, training steps, checkpoints, Ray's own start-up and
bookkeeping), the seconds summed over the trials and their share of the trials'
time; then the sweep efficiency, Σ training-step seconds ÷ (sweep wall seconds ×
concurrent trial slots): the part of the cluster's trial slots spent training. It runs the
sweep twice, side by side: every trial preparing its own inputs (share_inputs: false) and the
sweep computing them once for all (share_inputs: true, the default). `--compare runner` runs a
frozen-tower sweep twice instead: each trial fitting a TorchTrainer, and each trial training in
the Tune trial itself (trial_runner: tune), both on shared inputs.

    .venv/bin/python benchmarks/sweep_bench.py [--trials 4] [--steps 60] [--image-tower frozen]
        [--cpus-per-worker 0.25] [--compare share|runner]
"""
import argparse
import logging
import tempfile
import time
from pathlib import Path

from po_cluster.config import SweepConfig, load_config
from po_cluster.evaluate.report import time_breakdown

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo-sweep.yaml"


def bench_config(folder: Path, trials: int, steps: int, share: bool = True,
                 image_tower: str | None = None, cpus_per_worker: float | None = None,
                 trial_runner: str = "torch_trainer") -> SweepConfig:
    """The demo sweep with `trials` trials of `steps` steps, reporting (and checkpointing) as often
    per trial as the demo does, everything written under `folder`."""
    demo = load_config(DEMO, SweepConfig)
    every = max(1, steps * demo.reporting.report_every // demo.base.training.steps)
    data = demo.model_dump(mode="json")
    data |= {"name": "sweep-bench", "storage_path": str(folder / "sweeps"), "store": str(folder / "store"),
             "num_samples": trials, "reporting": {"report_every": every, "checkpoint_every": every},
             "share_inputs": share, "trial_runner": trial_runner}
    data["base"]["training"]["steps"] = steps
    if image_tower is not None:
        data["base"]["model"]["image_tower"] = image_tower
    if cpus_per_worker is not None:  # fractions pack several trials on one CPU
        data["scaling"] = data.get("scaling", {}) | {"cpus_per_worker": cpus_per_worker}
    return SweepConfig.model_validate(data)


def run(share: bool, runner: str, args: argparse.Namespace) -> tuple[dict, dict, SweepConfig]:
    from po_cluster.sweep.driver import max_concurrent_trials, run_sweep

    with tempfile.TemporaryDirectory(prefix="po-sweep-bench-") as tmp:
        # TorchTrainer trials keep the demo's whole CPU each when compared with trials in Tune: 8 worker
        # groups starting at once on 2 CPUs take minutes each to start (docs/results.md)
        cpus = None if args.compare == "runner" and runner == "torch_trainer" else args.cpus_per_worker
        cfg = bench_config(Path(tmp), args.trials, args.steps, share, args.image_tower, cpus, runner)
        slots = max_concurrent_trials(cfg)
        start = time.perf_counter()
        result = run_sweep(cfg)
        wall = time.perf_counter() - start
    records = [t.to_json() for t in result.trials]
    return time_breakdown(records, wall, slots), time_breakdown(records), cfg


def print_breakdown(measured: dict) -> None:
    total, n = measured["total_seconds"], max(measured["trials"], 1)
    print(f"{'phase':<18}{'Σ s':>9}{'s/trial':>9}{'share':>8}")
    for name, seconds in measured["seconds"].items():
        share = measured["share"][name]
        print(f"{name:<18}{seconds:>9.1f}{seconds / n:>9.1f}{share:>8.1%}" if share is not None else name)
    print(f"{'trial (total)':<18}{total:>9.1f}{total / n:>9.1f}{1:>8.0%}")


def report(measured: dict, from_records: dict, cfg: SweepConfig, trials: int, steps: int) -> float | None:
    print(f"\nshare_inputs {cfg.share_inputs}: {measured['trials']} timed trials of {trials}, {steps} steps each "
          f"(report every {cfg.reporting.report_every}), {cfg.scaling.num_workers} worker × "
          f"{cfg.scaling.cpus_per_worker} CPU "
          f"per trial, image tower {cfg.base.model.image_tower}, trial runner {cfg.trial_runner}")
    print_breakdown(measured)
    if measured["efficiency"] is None:
        print("sweep efficiency: not computable (no trial reported its phases)")
        return None
    print(f"sweep efficiency: Σ train steps {measured['seconds']['train_steps']:.1f} s ÷ "
          f"(wall {measured['wall_seconds']:.1f} s × {measured['slots']} slots) = {measured['efficiency']:.1%}")
    print(f"whole trial ÷ its training steps: {measured['total_seconds'] / measured['seconds']['train_steps']:.1f}× "
          f"(Σ {measured['total_seconds']:.1f} s ÷ Σ {measured['seconds']['train_steps']:.1f} s)")
    held = measured["total_seconds"] / (measured["wall_seconds"] * measured["slots"])
    print(f"trials' time ÷ (wall × slots): {held:.1%}  (the rest: slots idle or between trials, "
          "the sweep driver's start and end)")
    if from_records["efficiency"] is not None:
        print(f"the report's estimate from the records alone: {from_records['efficiency']:.1%} "
              f"(span {from_records['wall_seconds']:.1f} s × {from_records['slots']} trials at once at most)")
    return measured["efficiency"]


VARIANTS = {"share": ((False, "torch_trainer"), (True, "torch_trainer")),  # (share_inputs, trial_runner)
            "runner": ((True, "torch_trainer"), (True, "tune"))}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--image-tower", choices=("full", "frozen"), help="default: the demo's")
    parser.add_argument("--cpus-per-worker", type=float,
                        help="default: the demo's (1); 0.25 packs 8 trials on 2 CPUs (with --compare runner: "
                        "the trials in Tune only)")
    parser.add_argument("--compare", choices=tuple(VARIANTS), default="share",
                        help="share: each trial's own inputs vs the sweep's shared ones, TorchTrainer trials; "
                             "runner: TorchTrainer trials vs trials that train in Tune (frozen tower, shared inputs)")
    args = parser.parse_args()
    if args.compare == "runner":
        args.image_tower = "frozen"
    logging.getLogger().setLevel(logging.ERROR)
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, logging_level="ERROR")
    try:
        walls, effs = [], []
        for share, runner in VARIANTS[args.compare]:
            measured, from_records, cfg = run(share, runner, args)
            effs.append(report(measured, from_records, cfg, args.trials, args.steps))
            walls.append(measured["wall_seconds"])
    finally:
        ray.shutdown()
    before, after = ("per trial", "shared") if args.compare == "share" else ("TorchTrainer", "in Tune")
    print(f"\nsweep wall, {after} ÷ {before}: {walls[1] / walls[0]:.2f}")
    if None not in effs:
        print(f"sweep efficiency: {effs[0]:.1%} {before} → {effs[1]:.1%} {after}")


if __name__ == "__main__":
    main()
