"""The image tower modes side by side: one training run each from the shipped base, same data,
loss, steps and seed, scored on the fixed evaluation sets at t = 1 (and t = 0, which must be the base).

    .venv/bin/python benchmarks/tower_modes.py [--steps 150] [--modes full lora last_blocks:2]

Prints one Markdown table: clean, attacked, word-only, own-word, KL(ref‖π), the release's size in bytes
(what `save_checkpoint` writes: weights, θ_ref where kept, JSON) and the run's time. The learning
rate is per mode (--lr-lora): adapters start at B = 0 and take larger steps than whole weights.
Bounded by --steps; single process, no Ray.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def tower(label: str):
    from po_cluster.config import LastBlocksConfig, LoraConfig, LoraTowerConfig

    if label.startswith("last_blocks:"):
        return LastBlocksConfig(last_blocks=int(label.split(":")[1])).model_dump()
    if label == "lora":
        return LoraTowerConfig(lora=LoraConfig()).model_dump()
    return label


def run(label: str, a: argparse.Namespace, out: Path) -> dict:
    from po_cluster.config import RunConfig
    from po_cluster.data import world
    from po_cluster.evaluate.metrics import Evaluator
    from po_cluster.model.checkpoint import load_checkpoint
    from po_cluster.train.run import train
    from po_cluster.train.session import LocalSession

    cfg = RunConfig.model_validate({
        "name": label.replace(":", "-"), "output_dir": str(out), "model": {"image_tower": tower(label)},
        "data": {"n_pairs": a.n_pairs, "n_reg": a.n_pairs // 2, "n_val": 300, "seed": 0},
        "loss": {"loss_type": "dpo", "beta": a.beta, "kl_weight": a.kl_weight},
        "optimizer": {"lr": a.lr_lora if label == "lora" else a.lr, "spectral_lr": 5e-3, "warmup_steps": 10},
        "training": {"steps": a.steps, "batch_size": 64, "reg_batch_size": 64, "bma": True, "seed": 0}})
    start = time.perf_counter()
    result = train(cfg, LocalSession.for_run(cfg, world.validation_sets(300)))
    seconds = time.perf_counter() - start
    model, _ = load_checkpoint(result.checkpoint)
    evaluator = Evaluator.build(model, world.evaluation_sets())
    at1, at0 = evaluator.metrics(1.0), evaluator.metrics(0.0)
    size = sum(f.stat().st_size for f in result.checkpoint.iterdir() if f.is_file())
    return {"mode": label, **at1, "t0_attacked": at0["attacked"], "t0_word_only": at0["word_only"],
            "bytes": size, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=["full", "lora", "last_blocks:2"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--n-pairs", type=int, default=4096)
    p.add_argument("--beta", type=float, default=0.14)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr-lora", type=float, default=5e-3)
    a = p.parse_args()
    from po_cluster.evaluate.metrics import format_table

    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(label, a, Path(tmp)) for label in a.modes]
    columns = ("mode", "clean", "attacked", "word_only", "own_word", "attack_success", "kl", "t0_attacked",
               "t0_word_only", "bytes", "seconds")
    print(f"{a.steps} steps of DPO (β {a.beta}, λ {a.kl_weight}), lr {a.lr} (lora {a.lr_lora}), "
          f"{a.n_pairs} pairs; fixed evaluation sets, t = 1 (t0_*: at t = 0)")
    print(format_table([{**r, "seconds": round(r["seconds"]), "bytes": int(r["bytes"])} for r in rows], columns))


if __name__ == "__main__":
    main()
