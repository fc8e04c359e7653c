import pytest

from gnt_shiftadd.config import ConfigError, load_config, parse_override

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.netwidth % cfg.model.num_heads == 0, path


def test_overrides_are_typed():
    cfg = load_config(None, ["train.steps=12", "train.lr_cnn=2e-3", "model.resnet_layers=[1,2,3]", "name=x"])
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr_cnn == pytest.approx(2e-3)
    assert cfg.model.resnet_layers == [1, 2, 3]
    assert cfg.name == "x"


@pytest.mark.parametrize("text, expected", [("False", False), ("false", False), ("0", False), ("no", False),
                                            ("True", True), ("yes", True), ("1", True)])
def test_booleans_parse_strictly(text, expected):
    """GNT's argparse flags took the string "False" as true; ours do not."""
    assert load_config(None, [f"eval.lpips={text}"]).eval.lpips is expected


def test_unknown_key_names_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown key 'stepz'.*valid keys:.*steps"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown key 'nonsense'"):
        load_config(None, ["nonsense.x=1"])


@pytest.mark.parametrize("override, message", [
    ("train.steps=ten", "train.steps"), ("eval.lpips=maybe", "boolean"), ("train.steps=1.5", "integer"),
    ("model.num_heads=3", "divisible"), ("render.autocast=fp8", "autocast"), ("steps", "key=value"),
    ("shiftadd.position_fusion=int", "shiftadd.position_fusion must be dense or shift"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_parse_override_nests():
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}


def test_the_position_fusion_part_enters_the_model_signature_only_when_on():
    """Checkpoints saved before shiftadd.position_fusion existed keep their signature."""
    from gnt_shiftadd.config import is_dense, model_signature

    plain, fused = load_config(None, []), load_config(None, ["shiftadd.position_fusion=shift"])
    assert "shiftadd.position_fusion" not in model_signature(plain) and is_dense(plain)
    assert model_signature(fused)["shiftadd.position_fusion"] == "shift" and not is_dense(fused)
