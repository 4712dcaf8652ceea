"""Training throughput, measured side by side in one run (ratios, not absolute times).

1. A step of the training loop (LR schedule, policy forward on preference +
   regularisation images, loss, backward, AdamW, BMA update) relative to the
   floor: the policy image tower's forward + backward alone on the same batch.
   Target ≥ 0.8.
2. A 1-worker TorchTrainer's steps/s relative to the same loop in a plain process,
   alternated a few times with the Ray cluster up for both (median of each). Target ≥ 0.95.
3. A spectral-only trial's wall time relative to a full fine-tuning trial of the
   same number of steps.

    .venv/bin/python benchmarks/train_bench.py [--steps 60] [--rounds 3]
"""
import argparse
import logging
import time

import torch

from po_cluster.config import ReportingConfig, ScalingConfig, TrainJobConfig, parse_config
from po_cluster.data.selection import build_records
from po_cluster.train.callbacks import Callback
from po_cluster.train.loop import batch_indices, build_model, fit, prepare_data


def run_config(tower: str, steps: int):
    return parse_config({"data": {"n_pairs": 1024, "n_reg": 512, "n_val": 100}, "model": {"image_tower": tower},
                         "training": {"steps": steps, "batch_size": 64, "reg_batch_size": 64}})


class FloorTimer(Callback):
    """Times each PO step of `fit`, then the floor on the same batch, interleaved so machine noise
    hits both alike."""

    def __init__(self, model, data, cfg) -> None:
        self.model, self.data, self.t = model, data, cfg.training
        self.po_time = self.floor_time = self._start = 0.0

    def on_step_begin(self, step: int) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.po_time += time.perf_counter() - self._start
        pref, reg = batch_indices(self.t.seed, step, len(self.data.pref), len(self.data.reg), self.t.batch_size,
                                  self.t.reg_batch_size)
        pixels = torch.cat([self.model.pixels(self.data.pref.images[pref]),
                            self.model.pixels(self.data.reg.images[reg])])
        start = time.perf_counter()
        self.model.encode_image(pixels).sum().backward()
        self.floor_time += time.perf_counter() - start
        self.model.zero_grad(set_to_none=True)  # the next step's gradients start clean


class StepTimer(Callback):
    """Seconds inside the steps, from each step's begin to its end: what a Ray Train worker's
    `steps_per_second` counts (po_cluster/train/phases.py), so the two rates compare alike."""

    def __init__(self) -> None:
        self.seconds = self._start = 0.0

    def on_step_begin(self, step: int) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.seconds += time.perf_counter() - self._start


def po_vs_floor(steps: int) -> tuple[float, float]:
    cfg = run_config("full", steps)
    model = build_model(cfg, torch.device("cpu"))
    data = prepare_data(model, *build_records(cfg.data))
    timer = FloorTimer(model, data, cfg)
    fit(model, data, cfg, [timer])
    return timer.floor_time / timer.po_time, timer.po_time / steps


def trainer_vs_plain(steps: int, rounds: int) -> tuple[float, list[float], list[float]]:
    """Steps/s of the same loop in this process and in a 1-worker TorchTrainer, alternated `rounds`
    times with the Ray cluster up for both, so the cluster's own background work and the machine's
    noise fall on both alike; the ratio of the medians."""
    import statistics

    import ray

    from po_cluster.sweep.trial import fit_trial

    cfg = run_config("full", steps)
    model = build_model(cfg, torch.device("cpu"))
    data = prepare_data(model, *build_records(cfg.data))
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, logging_level="ERROR")
    cpus = torch.get_num_threads()  # give the worker the threads the plain loop had
    plain, trainer = [], []
    for i in range(rounds):
        timer = StepTimer()
        fit(build_model(cfg, torch.device("cpu")), data, cfg, [timer])
        plain.append(steps / timer.seconds)
        job = TrainJobConfig(run=cfg, reporting=ReportingConfig(report_every=steps, checkpoint_every=steps))
        result = fit_trial(job,
                           ScalingConfig(num_workers=1, cpus_per_worker=cpus), "/tmp/po-bench",
                           f"b{time.time():.0f}-{i}", 0)
        trainer.append(result.metrics["steps_per_second"])
    ray.shutdown()
    print(f"  (torch threads: plain {torch.get_num_threads()}, Ray worker {result.metrics.get('torch_threads')})")
    return statistics.median(trainer) / statistics.median(plain), plain, trainer


def spectral_vs_full(steps: int) -> dict[str, dict[str, float]]:
    """Whole trial (model, records, cached embeddings, steps) and the steps alone, per mode."""
    times = {}
    for tower in ("frozen", "full"):
        cfg = run_config(tower, steps)
        start = time.perf_counter()
        model = build_model(cfg, torch.device("cpu"))
        data = prepare_data(model, *build_records(cfg.data))
        loop = time.perf_counter()
        fit(model, data, cfg)
        end = time.perf_counter()
        times[tower] = {"trial": end - start, "steps": end - loop}
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3, help="alternated plain / TorchTrainer runs")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    ratio, per_step = po_vs_floor(args.steps)
    print(f"PO step throughput / floor (image tower fwd+bwd alone): {ratio:.2f}  "
          f"(target ≥ 0.8; PO step {per_step*1e3:.0f} ms)")
    ratio, plain, trainer = trainer_vs_plain(args.steps, args.rounds)
    print(f"1-worker TorchTrainer / plain process steps/s, median of {args.rounds} alternated runs: {ratio:.2f}  "
          f"(target ≥ 0.95; TorchTrainer {', '.join(f'{v:.2f}' for v in trainer)}; "
          f"plain {', '.join(f'{v:.2f}' for v in plain)} steps/s)")
    t = spectral_vs_full(args.steps)
    frozen, full = t["frozen"], t["full"]
    print(f"spectral-only / full fine-tuning, {args.steps} steps each: "
          f"whole trial {frozen['trial'] / full['trial']:.3f} ({frozen['trial']:.1f} s vs {full['trial']:.1f} s), "
          f"training steps alone {frozen['steps'] / full['steps']:.3f} "
          f"({frozen['steps']:.2f} s vs {full['steps']:.1f} s)")


if __name__ == "__main__":
    main()
