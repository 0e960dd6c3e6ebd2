"""Ablations (analysis/head_ablation.py): known answers on small random models, the pattern-preserving
equivalence of Olsson et al. (2022), and the effect of ablating a trained run's induction heads."""

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from analysis.head_ablation import ablate, clean_patterns, mean_z, record_z
from analysis.effects import Evaluator
from analysis.runs import open_run
from train.model import AttentionOnlyTransformer, ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def small_model(**kw) -> AttentionOnlyTransformer:
    torch.manual_seed(0)
    spec = dict(n_layers=3, n_heads=3, d_model=24, d_head=8, n_ctx=16, d_vocab=13, layernorm="none")
    model = AttentionOnlyTransformer(ModelConfig(**{**spec, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-zero biases too
    return model


def tokens(batch=4, pos=16, vocab=13, seed=1):
    return torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer, head", [(0, 1), (1, 2), (2, 0)])
def test_pattern_preserving_ablation_removes_the_heads_value_paths(layer, head):
    """With every pattern frozen and no LayerNorm, the network downstream of a head is linear: the
    logit change equals minus the head's output pushed through the identity path and every later
    head's OV circuit (with its recorded pattern) into the unembedding."""
    model, x = small_model(), tokens()
    clean = model(x)
    patterns, zs = clean_patterns(model, x), record_z(model, x)
    delta = -zs[layer][:, head] @ model.blocks[layer].attn.W_O[head]  # [batch, pos, d_model]
    for later in range(layer + 1, model.config.n_layers):
        attn = model.blocks[later].attn
        v = torch.einsum("btm,hmd->bhtd", delta, attn.W_V)  # biases cancel in a difference
        delta = delta + torch.einsum("bhtd,hdm->btm", patterns[later] @ v, attn.W_O)
    expected = delta @ model.W_U
    got = ablate(model, x, [(layer, head)], "pattern") - clean
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_pattern_ablation_of_several_heads_is_linear_in_frozen_patterns():
    """Frozen patterns make the effects of heads in the same layer add up."""
    model, x = small_model(), tokens()
    clean = model(x)
    both = ablate(model, x, [(1, 0), (1, 2)], "pattern") - clean
    each = sum(ablate(model, x, [h], "pattern") - clean for h in [(1, 0), (1, 2)])
    torch.testing.assert_close(both, each, atol=1e-5, rtol=1e-4)


def test_zero_ablation_known_answers():
    model, x = small_model(n_layers=1, positional="learned"), tokens()
    # A head whose W_O is zero contributes nothing: ablating it changes nothing.
    with torch.no_grad():
        model.blocks[0].attn.W_O[1].zero_()
    torch.testing.assert_close(ablate(model, x, [(0, 1)], "zero"), model(x))
    # Every head ablated: only embeddings, positions and the output bias reach the unembedding.
    all_heads = [(0, h) for h in range(3)]
    resid = model.W_E[x] + model.W_pos[: x.shape[1]] + model.blocks[0].attn.b_O
    torch.testing.assert_close(ablate(model, x, all_heads, "zero"), resid @ model.W_U + model.b_U)
    # Heads that are not ablated keep their contribution: one head's removal is exactly its output.
    z = record_z(model, x)[0]
    expected = model(x) - (z[:, 2] @ model.blocks[0].attn.W_O[2]) @ model.W_U
    torch.testing.assert_close(ablate(model, x, [(0, 2)], "zero"), expected, atol=1e-5, rtol=1e-4)


def test_mean_ablation_known_answers():
    model, x = small_model(n_layers=1), tokens()
    z = record_z(model, x)[0]  # [batch, head, pos, d_head]
    # Reference = the input itself repeated: the per-position mean of identical sequences is their z.
    one = x[:1].repeat(5, 1)
    means = mean_z(model, one)
    torch.testing.assert_close(ablate(model, one, [(0, 0), (0, 1)], "mean", means), model(one), atol=1e-5, rtol=1e-4)
    # Otherwise the head's output is replaced by the mean's, position by position ...
    means = mean_z(model, x)
    assert means[0].shape == (3, 16, 8)
    torch.testing.assert_close(means[0], z.mean(dim=0))
    w = model.blocks[0].attn.W_O[1]
    expected = model(x) + ((means[0][1] - z[:, 1]) @ w) @ model.W_U
    torch.testing.assert_close(ablate(model, x, [(0, 1)], "mean", means), expected, atol=1e-5, rtol=1e-4)
    # ... or by one mean over positions too.
    flat = mean_z(model, x, per_position=False)
    assert flat[0].shape == (3, 1, 8)
    expected = model(x) + ((z[:, 1].mean(dim=(0, 1)) - z[:, 1]) @ w) @ model.W_U
    torch.testing.assert_close(ablate(model, x, [(0, 1)], "mean", flat), expected, atol=1e-5, rtol=1e-4)


def test_bad_heads_and_methods_are_refused():
    model, x = small_model(), tokens()
    with pytest.raises(ValueError, match="head 3.0"):
        ablate(model, x, [(3, 0)])
    with pytest.raises(ValueError, match="method"):
        ablate(model, x, [(0, 0)], "resample")


# --- on the trained quickstart run -------------------------------------------------------------

def run_cli(*args):
    """`python -m analysis ARGS` in a subprocess (the real exit code and stderr)."""
    return subprocess.run([sys.executable, "-m", "analysis", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def main(*args) -> int:
    """The same command in-process (no interpreter start-up)."""
    from analysis.__main__ import main as analysis_main

    try:
        return analysis_main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        return e.code


def test_induction_heads_carry_the_induction_loss(quickstart_run):
    r = open_run(quickstart_run)
    induction = [(h["layer"], h["head"]) for h in r.summary["induction_heads"]]
    assert induction, "the quickstart run formed no induction head"
    # Heads of layer 1 that are not induction heads; if every layer-1 head is one (as in the quickstart
    # run), the heads of class "other" (neither induction nor previous-token heads).
    others = [(1, h) for h in range(r.cfg.model.n_heads) if (1, h) not in induction] or [
        (h["layer"], h["head"]) for h in r.summary["heads"] if h["class"] == "other"]
    assert others
    untrained = Evaluator(r, r.model(r.checkpoints[0]))()["induction_loss"]
    evaluate = Evaluator(r, r.model(r.checkpoints[-1]))
    clean = evaluate()["induction_loss"]
    ablated = evaluate(induction)["induction_loss"]
    assert clean < 0.5 * untrained
    # Ablating the induction heads takes back most of the advantage over the untrained model ...
    assert ablated - clean > 0.8 * (untrained - clean), (clean, ablated, untrained)
    # ... ablating any other head much less.
    for head in others:
        assert evaluate([head])["induction_loss"] - clean < 0.1 * (ablated - clean), head


def test_ablate_command_attributes_the_icl_score_to_induction_heads(quickstart_run):
    assert main("ablate", quickstart_run, "--checkpoints", "last", "--together", "induction") == 0
    table = pq.read_table(quickstart_run / "analysis" / "ablation_zero.parquet").to_pylist()
    r = open_run(quickstart_run)
    induction = [(h["layer"], h["head"]) for h in r.summary["induction_heads"]]
    single = [row for row in table if row["n_ablated"] == 1]
    assert len(single) == r.cfg.model.n_layers * r.cfg.model.n_heads
    assert len(table[0]["delta_token_losses"]) == r.cfg.data.eval_size * (r.cfg.model.n_ctx - 1)
    (joint,) = [row for row in table if row["heads"] == "+".join(f"{a}.{b}" for a, b in induction)]
    clean_icl = joint["icl_score_clean"]
    assert clean_icl < -0.2
    # ICL attribution = the rise of the ICL score when heads are ablated (Olsson et al. 2022): the
    # induction heads together account for most of the ICL score, and undo the phase change's
    # per-token-loss improvement (projection onto the before-and-after vector).
    assert joint["delta_icl_score"] > 0.75 * -clean_icl, joint["delta_icl_score"]
    assert joint["undone_fraction"] > 0.5
    special = set(induction) | {(h["layer"], h["head"]) for h in r.summary["previous_token_heads"]}
    other = [row for row in single if (row["layer"], row["head"]) not in special]
    assert sum(max(row["delta_icl_score"], 0) for row in other) < 0.2 * joint["delta_icl_score"]


def test_pattern_preserving_attribution_goes_to_induction_heads(quickstart_run):
    """Pattern-preserving ablation leaves out the paths through queries and keys, so a previous-token
    head that only feeds the induction heads' keys gets no attribution: the per-head attributions
    land on the induction heads."""
    r = open_run(quickstart_run)
    induction = {(h["layer"], h["head"]) for h in r.summary["induction_heads"]}
    evaluate = Evaluator(r, r.model(r.checkpoints[-1]), "pattern")
    clean = evaluate()["icl_score"]
    n_layers, n_heads = r.shape
    rise = {(a, b): max(evaluate([(a, b)])["icl_score"] - clean, 0.0) for a in range(n_layers) for b in range(n_heads)}
    assert sum(v for h, v in rise.items() if h in induction) > 0.8 * sum(rise.values()), rise


def test_cli_bad_input_is_one_line(tmp_path, quickstart_run, capsys):
    proc = run_cli("ablate", tmp_path / "nope")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and "nope" in proc.stderr
    (tmp_path / "empty").mkdir()
    cases = [(("ablate", tmp_path / "empty"), "config.yaml"),
             (("ablate", quickstart_run, "--checkpoints", "7"), "index.json: no checkpoint at step 7"),
             (("ablate", quickstart_run, "--heads", "5.0"), "--heads 5.0"),
             (("ablate", quickstart_run, "--method", "resample"), "invalid choice"),
             (("knockout", quickstart_run, "--k", "8"), "--k 8"),
             (("export-tl", tmp_path / "none.ckpt", tmp_path / "out.pt"), "none.ckpt: checkpoint not found")]
    for args, expected in cases:
        assert main(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
