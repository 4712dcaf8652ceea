"""What MLflow tracking costs a sweep: the same small sweep, average and report run side by side
with tracking off and on (the embedded sqlite store, or --uri for a server).

    .venv/bin/python benchmarks/tracking_bench.py [--trials 2] [--steps 40] [--repeats 1] [--uri URI]

One untimed warm-up run first (the first sweep and average of a process pay for imports, Ray's
workers and the evaluation sets), then the repeats in the order off, on, on, off, ... (so neither
setting always goes first on a machine whose load drifts), all on one local Ray, each run in a
fresh folder with its own sweep name. Printed: the seconds of each stage (sweep, average, report)
per run, their means, and on/off ratios. The tracked stages include creating the embedded
database (a one-off of a few seconds) and every call made to MLflow.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

STAGES = ("sweep", "average", "report")


def sweep_config(root: Path, name: str, trials: int, steps: int, tracking: dict):
    from po_cluster.config import SweepConfig

    return SweepConfig.model_validate({
        "name": name, "storage_path": str(root / "sweeps"), "store": str(root / "store"), "num_samples": trials,
        "top_k": trials, "reporting": {"report_every": steps // 2, "checkpoint_every": steps // 2}, "seed": 3,
        "space": {"loss_type": ["dpo", "ipo", "kto"], "beta": {"low": 0.02, "high": 0.5},
                  "kl_weight": {"low": 0.05, "high": 0.5}},
        "scheduler": {"grace_period": 2}, "tracking": tracking,
        "base": {"model": {"image_tower": "frozen"}, "data": {"n_pairs": 512, "n_reg": 256, "n_val": 100},
                 "optimizer": {"lr": 5e-2, "spectral_lr": 5e-2},
                 "training": {"steps": steps, "batch_size": 64, "reg_batch_size": 64}},
    })


def timed_stages(cfg) -> dict[str, float]:
    from po_cluster.pipelines import run_average, run_report, run_sweep

    seconds = {}
    for stage, call in (("sweep", lambda: run_sweep(cfg)), ("average", lambda: run_average(cfg, cfg.store)),
                        ("report", lambda: run_report(cfg))):
        start = time.perf_counter()
        call()
        seconds[stage] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--uri", default=None, help="tracking server (default: the embedded sqlite store)")
    args = parser.parse_args()
    import ray

    logging.getLogger().setLevel(logging.ERROR)
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, logging_level=logging.WARNING)
    settings = {"off": {"enabled": False}, "on": {"uri": args.uri} if args.uri else {}}
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="po-tracking-bench-") as tmp:
        timed_stages(sweep_config(Path(tmp) / "warm-up", "bench-warm-up", args.trials, args.steps,
                                  settings["off"]))
        for repeat in range(args.repeats):
            for label in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
                tracking = settings[label]
                root = Path(tmp) / f"{label}-{repeat}"
                runs[label].append(timed_stages(sweep_config(root, f"bench-{label}-{repeat}", args.trials,
                                                             args.steps, tracking)))
                print(f"repeat {repeat} tracking {label:3}: " +
                      "  ".join(f"{s} {runs[label][-1][s]:6.1f} s" for s in STAGES), flush=True)
    ray.shutdown()
    mean = {label: {s: statistics.mean(r[s] for r in rows) for s in STAGES} for label, rows in runs.items()}
    where = args.uri or "embedded sqlite"
    print(f"\n{args.trials}-trial sweep of {args.steps} steps, tracking on ({where}) / off, means of {args.repeats}:")
    for stage in (*STAGES, "total"):
        off = sum(mean["off"].values()) if stage == "total" else mean["off"][stage]
        on = sum(mean["on"].values()) if stage == "total" else mean["on"][stage]
        print(f"  {stage:8} off {off:6.1f} s   on {on:6.1f} s   on/off {on / off:5.2f}   (+{on - off:5.1f} s)")


if __name__ == "__main__":
    main()
