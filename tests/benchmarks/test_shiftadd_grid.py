"""benchmarks/shiftadd_grid.py's command line: overrides written after --only reach the config, unknown variant
names stop with one message."""
import pytest

from conftest import load_benchmark


def test_overrides_after_only_are_overrides_not_variant_names():
    grid = load_benchmark("shiftadd_grid")
    args = grid.parse_args(["--config", "configs/fern.yaml", "--teacher", "t.pt", "--steps", "2", "--out", "o.json",
                            "--only", "a_dense", "i_shift_all", "eval.stride=2", "train.val_every=0"])
    assert args.only == ["a_dense", "i_shift_all"]
    assert args.overrides == ["eval.stride=2", "train.val_every=0"]


def test_unknown_variant_name_is_one_clear_error(capsys):
    grid = load_benchmark("shiftadd_grid")
    with pytest.raises(SystemExit) as stop:
        grid.parse_args(["--config", "configs/fern.yaml", "--teacher", "t.pt", "--steps", "2", "--out", "o.json",
                         "--only", "a_dense", "z_nothing"])
    assert stop.value.code == 2
    assert "no variant config named ['z_nothing']" in capsys.readouterr().err
