import pytest

from po_cluster.config import ConfigError, LastBlocks, RunConfig, json_schema, load_config, parse_config


def test_demo_configs_load():
    cfg = load_config("configs/demo.yaml")
    assert cfg.loss.loss_type == "dpo" and cfg.model.image_tower == "full"
    spectral = load_config("configs/demo-spectral.yaml")
    assert spectral.model.image_tower == "frozen"


def test_last_blocks_mode_parses():
    cfg = parse_config({"model": {"image_tower": {"last_blocks": 2}}})
    assert cfg.model.image_tower == LastBlocks(last_blocks=2)


@pytest.mark.parametrize("data, field, reason", [
    ({"loss": {"beta": 0}}, "loss.beta", "greater than 0"),
    ({"loss": {"loss_type": "ppo"}}, "loss.loss_type", "'dpo'"),
    ({"loss": {"kl_weight": -1}}, "loss.kl_weight", "greater than or equal to 0"),
    ({"training": {"steps": "many"}}, "training.steps", "valid integer"),
    ({"model": {"image_tower": "half"}}, "model.image_tower", "full"),
    ({"model": {"image_tower": {"last_blocks": 0}}}, "last_blocks", "greater than 0"),
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
