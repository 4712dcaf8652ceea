"""How much a release still reads along t, past where word-only accuracy stops saying so.

    .venv/bin/python benchmarks/reading_floor.py RELEASE_FOLDER [--n 4000] [--seeds 111 222]
        [--ts 0 0.25 0.5 0.625 0.75 0.875 1]

Word-only images carry a written class name and no shape, and word-only accuracy is how often the
model answers that name. Once the model no longer reads, it answers such an image with whichever
class it defaults to when it sees no shape, and the accuracy sits near chance (1/K) wherever that
default lies: its ups and downs there are not reading. Per t, on word-only sets of --n images
drawn with each seed (the fixed evaluation set has 1,000), this prints:
  - the accuracy on each set;
  - the mean rank of the written name among the K candidates (0: always read; (K - 1) / 2: chance),
    which keeps moving where the accuracy is at its floor;
  - the share of the set given the model's most common answer (its "no shape" default).
No assertion; a measurement for the t curve (docs/design.md, "The knob t").
"""
from __future__ import annotations

import argparse

import numpy as np
import torch


def reading(model, text: torch.Tensor, images: np.ndarray, written: np.ndarray, t: float) -> dict[str, float]:
    from po_cluster.evaluate.metrics import embed_images

    with torch.no_grad():
        logps = model.logprobs(embed_images(model, images, t=t), text, t)
    word = torch.as_tensor(written)
    word_logp = logps.gather(1, word[:, None])
    answers = logps.argmax(-1).numpy()
    return {"accuracy": float(np.mean(answers == written)),
            "word_rank": float((logps > word_logp).sum(1).float().mean()),
            "default_share": float(np.bincount(answers, minlength=logps.shape[1]).max() / len(answers))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("release", help="a checkpoint or release folder (its manifest is verified)")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--seeds", type=int, nargs="+", default=[111, 222])
    p.add_argument("--ts", type=float, nargs="+", default=[0, 0.25, 0.5, 0.625, 0.75, 0.875, 1])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from po_cluster.data import world
    from po_cluster.evaluate.metrics import embed_prompts
    from po_cluster.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(a.release)
    text = embed_prompts(model, world.prompts(world.SHAPES, world.PROMPT_TEMPLATE))
    sets = [world.image_set("word_only", a.n, seed) for seed in a.seeds]
    k = len(world.SHAPES)
    print(f"word-only sets of {a.n} images, seeds {a.seeds}; chance: accuracy {1 / k:.4f}, rank {(k - 1) / 2:.1f}")
    print("| t | " + " | ".join(f"accuracy (seed {s})" for s in a.seeds) + " | word rank | default share |")
    print("|---|" + "---|" * (len(a.seeds) + 2))
    for t in a.ts:
        rows = [reading(model, text, s.images, s.labels, t) for s in sets]
        accuracy = " | ".join(f"{row['accuracy']:.4f}" for row in rows)
        rank = np.mean([row["word_rank"] for row in rows])
        share = np.mean([row["default_share"] for row in rows])
        print(f"| {t:g} | {accuracy} | {rank:.2f} | {share:.2f} |", flush=True)


if __name__ == "__main__":
    main()
