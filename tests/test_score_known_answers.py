"""Known answers, in closed form, for the scores the other tests check only by thresholds: the direct
unembedding through a final LayerNorm, the QK-composition induction score, and a head that is both a
previous-token head and an induction head (and how the run summary labels it)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from train import probes
from train.config import PhaseConfig, ProbesConfig
from train.data.synthetic import RepeatedTokens, batch_rng
from train.head_scores import Heads, costly_head_scores
from train.model import AttentionOnlyTransformer, ModelConfig
from train.phase import classify_heads

# --- direct_unembed: the final LayerNorm's centring and gain, then W_U -----------------------------


def test_direct_unembed_closed_form():
    gain = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # Entry (i, j) is (delta_ij - 1/d) * gain_j: row i is what residual direction e_i adds to the logits
    # once centred (e_i - 1/d) and scaled by the gain, with W_U the identity.
    expected = torch.tensor([[0.75, -0.50, -0.75, -1.00],
                             [-0.25, 1.50, -0.75, -1.00],
                             [-0.25, -0.50, 2.25, -1.00],
                             [-0.25, -0.50, -0.75, 3.00]])
    torch.testing.assert_close(probes.direct_unembed(torch.eye(4), gain), expected)
    # With a general W_U: the same centring and gain, then W_U.
    w_u = torch.arange(12.0).view(4, 3) - 5
    torch.testing.assert_close(probes.direct_unembed(w_u, gain), expected @ w_u)
    # The direction the LayerNorm removes (all coordinates equal) raises no logit.
    torch.testing.assert_close(torch.ones(4) @ probes.direct_unembed(w_u, gain), torch.zeros(3))
    # Without a LayerNorm it is W_U itself.
    assert probes.direct_unembed(w_u) is w_u


def test_direct_unembed_is_the_linear_part_of_a_pre_layernorm_models_output():
    """On a model with `layernorm="pre"`: the logits, less the LayerNorm's bias and b_U and times the
    per-position scale sigma, are the residual stream through `direct_unembed`."""
    torch.manual_seed(0)
    model = AttentionOnlyTransformer(ModelConfig(n_layers=2, n_heads=2, d_model=16, n_ctx=16, d_vocab=11,
                                                 layernorm="pre")).eval()
    ln = model.ln_final
    assert isinstance(ln, torch.nn.LayerNorm)
    with torch.no_grad():  # a gain that is not 1 (some negative), a bias and b_U that are not 0
        ln.weight.copy_(torch.randn(16))
        ln.bias.copy_(torch.randn(16))
        model.b_U.copy_(torch.randn(11))
    resid = []
    hook = ln.register_forward_hook(lambda module, args, out: resid.append(args[0]))
    tokens = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
    hook.remove()
    x = resid[0]  # [batch, pos, d_model], the residual stream the final LayerNorm reads
    sigma = (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    linear = (logits - ln.bias @ model.W_U - model.b_U) * sigma
    torch.testing.assert_close(x @ probes.direct_unembed(model.W_U, ln.weight), linear, atol=1e-4, rtol=1e-4)
    # The LayerNorm matters here: W_U alone is not the path (it misses centring and gain).
    assert not torch.allclose(x @ model.W_U, linear, atol=1e-2)


# --- induction_qk_score: QK circuit with keys read through a previous-token head -----------------

V, T, SHARP = 8, 24, 40.0  # vocabulary, context, attention sharpness


def composing_model() -> AttentionOnlyTransformer:
    """Residual layout [token one-hot (V) | previous token (V) | position (T)], shortformer positions.

    Layer 0: head 1 is an exact previous-token head (query i matches key i - 1 by position, copies the
    key's token into the previous-token subspace); heads 0 and 2 are zero. Layer 1: head 0 is an
    induction head (its query reads the token, its key the previous-token subspace: W_E W_Q (W_E OV W_K)^T
    is SHARP sqrt(d_head) times the identity, every eigenvalue positive: score 1); head 1 has W_Q and W_K
    zeroed (score 0); head 2 is an anti-induction head (W_Q negated: every eigenvalue negative, score -1).
    """
    d_model, d_head = 2 * V + T, max(V, T)
    m = AttentionOnlyTransformer(ModelConfig(n_layers=2, n_heads=3, d_model=d_model, d_head=d_head, n_ctx=T,
                                             d_vocab=V, positional="shortformer", layernorm="none"))
    tok, prev, pos = 0, V, 2 * V
    scale = SHARP * np.sqrt(d_head)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.W_E[torch.arange(V), tok + torch.arange(V)] = 1.0
        m.W_pos[torch.arange(T), pos + torch.arange(T)] = 1.0
        m.W_U[tok + torch.arange(V), torch.arange(V)] = 1.0
        a0, a1 = m.blocks[0].attn, m.blocks[1].attn
        a0.W_Q[1, pos + torch.arange(T), torch.arange(T)] = scale  # query at position i ...
        a0.W_K[1, pos + torch.arange(T - 1), torch.arange(1, T)] = 1.0  # ... matches key at i - 1
        a0.W_V[1, tok + torch.arange(V), torch.arange(V)] = 1.0
        a0.W_O[1, torch.arange(V), prev + torch.arange(V)] = 1.0
        for h, q_sign, k_sign in ((0, 1.0, 1.0), (1, 0.0, 0.0), (2, -1.0, 1.0)):
            a1.W_Q[h, tok + torch.arange(V), torch.arange(V)] = q_sign * scale  # the query's token ...
            a1.W_K[h, prev + torch.arange(V), torch.arange(V)] = k_sign  # ... against the key's previous token
            a1.W_V[h, tok + torch.arange(V), torch.arange(V)] = 1.0  # values and outputs: no part of the score
            a1.W_O[h, torch.arange(V), tok + torch.arange(V)] = 1.0
    return m.eval()


def test_induction_qk_score_known_answers():
    m = composing_model()
    a0, a1 = m.blocks[0].attn, m.blocks[1].attn
    score = probes.induction_qk_score(m.W_E, a1.W_Q, a1.W_K, a0.W_V[1], a0.W_O[1])
    torch.testing.assert_close(score, torch.tensor([1.0, 0.0, -1.0]), atol=1e-6, rtol=0)
    # Read through a head that writes nothing (layer 0, head 0), no head composes: every score is 0.
    torch.testing.assert_close(probes.induction_qk_score(m.W_E, a1.W_Q, a1.W_K, a0.W_V[0], a0.W_O[0]),
                               torch.zeros(3), atol=1e-6, rtol=0)
    # A key that matches the *next* token instead (a cyclic shift of the vocabulary): the eigenvalues are
    # the V-th roots of unity, whose real parts sum to 0.
    shift = torch.zeros_like(a1.W_K[:1])
    shift[0, V + torch.arange(V), (torch.arange(V) + 1) % V] = 1.0
    torch.testing.assert_close(probes.induction_qk_score(m.W_E, a1.W_Q[:1], shift, a0.W_V[1], a0.W_O[1]),
                               torch.zeros(1), atol=1e-6, rtol=0)


def test_registered_induction_qk_reads_the_strongest_previous_token_head():
    """The per-head score of a run (head_scores.induction_qk): keys read through layer 0's strongest
    previous-token head, here head 1, not head 0. The hand-built heads behave as their weights say:
    head 1 of layer 0 attends to the previous token, head 0 of layer 1 to the token after the previous
    occurrence of the query's token."""
    m = composing_model()
    tokens = torch.from_numpy(RepeatedTokens(V, T, rep_len=5)(batch_rng(0, 0, "probe"), 4))
    _, patterns = m(tokens, return_patterns=True)
    prev = torch.stack([probes.previous_token_score(p) for p in patterns])
    pm = torch.stack([probes.prefix_matching_score(p, tokens) for p in patterns])
    assert prev[0, 1] > 0.99 and prev[0, 0] < 0.5 and prev[0, 2] < 0.5
    assert pm[1, 0] > 0.99 and pm[1, 2] < 0.05  # the anti-induction head avoids the induction target
    qk = costly_head_scores(m, tokens, prev)["induction_qk"]
    assert torch.isnan(qk[0]).all()  # no earlier layer to compose with
    torch.testing.assert_close(qk[1], torch.tensor([1.0, 0.0, -1.0]), atol=1e-6, rtol=0)


# --- a head that is both a previous-token head and an induction head ------------------------------

R, REPEATS = 5, 4
TP = 1 + R * REPEATS  # BOS + 4 repeats of 5 distinct tokens


def pattern(target_first, target_later, w=1.0, batch=3) -> torch.Tensor:
    """`[batch, 1, TP, TP]`: queries of the first repeat (and BOS) attend to `target_first(i)`; queries of
    later repeats put `w` on `target_later(i)` and `1 - w` on the token after the query token's previous
    occurrence, `i - R + 1`."""
    p = torch.zeros(batch, 1, TP, TP)
    for i in range(TP):
        if i <= R:
            p[:, 0, i, target_first(i)] = 1.0
        else:
            p[:, 0, i, target_later(i)] += w
            p[:, 0, i, i - R + 1] += 1 - w
    return p


def test_a_head_can_score_high_on_both_and_is_labelled_induction():
    """Previous-token and prefix-matching scores are measured independently. A head that attends to the
    previous token in the first repeat and splits 40/60 between the previous token and the induction
    target afterwards scores (R + 3R * 0.4) / 4R = 0.55 and 0.6, both above the default thresholds;
    the run labels it an induction head (the label takes precedence) and keeps both scores."""
    tokens = torch.from_numpy(RepeatedTokens(20, TP, rep_len=R)(batch_rng(0, 0, "probe"), 3))
    prev_head = pattern(lambda i: max(i - 1, 0), lambda i: i - 1)  # w=1: always the previous token
    dual = pattern(lambda i: max(i - 1, 0), lambda i: i - 1, w=0.4)
    induction = pattern(lambda i: 0, lambda i: i - 1, w=0.0)  # BOS in the first repeat, then induction
    bos = pattern(lambda i: 0, lambda i: 0)
    patterns = [torch.cat([prev_head, bos], 1), torch.cat([dual, induction], 1)]  # [batch, head, q, k] per layer
    # The live path: every head's two scores in one op from the stacked patterns (head_scores.Heads).
    heads = Heads(None, tokens, patterns=patterns)
    prev, pm = heads.score("previous_token"), heads.score("prefix_matching")
    expected_prev = torch.tensor([[1.0, 1 / (TP - 1)], [(1 + 3 * 0.4) / 4, 1 / (TP - 1)]])
    expected_pm = torch.tensor([[0.0, 0.0], [0.6, 1.0]])
    torch.testing.assert_close(prev, expected_prev)
    torch.testing.assert_close(pm, expected_pm)
    for p, layer in zip(patterns, range(2)):  # the definitions, layer by layer, agree
        torch.testing.assert_close(probes.previous_token_score(p), expected_prev[layer])
        torch.testing.assert_close(probes.prefix_matching_score(p, tokens), expected_pm[layer])

    cfg = ProbesConfig()
    assert prev[1, 0] >= cfg.previous_token_threshold and pm[1, 0] >= cfg.induction_threshold
    classes = classify_heads(prev.numpy(), pm.numpy(), cfg.previous_token_threshold, cfg.induction_threshold)
    assert [h["class"] for h in classes] == ["previous_token", "other", "induction", "induction"]

    # What summary.json says, from a heads table holding these scores at the last step.
    from train.callbacks.summary import summarize

    layer, head = np.divmod(np.arange(4), 2)
    columns = {
        "train": {"step": [0, 10], "tokens": [0, 640], "loss": [4.0, 3.0]},
        "heads": {"step": [0] * 4 + [10] * 4, "tokens": [0] * 4 + [640] * 4, "layer": [*layer] * 2,
                  "head": [*head] * 2, "previous_token": [0.0] * 4 + prev.flatten().tolist(),
                  "prefix_matching": [0.0] * 4 + pm.flatten().tolist()},
        "eval": {"step": [0, 10], "tokens": [0, 640], "loss": [4.0, 3.0], "icl_score": [0.0, -0.1]},
    }
    measure = SimpleNamespace(sink=SimpleNamespace(columns=lambda name: columns[name]))
    s = summarize(measure, cfg, PhaseConfig(), 2, 2)
    assert [(h["layer"], h["head"]) for h in s["induction_heads"]] == [(1, 1), (1, 0)]  # by prefix matching
    assert s["induction_heads"][1]["prefix_matching"] == pytest.approx(0.6)
    assert [(h["layer"], h["head"]) for h in s["previous_token_heads"]] == [(0, 0)]
    (dual_record,) = [h for h in s["heads"] if (h["layer"], h["head"]) == (1, 0)]
    assert dual_record["class"] == "induction" and dual_record["previous_token"] == pytest.approx(0.55)
