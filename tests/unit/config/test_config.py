import json
from pathlib import Path

import pytest

from po_cluster.config import (
    ConfigError,
    LastBlocksConfig,
    LoraConfig,
    LoraTowerConfig,
    RunConfig,
    image_tower_label,
    json_schema,
    load_config,
    load_yaml,
    parse_config,
)
from po_cluster.model.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[3]


def test_demo_configs_load():
    cfg = load_config("configs/demo.yaml")
    assert cfg.loss.loss_type == "anchor" and cfg.model.image_tower == "full"
    assert cfg.loss.anchor_space == "embedding"  # the anchor on the tower's embeddings (docs/design.md)
    spectral = load_config("configs/demo-spectral.yaml")
    assert spectral.model.image_tower == "frozen"


def test_last_blocks_mode_parses():
    cfg = parse_config({"model": {"image_tower": {"last_blocks": 2}}})
    assert cfg.model.image_tower == LastBlocksConfig(last_blocks=2)


def test_lora_mode_parses_and_every_mode_has_one_label():
    cfg = parse_config({"model": {"image_tower": {"lora": {"rank": 4, "targets": ["layer4.*.conv2"]}}}})
    assert cfg.model.image_tower == LoraTowerConfig(lora=LoraConfig(rank=4, alpha=16.0, targets=("layer4.*.conv2",)))
    labels = [image_tower_label(m) for m in ("full", "frozen", LastBlocksConfig(last_blocks=2),
                                             LoraTowerConfig(lora=LoraConfig()), cfg.model.image_tower)]
    assert labels == ["full", "frozen", "last_blocks:2", "lora:r8a16", "lora:r4a16tlayer4.*.conv2"]


def test_sweep_searches_image_tower_modes_by_label():
    from po_cluster.config import SweepConfig
    from po_cluster.sweep.space import distributions
    from po_cluster.sweep.trial import trial_run_config

    lora = {"lora": {"rank": 4}}
    cfg = SweepConfig.model_validate({"space": {"loss_type": ["dpo"], "beta": {"low": 0.1, "high": 1},
                                                "kl_weight": {"low": 0.1, "high": 1},
                                                "image_tower": ["full", lora, {"last_blocks": 1}]}})
    assert distributions(cfg)["image_tower"].choices == ("full", "lora:r4a16", "last_blocks:1")
    sample = {"loss_type": "dpo", "beta": 0.5, "kl_weight": 0.5, "image_tower": "lora:r4a16"}
    assert trial_run_config(cfg, sample, "t1").model.image_tower == LoraTowerConfig(lora=LoraConfig(rank=4))
    twice = cfg.model_copy(update={"space": cfg.space.model_copy(update={"image_tower": [
        LoraTowerConfig(lora=LoraConfig(rank=4)), LoraTowerConfig(lora=LoraConfig(rank=4))]})})
    with pytest.raises(ConfigError, match="share a name"):
        distributions(twice)


@pytest.mark.parametrize("data, field, reason", [
    ({"loss": {"beta": 0}}, "loss.beta", "greater than 0"),
    ({"loss": {"loss_type": "ppo"}}, "loss.loss_type", "'dpo'"),
    ({"loss": {"kl_weight": -1}}, "loss.kl_weight", "greater than or equal to 0"),
    ({"training": {"steps": "many"}}, "training.steps", "valid integer"),
    ({"model": {"image_tower": "half"}}, "model.image_tower", "full"),
    ({"model": {"image_tower": {"last_blocks": 0}}}, "last_blocks", "greater than 0"),
    ({"model": {"image_tower": {"lora": {"rank": 0}}}}, "lora.rank", "greater than 0"),
    ({"model": {"image_tower": {"lora": {"targets": []}}}}, "lora.targets", "at least 1"),
    ({"optimiser": {"lr": 1}}, "optimiser", "Extra inputs are not permitted"),
    ({"training": {"batch_size": 10}, "data": {"n_pairs": 5}}, "(top level)", "batch_size"),
])
def test_bad_values_are_refused_with_field_and_reason(data, field, reason):
    with pytest.raises(ConfigError) as error:
        parse_config(data, "test.yaml")
    message = str(error.value)
    assert "test.yaml" in message and field in message and reason in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == RunConfig()


def test_json_schema_lists_sections():
    schema = json_schema()
    assert {"model", "data", "loss", "optimizer", "training"} <= set(schema["properties"])


def test_load_yaml_returns_the_mapping_or_names_the_problem(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("a: 1\nb: {c: two}\n")
    assert load_yaml(good) == {"a": 1, "b": {"c": "two"}}
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    assert load_yaml(empty) == {}
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.yaml"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not found"):  # a folder is not a config file
        load_yaml(tmp_path)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(ConfigError, match=r"scalar\.yaml: expected a mapping at the top level, got str"):
        load_yaml(scalar)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="binary.yaml"):
        load_yaml(binary)


@pytest.mark.parametrize("key", ["eval_every", "checkpoint_every"])
def test_training_section_refuses_settings_that_do_nothing(key):
    with pytest.raises(ConfigError, match=f"training.{key}"):
        parse_config({"training": {key: 10}})


def test_pretrain_config_holds_the_shipped_recipe_and_refuses_bad_values():
    card = json.loads((ROOT / "po_cluster" / "assets" / "typo_shapes_base" / "card.json").read_text())
    assert PretrainConfig.model_validate(card["config"]).model_dump() == card["config"]
    assert PretrainConfig().model_dump() == {"name": "po-tiny-rn", "steps": 3600, "batch_size": 128, "lr": 2e-3,
                                             "weight_decay": 0.1, "warmup_steps": 100, "seed": 0}
    for bad, field in [({"steps": 0}, "steps"), ({"batch_size": 1}, "batch_size"), ({"lr": 0}, "lr"),
                       ({"seed": -1}, "seed"), ({"weight_decay": -0.1}, "weight_decay"), ({"step": 5}, "step")]:
        with pytest.raises(ConfigError, match=field):
            parse_config(bad, "pretrain", PretrainConfig)


def test_the_bias_configs_train_the_worlds_bias_task():
    from po_cluster.data import world
    from po_cluster.data.selection import build_records, prompt_template

    for name, tower in (("bias-full", "full"), ("bias-spectral", "frozen")):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.data.task == "bias" and cfg.model.image_tower == tower
    data = load_config(ROOT / "configs" / "bias-full.yaml").data.model_copy(update={"n_pairs": 8, "n_reg": 4})
    pref, reg = build_records(data)
    assert pref.classnames == ("plain", "striped") and len(pref) == 8 and len(reg) == 4
    assert prompt_template(data) == world.ATTRIBUTE_TEMPLATE == "a photo of a {} object."
    with pytest.raises(ConfigError, match="data.task 'bias' is one of the world's"):
        parse_config({"data": {"task": "bias", "dataset": "somewhere"}})


@pytest.mark.parametrize("changes, reason", [
    ({}, "needs image_tower frozen"),  # the base's tower is full
    ({"space": {"image_tower": ["frozen", "full"]}}, "needs image_tower frozen"),
    ({"scaling": {"num_workers": 2}}, "num_workers must be 1"),
    ({"base": {"model": {"image_tower": "frozen"}, "data": {"dataset": "d", "streaming": True}}},
     "data.streaming must be false"),
])
def test_trials_train_in_tune_only_where_one_process_can(changes, reason):
    from po_cluster.config import SweepConfig

    base = {"trial_runner": "tune", "base": {"model": {"image_tower": "frozen"}}}
    with pytest.raises(ConfigError, match=reason):
        parse_config({**base, **changes} if changes else {"trial_runner": "tune"}, "sweep.yaml", SweepConfig)
    assert SweepConfig.model_validate(base).trial_runner == "tune"
    shipped = load_config(ROOT / "configs" / "spectral-sweep.yaml", SweepConfig)
    assert shipped.trial_runner == "tune" and shipped.scaling.cpus_per_worker == 0.25
