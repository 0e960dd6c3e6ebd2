"""The Python API for reading runs: `from analysis import Run`."""

import pytest
import torch

from train.errors import RunError


def test_run_api_reads_checkpoints_metrics_and_models(quickstart_run):
    from analysis import Run

    run = Run(quickstart_run)
    assert run.steps == [e["step"] for e in run.checkpoints]
    assert [e["step"] for e in run.checkpoints if not e.get("dense")] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 500,
                                                                          512, 1000]
    heads = run.metrics("heads")
    assert {"step", "layer", "head", "previous_token", "prefix_matching"} <= set(heads.columns)
    assert heads.step.max() == 1000 and len(heads[heads.step == 1000]) == 2 * 4
    assert run.metrics("eval").step.tolist()[0] == 0
    tokens = run.probe_tokens[:2]
    seen = []
    for step, model in run.models(steps=[0, 1000]):  # loaded one at a time
        seen.append(step)
        torch.testing.assert_close(model(tokens), run.model(step)(tokens), rtol=0, atol=0)
    assert seen == [0, 1000]
    with pytest.raises(RunError, match=r"checkpoints/index.json: no checkpoint at step 3 \(have 0, 1, 2, 4"):
        run.model(3)


def test_run_tl_model_computes_our_logits(quickstart_run):
    pytest.importorskip("transformer_lens")
    from analysis import Run

    run = Run(quickstart_run)
    tokens = run.probe_tokens[:2]
    with torch.no_grad():
        torch.testing.assert_close(run.tl_model(1000)(tokens), run.model(1000)(tokens), rtol=1e-4, atol=1e-4)
