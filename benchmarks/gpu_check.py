"""GPU readiness: a PO training step of a real-size model at each precision, the input path that
feeds it, and a 2-worker DDP run when there are two GPUs; one table.

Run by benchmarks/gpu_check.sh on a CUDA machine (ViT-B-32 with random weights, so nothing is
downloaded). `--device cpu` runs the same code on a CPU, which is how the tests exercise it
(with the shipped model: ViT-B-32 on two CPU cores takes minutes per step):

    .venv/bin/python benchmarks/gpu_check.py --device cpu --model po-tiny-rn --steps 3 --n-pairs 64
"""
from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from po_cluster.config import RunConfig, parse_config
from po_cluster.data.images import Geometry
from po_cluster.data.records import ImageSet, PreferenceSet
from po_cluster.data.selection import build_records
from po_cluster.model.loading import SHIPPED_BASE
from po_cluster.train.callbacks import Callback
from po_cluster.train.loop import build_model, fit, prepare_data

CPU_PRECISIONS = ("fp32", "bf16")  # fp16 needs CUDA (training.precision refuses it elsewhere)
CUDA_PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Row:
    what: str
    images_per_s: float | None
    peak_memory_mb: float | None
    note: str = ""


def run_config(args: argparse.Namespace, precision: str) -> RunConfig:
    pretrained = SHIPPED_BASE if args.model == "po-tiny-rn" else None  # random weights: nothing downloaded
    return parse_config({
        "model": {"name": args.model, "pretrained": pretrained, "image_tower": "full"},
        "data": {"n_pairs": args.n_pairs, "n_reg": args.n_pairs // 2},
        "training": {"steps": args.steps + args.warmup, "batch_size": args.batch_size,
                     "reg_batch_size": args.batch_size // 2, "bma": False, "device": args.device,
                     "precision": precision}})


def at_model_size(pref: PreferenceSet, reg: ImageSet, geometry: Geometry) -> tuple[PreferenceSet, ImageSet]:
    """The records fitted to the model's input once, as a built dataset for that model would hold
    them, so the step measures the model rather than a per-batch host resize."""
    def squared(images: np.ndarray) -> np.ndarray:
        return np.stack([geometry.fit_pixels(image) for image in images])

    return replace(pref, images=squared(pref.images)), replace(reg, images=squared(reg.images))


class StepTimer(Callback):
    """Wall time of the steps after the warm-up ones (cuDNN autotuning, allocator growth)."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.seconds, self.steps, self._start = 0.0, 0, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, step: int) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self._sync()
        if step > self.warmup:
            self.seconds += time.perf_counter() - self._start
            self.steps += 1


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; on a CPU, the process's peak RSS (all of it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_row(args: argparse.Namespace, precision: str) -> Row:
    cfg = run_config(args, precision)
    device = torch.device(args.device)
    model = build_model(cfg, device)
    pref, reg = at_model_size(*build_records(cfg.data), model.preprocess.geometry)
    data = prepare_data(model, pref, reg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device, args.warmup)
    result = fit(model, data, cfg, [timer])
    per_step = cfg.training.batch_size + cfg.training.reg_batch_size
    loss = result.last_metrics["loss"]
    return Row(f"PO step {args.model} {precision}", per_step * timer.steps / timer.seconds,
               peak_memory_mb(device), f"loss {loss:.4f}" + ("" if np.isfinite(loss) else " NOT FINITE"))


def input_row(args: argparse.Namespace) -> Row:
    """The input path alone: uint8 records → pinned → device → normalised, batch by batch."""
    cfg = run_config(args, "fp32")
    device = torch.device(args.device)
    model = build_model(cfg, device)
    pref, _ = at_model_size(*build_records(cfg.data), model.preprocess.geometry)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(pref), args.batch_size) for _ in range(args.steps + args.warmup)]
    seconds = 0.0
    for i, idx in enumerate(batches):
        start = time.perf_counter()
        model.pixels(pref.images[idx], device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start if i >= args.warmup else 0.0
    return Row("input path (records → device)", args.batch_size * args.steps / seconds, None,
               "in-memory records; must outrun the step")


def ddp_row(args: argparse.Namespace, gpus: int) -> Row:
    """Two Ray Train workers, one GPU each, DDP over NCCL: the trial path of a sweep."""
    if args.device != "cuda" or gpus < 2:
        return Row("DDP 2 workers", None, None, f"skipped: needs 2 GPUs, this machine has {gpus}")
    import tempfile

    import ray

    from po_cluster.config import ReportingConfig, ScalingConfig, TrainJobConfig
    from po_cluster.sweep.trial import fit_trial

    cfg = run_config(args, "bf16")
    steps = cfg.training.steps
    ray.init(num_gpus=2, log_to_driver=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as storage:
            job = TrainJobConfig(run=cfg, reporting=ReportingConfig(report_every=steps, checkpoint_every=steps))
            result = fit_trial(job,
                               ScalingConfig(num_workers=2, use_gpu=True), storage, "gpu-check-ddp", 0)
    finally:
        ray.shutdown()
    per_step = cfg.training.batch_size + cfg.training.reg_batch_size
    return Row("DDP 2 workers bf16 (whole run)", result.metrics["steps_per_second"] * per_step, None,
               "includes start-up; global batch as above")


def print_table(rows: list[Row]) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return format("-" if value is None else format(value, spec), f">{spec.split('.')[0]}")

    width = max(len(row.what) for row in rows)
    print(f"{'':{width}}  {'images/s':>10}  {'peak MiB':>9}  note")
    for row in rows:
        print(f"{row.what:{width}}  {fmt(row.images_per_s, '10.1f')}  {fmt(row.peak_memory_mb, '9.0f')}  {row.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights), or "
                        "po-tiny-rn for the shipped base model")
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after --warmup ones")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128, help="preference images per step "
                        "(half as many regularisation images ride along)")
    parser.add_argument("--n-pairs", type=int, default=1024)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no CUDA device")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    name = torch.cuda.get_device_name(0) if gpus else "CPU"
    print(f"gpu_check: torch {torch.__version__}, {name}, {gpus} GPU(s), batch {args.batch_size}, "
          f"{args.steps} timed steps")
    precisions = CUDA_PRECISIONS if args.device == "cuda" else CPU_PRECISIONS
    rows = [step_row(args, precision) for precision in precisions]
    rows.append(input_row(args))
    rows.append(ddp_row(args, gpus))
    print_table(rows)
    if any("NOT FINITE" in row.note for row in rows):
        raise SystemExit("gpu_check: a loss was not finite")


if __name__ == "__main__":
    main()
