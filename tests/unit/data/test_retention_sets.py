"""data.retention: a benchmark split once into a validation subset and the rest, scored as retain_<name>,
averaged into `retention` with the world's own tasks, and charged by the objective."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from po_cluster.config import ConfigError, DataConfig, ObjectiveConfig, parse_config
from po_cluster.data import world
from po_cluster.data.benchmarks import open_benchmark
from po_cluster.data.selection import held_out_sets
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.evaluate.objective import Objective
from po_cluster.evaluate.zero_shot import benchmark_accuracy

SHAPES = ("circle", "square", "star", "triangle")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("retention") / "shapes"
    clean = world.image_set("clean", 200, seed=11)
    for shape in SHAPES:
        rows = np.flatnonzero(clean.labels == world.SHAPES.index(shape))[:6]
        (root / shape).mkdir(parents=True)
        for i in rows:
            Image.fromarray(clean.images[i]).resize((72, 60)).save(root / shape / f"{i}.png")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\na photo of a {c}.\n")
    return str(root)


def test_the_validation_subset_and_the_rest_are_disjoint_and_seeded(benchmark):
    cfg = DataConfig(n_val=50, retention=[{"benchmark": benchmark, "val": 5, "test": None}])
    val, test = held_out_sets(cfg, "val")["retain_shapes"], held_out_sets(cfg, "test")["retain_shapes"]
    assert (len(val), len(test)) == (5, 19) and val.templates == ("a {c}.", "a photo of a {c}.")
    seen = {img.tobytes() for img in val.images}
    assert not seen & {img.tobytes() for img in test.images}
    assert seen == {img.tobytes() for img in held_out_sets(cfg, "val")["retain_shapes"].images}
    other_seed = cfg.model_copy(update={"seed": 1})
    assert seen != {img.tobytes() for img in held_out_sets(other_seed, "val")["retain_shapes"].images}
    assert set(held_out_sets(cfg, "test")) >= {"clean", "attacked", "retain_colour", "retain_size", "retain_shapes"}


def test_retention_is_the_mean_of_the_kept_tasks_and_the_objective_charges_it(benchmark, base_model):
    cfg = DataConfig(n_val=50, retention=[{"benchmark": f"kept={benchmark}", "val": 8, "test": None}])
    sets = held_out_sets(cfg, "test", base_model.preprocess.geometry)
    metrics = Evaluator.build(base_model, sets).metrics(0.0)
    rest = open_benchmark(f"kept={benchmark}")
    assert metrics["retain_kept"] > 0.5  # the shipped base knows these shapes
    assert metrics["retention"] == pytest.approx(np.mean([metrics["retain_colour"], metrics["retain_size"],
                                                          metrics["retain_kept"]]))
    assert benchmark_accuracy(base_model, rest, 0.0) == pytest.approx(
        (metrics["retain_kept"] * 16 + Evaluator.build(base_model, held_out_sets(cfg, "val"))
         .metrics(0.0)["retain_kept"] * 8) / 24)  # the two parts make the whole benchmark
    objective = Objective.of(ObjectiveConfig(), cfg)
    forgot = metrics | {"retention": metrics["retention"] - 0.2}
    assert objective.score(forgot, metrics) == pytest.approx(objective.score(metrics, metrics) - 5.0 * (0.2 - 0.02))


def test_a_retention_entry_is_validated():
    with pytest.raises(ConfigError, match="retention.0.val"):
        parse_config({"data": {"retention": [{"benchmark": "x", "val": 0}]}})
