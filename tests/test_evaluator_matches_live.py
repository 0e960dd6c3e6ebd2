"""The post-hoc evaluation of a checkpoint (analysis.effects.Evaluator, what `python -m analysis ablate`
reports as the clean values) reproduces what the run measured live at that step: the same evaluation
set, the same weights, the same scores."""

import pyarrow.parquet as pq
import pytest
import torch

from analysis.effects import Evaluator
from analysis.runs import open_run


def test_checkpoint_evaluation_equals_the_live_metrics(quickstart_run):
    r = open_run(quickstart_run)
    ev = pq.read_table(quickstart_run / "metrics" / "eval.parquet").to_pydict()
    train = pq.read_table(quickstart_run / "metrics" / "train.parquet").to_pydict()
    live = {step: (loss, icl) for step, loss, icl in zip(ev["step"], ev["loss"], ev["icl_score"])}
    induction_loss = dict(zip(train["step"], train["induction_loss"]))
    steps = [entry["step"] for entry in r.checkpoints]
    assert len(steps) >= 10 and all(ev["step"].count(s) == 1 for s in steps)  # each evaluated once, live
    for entry in r.checkpoints:
        step = entry["step"]
        out = Evaluator(r, r.model(entry))()
        loss, icl = live[step]
        assert out["loss"] == pytest.approx(loss, rel=1e-5), step
        assert out["icl_score"] == pytest.approx(icl, rel=1e-5, abs=1e-6), step
        # Every per-token loss stored at the checkpoint, too, and the probe batch's induction loss.
        torch.testing.assert_close(out["token_losses"], r.stored_token_losses(step), rtol=1e-5, atol=1e-5)
        assert out["induction_loss"] == pytest.approx(induction_loss[step], rel=1e-5), step
    # The values compared change over the run: a checkpoint mixed up with another would fail above.
    first, last = live[steps[0]], live[steps[-1]]
    assert last[1] < first[1] - 1.0 and last[0] < first[0] - 1.0, (first, last)
