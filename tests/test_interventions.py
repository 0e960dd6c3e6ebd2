"""Interventions during training (train/interventions.py): each kind changes exactly the chosen heads in
its interval and nothing outside it; frozen heads keep their weights bit for bit; resuming inside an
interval is exact; bad input is one line naming the key."""

import json

import pytest
import torch

from tests.conftest import run_train
from tests.test_resume import SHORT, assert_same_run, final_state
from train.errors import ConfigError
from train.head_scores import head_outputs
from train.interventions import InterventionConfig, Interventions, parse, previous_token_pattern, uniform_pattern
from train.model import AttentionOnlyTransformer, ModelConfig

T, V = 12, 20


def model_and_tokens():
    torch.manual_seed(0)
    model = AttentionOnlyTransformer(ModelConfig(n_layers=2, n_heads=3, d_model=24, n_ctx=T, d_vocab=V)).eval()
    return model, torch.randint(1, V, (5, T), generator=torch.Generator().manual_seed(1))


def interventions(*specs, max_steps=100):
    return Interventions(parse([InterventionConfig(**s) for s in specs], n_layers=2, n_heads=3, max_steps=max_steps))


def per_head(model, tokens, edits=None):
    """Per layer: every head's direct output `[batch, head, pos, d_model]` and pattern."""
    with torch.no_grad():
        return head_outputs(model, tokens, edits)


@pytest.mark.parametrize("kind", ["zero", "mean", "previous_token", "uniform", "frozen_pattern"])
def test_each_forward_kind_changes_only_its_head_inside_its_interval(kind):
    model, tokens = model_and_tokens()
    ivs = interventions({"heads": ["L0H1"], "kind": kind, "from_step": 10, "to_step": 20})
    assert ivs.edits(9) is None and ivs.edits(20) is None  # outside [10, 20): the plain model
    (clean_out, clean_pat) = per_head(model, tokens)
    edits = ivs.edits(10, record=True)
    assert set(edits) == {0}
    out, pat = per_head(model, tokens, edits)
    untouched = [0, 2]
    torch.testing.assert_close(out[0][:, untouched], clean_out[0][:, untouched], rtol=0, atol=0)
    if kind in ("zero", "mean"):
        torch.testing.assert_close(pat[0], clean_pat[0], rtol=0, atol=0)  # patterns unchanged
        z_clean = clean_out[0][:, 1]
        want = torch.zeros_like(z_clean) if kind == "zero" else z_clean.mean(dim=0, keepdim=True).expand_as(z_clean)
        torch.testing.assert_close(out[0][:, 1], want, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(pat[0][:, untouched], clean_pat[0][:, untouched], rtol=0, atol=0)
        want = {"previous_token": previous_token_pattern(T, tokens.device), "uniform": uniform_pattern(T, tokens.device),
                "frozen_pattern": clean_pat[0][:, 1].mean(dim=0)}[kind]
        torch.testing.assert_close(pat[0][:, 1], want.expand(len(tokens), T, T), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[0][:, 1], clean_out[0][:, 1])  # the chosen head did change


def test_frozen_pattern_is_taken_once_from_the_first_training_batch():
    model, tokens = model_and_tokens()
    ivs = interventions({"heads": ["L1H2"], "kind": "frozen_pattern", "from_step": 3})
    _, before = per_head(model, tokens, ivs.edits(3))  # a measurement before the first training batch
    _, clean = per_head(model, tokens)
    torch.testing.assert_close(before[1][:, 2], clean[1][:, 2].mean(0).expand(5, T, T))  # its own (mean) pattern
    assert not ivs.items[0].state
    per_head(model, tokens, ivs.edits(3, record=True))  # the training batch of step 3 records it
    recorded = ivs.items[0].state["pattern.L1H2"].clone()
    other = torch.randint(1, V, (5, T), generator=torch.Generator().manual_seed(7))
    _, later = per_head(model, other, ivs.edits(50, record=True))
    torch.testing.assert_close(later[1][:, 2], recorded.expand(5, T, T), rtol=0, atol=0)


def test_freeze_holds_a_heads_weights_through_adamw_steps():
    """In process: weight decay and momentum from earlier steps would move the head; it stays put."""
    model, tokens = model_and_tokens()
    model.train()
    ivs = interventions({"heads": ["L1H2"], "kind": "freeze", "from_step": 2, "to_step": 5})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    attn = model.blocks[1].attn
    snapshots = {}
    for step in range(7):
        ivs.hold_frozen(model, step, before_update=True)
        loss = model(tokens).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        ivs.zero_frozen_grads(model, step)
        if 2 <= step < 5:
            assert attn.W_Q.grad[2].abs().sum() == 0 and attn.W_Q.grad[1].abs().sum() > 0
        opt.step()
        ivs.hold_frozen(model, step, before_update=False)
        snapshots[step] = {name: getattr(attn, name).detach().clone() for name in ("W_Q", "W_V", "W_O", "b_K")}
    for name in ("W_Q", "W_V", "W_O", "b_K"):
        assert torch.equal(snapshots[1][name][2], snapshots[4][name][2])  # held from step 2 to 4
        assert not torch.equal(snapshots[1][name][0], snapshots[4][name][0])  # the others train
        assert not torch.equal(snapshots[4][name][2], snapshots[6][name][2])  # released at 5


@pytest.mark.slow
def test_freeze_keeps_the_heads_weights_bit_identical_and_only_them(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(*SHORT, "trainer.max_steps=16", "checkpoint.every_n_steps=0",
                     "intervene=[{heads:[L0H1],kind:freeze,from_step:2,to_step:8}]", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = {s: final_state(run_dir, s)["state_dict"] for s in (2, 4, 8, 16)}
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
        key = f"model.blocks.0.attn.{name}"
        assert torch.equal(weights[2][key][1], weights[4][key][1]) and torch.equal(weights[2][key][1], weights[8][key][1])
        if name.startswith("W"):
            assert not torch.equal(weights[2][key][0], weights[8][key][0])  # the other heads train
            assert not torch.equal(weights[8][key][1], weights[16][key][1])  # released after step 8
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interventions"] == [{"kind": "freeze", "heads": ["L0H1"], "from_step": 2, "to_step": 8}]


@pytest.mark.slow
def test_resume_inside_an_interval_is_bit_identical(tmp_path):
    """Every interval runs to the end (`to_step` null), so the 30-step run's intervals are the 60-step run's
    cut at step 30; the frozen pattern and the frozen weights, taken at step 20, come back from the
    checkpoint."""
    iv = ("intervene=[{heads:[L1H0],kind:frozen_pattern,from_step:20},{heads:[L0H1],kind:freeze,from_step:20},"
          "{heads:[L0H2],kind:mean,from_step:10}]")
    full, half = tmp_path / "full", tmp_path / "half"
    proc = run_train(*SHORT, "trainer.max_steps=60", iv, run_dir=full)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run_train(*SHORT, "trainer.max_steps=30", iv, run_dir=half).returncode == 0
    proc = run_train(*SHORT, "trainer.max_steps=60", iv, f"resume={half}", run_dir=half)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(full, half, 60)
    import pyarrow.parquet as pq

    intervened = pq.read_table(full / "metrics" / "train.parquet").to_pydict()
    by_step = dict(zip(intervened["step"], intervened["intervened"]))
    assert by_step[5] == 0 and by_step[15] == 1 and by_step[25] == 3 and by_step[50] == 3  # the row's own step - 1


@pytest.mark.parametrize("spec, message", [
    ({"heads": ["L2H0"], "kind": "zero"}, r"^intervene\[0\]\.heads=L2H0: the model has 2 layers of 3 heads"),
    ({"heads": ["L0H3"], "kind": "zero"}, r"^intervene\[0\]\.heads=L0H3: the model has 2 layers of 3 heads"),
    ({"heads": ["head0"], "kind": "zero"}, r"^intervene\[0\]\.heads=head0: expected L<layer>H<head>"),
    ({"heads": ["L0H0"], "kind": "dropout"}, r"^intervene\[0\]\.kind=dropout: expected one of zero, mean"),
    ({"heads": ["L0H0"], "kind": "zero", "from_step": 100}, r"^intervene\[0\]\.from_step=100: must be in \[0, "),
    ({"heads": ["L0H0"], "kind": "zero", "to_step": 101}, r"^intervene\[0\]\.to_step=101: must be after"),
    ({"heads": ["L0H0"], "kind": "zero", "from_step": 5, "to_step": 5}, r"^intervene\[0\]\.to_step=5: must be after"),
])
def test_bad_interventions_are_one_line_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        interventions(spec)


def test_two_forward_kinds_on_one_head_at_once_are_refused_but_freeze_combines():
    with pytest.raises(ConfigError, match=r"^intervene\[1\]\.kind=uniform: head L0H1 already has zero \(intervene\[0\]\) "
                                          r"from step 30 to 40$"):
        interventions({"heads": ["L0"], "kind": "zero", "to_step": 40}, {"heads": ["L0H1"], "kind": "uniform", "from_step": 30})
    interventions({"heads": ["L0"], "kind": "zero", "to_step": 40}, {"heads": ["L0H1"], "kind": "uniform", "from_step": 40})
    interventions({"heads": ["L0H1"], "kind": "zero"}, {"heads": ["L0H1"], "kind": "freeze"})


def test_bad_intervention_on_the_command_line_exits_with_one_line(tmp_path):
    proc = run_train("logger=none", "trainer.max_steps=10", "intervene=[{heads:[L7H0],kind:zero}]", run_dir=tmp_path / "r")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: intervene[0].heads=L7H0: the model has 2 layers of 4 heads"
