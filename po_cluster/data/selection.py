"""Which records a run trains on, and which it is chosen and scored on: the world's, or a built
dataset's split. Training, the sweep's shared inputs and `average` read them from here, so a
trial and the release it becomes are measured on the same sets."""
from __future__ import annotations

from functools import cache
from typing import Literal

from po_cluster.config import DataConfig
from po_cluster.data import world
from po_cluster.data.images import Geometry
from po_cluster.data.records import ImageSet, PreferenceSet, subset_sets


def build_records(cfg: DataConfig, geometry: Geometry | None = None) -> tuple[PreferenceSet, ImageSet]:
    """Preference records and regularisation images: the train split of `cfg.dataset` when set (val and
    test are held out for choosing and scoring), else the typo-shapes world's. A dataset's images are
    fitted by `geometry`, the model's (data.pairs.dataset_geometry); the world's renders are fitted by
    the model itself, as any source image."""
    if cfg.dataset is not None:
        from po_cluster.data.pairs import load_preference_data

        return load_preference_data(cfg.dataset, geometry, n_pairs=cfg.n_pairs, n_reg=cfg.n_reg, seed=cfg.seed,
                                    split="train")
    records = world.bias_preference_set if cfg.task == "bias" else world.preference_set
    own_word = cfg.own_word if cfg.task == "typographic" else 0.0
    return records(cfg.n_pairs, cfg.seed), world.regularisation_set(cfg.n_reg, cfg.seed + 1, own_word)


def prompt_template(cfg: DataConfig) -> str:
    """The world's records hold class names (or, for the bias task, patterns); a dataset's hold whole
    prompts, used as they are."""
    from po_cluster.data.pairs import TEXT_TEMPLATE

    if cfg.dataset is not None:
        return TEXT_TEMPLATE
    return world.ATTRIBUTE_TEMPLATE if cfg.task == "bias" else world.PROMPT_TEMPLATE


@cache
def _fixed_sets() -> dict[str, ImageSet]:
    sets = world.evaluation_sets()
    for image_set in sets.values():
        for array in (image_set.images, image_set.labels, image_set.written):
            array.setflags(write=False)
    return sets


def evaluation_sets() -> dict[str, ImageSet]:
    """The world's fixed evaluation sets, rendered once per process: they are the same on every call
    (seeded, identical on every machine), and rendering them costs more than evaluating a small model
    on them, which a process such as `average` or `compare` does many times. Their arrays are
    read-only, so that no caller can change what the next one reads; the dict is a new one per call."""
    return dict(_fixed_sets())


def held_out_sets(cfg: DataConfig, split: Literal["val", "test"],
                  geometry: Geometry | None = None) -> dict[str, ImageSet]:
    """What a run is chosen on (val) and scored on (test), never what it trained on: the world's own
    validation and fixed evaluation sets, or the dataset's val / test split (val capped at n_val
    images per set, a seeded subset, so validation stays proportional to the budget); and each
    retention benchmark's validation subset or the rest of it, as retain_<name>."""
    if cfg.dataset is None:
        sets = world.validation_sets(cfg.n_val) if split == "val" else evaluation_sets()
    else:
        from po_cluster.data.pairs import dataset_eval_sets

        sets = dataset_eval_sets(cfg.dataset, split, geometry)
        sets = subset_sets(sets, cfg.n_val, cfg.seed) if split == "val" else sets
    return sets | retention_sets(cfg, split, geometry)


def retention_sets(cfg: DataConfig, split: Literal["val", "test"],
                   geometry: Geometry | None = None) -> dict[str, ImageSet]:
    """Each `cfg.retention` benchmark's part for `split`, its images fitted by `geometry` (the model's;
    None: clip_benchmark's ViT default of 224 px), as retain_<name>."""
    if not cfg.retention:
        return {}
    from po_cluster.data.benchmarks import as_image_set, keys_and_labels, open_benchmark, split_keys

    out: dict[str, ImageSet] = {}
    for entry in cfg.retention:
        bench = open_benchmark(entry.benchmark)
        keys = [key for key, _ in keys_and_labels(bench)]
        val, test = split_keys(keys, entry.val, entry.test, cfg.seed)
        name = f"retain_{bench.name}"
        if name in out:
            raise ValueError(f"data.retention names {bench.name!r} twice; give one a NAME= of its own")
        out[name] = as_image_set(bench, geometry or Geometry(224), val if split == "val" else test)
    return out
