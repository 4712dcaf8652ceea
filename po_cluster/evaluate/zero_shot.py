"""Zero-shot accuracy on a standard benchmark (data/benchmarks.py), streamed: images are read, fitted
and embedded a batch at a time, so a benchmark of any size costs one batch of pixels in memory."""
from __future__ import annotations

import numpy as np
import torch

from po_cluster.data.benchmarks import Benchmark, batches
from po_cluster.evaluate.metrics import embed_prompts, zero_shot_logits
from po_cluster.model.aligned import AlignedCLIP


@torch.no_grad()
def benchmark_accuracy(model: AlignedCLIP, bench: Benchmark, t: float = 1.0, batch_size: int = 64) -> float:
    """Top-1 zero-shot accuracy of the aligned model at t with clip_benchmark's protocol (metrics.zero_shot_logits)."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [template.format(c=name) for name in bench.classnames for template in bench.templates]
    text = embed_prompts(model, prompts).to(device)
    tower = model.tower_at(t)  # θ(t) once for the whole benchmark
    correct = total = 0
    for images, labels in batches(bench, model.preprocess.geometry, size=batch_size):
        emb = model.encode_image(model.pixels(images, device), t, tower)
        pred = zero_shot_logits(model, emb, text, len(bench.templates), t).argmax(-1).cpu().numpy()
        correct += int(np.sum(pred == labels))
        total += len(labels)
    return correct / total
