"""Zero-shot accuracy on a benchmark equals clip_benchmark's own evaluation of the same model and set.

A small benchmark is generated from the world's shapes (four classes, other sizes than the models'
inputs) in both layouts users have: class sub-folders, and webdataset shards written by
clip_benchmark's own builder (convert_dataset). clip_benchmark then evaluates the open_clip model
(its zeroshot_classification.evaluate, on its own wds dataset builder or torchvision's ImageFolder),
and po-cluster evaluates the same weights: a randomly initialised ViT-B-32, and the shipped base
through `po-cluster evaluate --benchmark`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from po_cluster import cli
from po_cluster.config import ModelConfig
from po_cluster.data import world
from po_cluster.data.benchmarks import open_benchmark
from po_cluster.data.pairs import DataError
from po_cluster.evaluate.zero_shot import benchmark_accuracy
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.loading import SHIPPED_BASE_DIR, WEIGHTS_FILE, load_clip, register_configs

CLASSES = ("circle", "square", "triangle", "star")
TEMPLATES = ("a photo of a {c}.", "a drawing of a {c}.", "a {c} on a noisy background.")
PER_CLASS = 5


def _images() -> list[tuple[Image.Image, int]]:
    """World renders of the classes (with no word), resized to sizes other than any model's input."""
    out = []
    for label, shape in enumerate(CLASSES):
        images = world.image_set("clean", 64, seed=label).images
        index = world.SHAPES.index(shape)
        rows = [i for i, lab in enumerate(world.image_set("clean", 64, seed=label).labels) if lab == index]
        picked = [images[i] for i in rows[:PER_CLASS]] or [images[0]]
        for i, image in enumerate(picked):
            out.append((Image.fromarray(image).resize((80 + 7 * i, 64 + 3 * i), Image.Resampling.BICUBIC), label))
    return out


class _Source(torch.utils.data.Dataset):
    """(path, label) pairs for clip_benchmark's convert_dataset, with its classes and templates."""

    def __init__(self, items: list[tuple[str, int]]) -> None:
        self.items = items
        self.classes = list(CLASSES)
        self.templates = list(TEMPLATES)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.items[i]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict[str, Path]:
    """The same images as class folders and as clip_benchmark's webdataset shards."""
    from clip_benchmark.webdataset_builder import convert_dataset, path_to_bytes

    root = tmp_path_factory.mktemp("bench")
    folders, items = root / "shapes", []
    for i, (image, label) in enumerate(_images()):
        (folders / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        image.save(folders / CLASSES[label] / f"{i:03d}.png")
        items.append((str(folders / CLASSES[label] / f"{i:03d}.png"), label))
    (folders / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    convert_dataset(_Source(items), "test", str(root / "wds_shapes"), transform=path_to_bytes, max_count=8,
                    verbose=False)
    shards = len(list((root / "wds_shapes" / "test").glob("*.tar")))
    assert shards == -(-len(items) // 8) >= 2  # 8 images a shard: the reader crosses shards
    return {"folders": folders, "webdataset": root / "wds_shapes"}


def _clip_benchmark_accuracy(model, preprocess, tokenizer, layout: str, location: Path) -> float:
    """clip_benchmark's own zero-shot evaluation of an open_clip model."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification
    from torchvision.datasets import ImageFolder

    if layout == "webdataset":
        dataset = build_dataset("wds/shapes", root=str(location), transform=preprocess, split="test")
        classes, templates = dataset.classes, dataset.templates
    else:
        dataset = ImageFolder(str(location), transform=preprocess)
        classes, templates = [c.replace("_", " ") for c in dataset.classes], list(TEMPLATES)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    # Its evaluate() in two of its steps: its accuracy() converts a one-element array with float(), which
    # NumPy 2 refuses, so top-1 is read from its logits as its own `pred = logits.argmax(axis=1)` is.
    classifier = zeroshot_classification.zero_shot_classifier(model.eval(), tokenizer, classes, templates, "cpu",
                                                              amp=False)
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    return float((logits.argmax(axis=1) == target).float().mean())


@pytest.mark.parametrize("layout", ["folders", "webdataset"])
def test_a_random_vit_b_32_scores_as_clip_benchmark_scores_it(bench, layout):
    torch.manual_seed(7)
    reference, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    torch.manual_seed(7)
    ours = AlignedCLIP(load_clip(ModelConfig(name="ViT-B-32", pretrained=None)), "frozen")
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), ours.clip.state_dict().values(),
                                                 strict=True))  # the same random weights
    benchmark = open_benchmark(f"shapes={bench[layout]}")
    # class folders are numbered in sorted order, as ImageFolder numbers them; the shards keep their labels
    classes = tuple(sorted(CLASSES)) if layout == "folders" else CLASSES
    assert (benchmark.layout, benchmark.classnames, benchmark.templates) == (layout, classes, TEMPLATES)
    expected = _clip_benchmark_accuracy(reference, preprocess, open_clip.get_tokenizer("ViT-B-32"), layout,
                                        bench[layout])
    got = benchmark_accuracy(ours, benchmark, t=1.0)
    print(f"{layout}: po-cluster {got:.4f}, clip_benchmark {expected:.4f}")
    assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("layout", ["folders", "webdataset"])
def test_the_shipped_base_scores_as_clip_benchmark_scores_it(bench, layout, capsys):
    register_configs()
    reference, _, preprocess = open_clip.create_model_and_transforms(
        "po-tiny-rn", pretrained=str(SHIPPED_BASE_DIR / WEIGHTS_FILE))
    expected = _clip_benchmark_accuracy(reference, preprocess, open_clip.get_tokenizer("po-tiny-rn"), layout,
                                        bench[layout])
    assert cli.main(["evaluate", "--json", "--benchmark", f"shapes={bench[layout]}"]) == 0
    at_t = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(f"{layout}: po-cluster {at_t['retain_shapes']:.4f}, clip_benchmark {expected:.4f}")
    assert at_t["retain_shapes"] == pytest.approx(expected, abs=1e-9)
    assert expected > 0.5  # the shipped base knows these shapes: the comparison is not between two chance scores
    assert at_t["retention"] == pytest.approx(np.mean([v for k, v in at_t.items() if k.startswith("retain_")]))


def test_a_bad_benchmark_is_refused_by_name(tmp_path):
    with pytest.raises(DataError, match="no images in class folders"):
        open_benchmark(str(tmp_path))
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo\n")
    with pytest.raises(DataError, match=r"must each hold \{c\}"):
        open_benchmark(str(tmp_path))
