"""The worked examples run as users run them, on a finished run."""

import importlib.util

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transformer_lens_across_checkpoints(quickstart_run, tmp_path, capsys):
    """8+ checkpoints in TransformerLens 4.x: detect_head agrees with our previous-token scores and, rescaled
    by the share of queries with an earlier occurrence, with our prefix matching, within 0.02."""
    pytest.importorskip("transformer_lens")
    from analysis.transformerlens import installed_major

    if installed_major() < 4:
        pytest.skip("the example uses TransformerLens 4.x's bridge")
    example = load_example("tl_checkpoints")
    assert example.main([str(quickstart_run), "--out", str(tmp_path)]) == 0, capsys.readouterr().out
    rows = pq.read_table(tmp_path / "tl_checkpoints.parquet").to_pandas()
    assert rows.step.nunique() >= 8 and (tmp_path / "tl_checkpoints.png").exists()
    assert (rows.previous_token - rows.tl_previous_token).abs().max() <= 0.02
    assert (rows.prefix_matching - rows.tl_induction_rescaled).abs().max() <= 0.02
    # where the definitions differ: TransformerLens' raw induction score divides by every query
    last = rows[rows.step == rows.step.max()]
    best = last.loc[last.prefix_matching.idxmax()]
    assert best.prefix_matching >= 0.5 and best.tl_induction < best.prefix_matching - 0.1
