"""benchmarks/leaf_ablation.py: which leaves a setting keeps on PyTorch, and clear errors."""
import pytest

from conftest import load_benchmark


def test_settings_pair_every_leaf_type_alone_and_together():
    bench = load_benchmark("leaf_ablation")
    without = bench.leaf_types(["PositionFusion", "PreNormViewAttention"])
    settings = bench.settings(without)
    assert list(settings) == ["all kernels", "without PositionFusion", "without PreNormViewAttention",
                              "without PositionFusion + PreNormViewAttention"]
    assert settings["all kernels"] == () and len(settings["without PositionFusion + PreNormViewAttention"]) == 2
    assert list(bench.settings(bench.leaf_types(["PositionFusion"]))) == ["all kernels", "without PositionFusion"]


def test_unknown_leaf_types_and_missing_checkpoints_are_named(tmp_path):
    bench = load_benchmark("leaf_ablation")
    with pytest.raises(ValueError, match=r"no kernel leaf for \['Nonsense'\].*PositionFusion"):
        bench.leaf_types(["Nonsense"])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        bench.main(["--runs-dir", str(tmp_path), "--variants", "a_dense", "--without", "PositionFusion",
                    "--out", str(tmp_path / "out.json")])
