"""Every score on a hand-built 2-layer attention-only model whose weights implement an exact
previous-token head (layer 0) and induction head (layer 1), checked against TransformerLens."""

import numpy as np
import pytest
import torch

from train import probes
from train.head_scores import costly_head_scores
from train.data.synthetic import RepeatedTokens, batch_rng
from train.model import AttentionOnlyTransformer, ModelConfig

V, T, SHARP = 16, 32, 40.0  # vocabulary, context, attention sharpness


def hand_built() -> AttentionOnlyTransformer:
    """Residual layout: [token one-hot (V) | previous token (V) | position (T) | output (V)].

    Shortformer positions enter queries and keys only, so positions live in their own subspace that
    only W_Q / W_K of layer 0 read. Head L0H0 attends from i to i-1 and writes i-1's token into the
    previous-token subspace. Head L1H0 matches its query token against that subspace (attending to the
    token after an earlier occurrence of the current token) and copies the attended token into the
    output subspace, which is all the unembedding reads. Every other head is zero.
    """
    d_model, d_head = 3 * V + T, max(V, T)
    spec = ModelConfig(n_layers=2, n_heads=2, d_model=d_model, d_head=d_head, n_ctx=T, d_vocab=V,
                     positional="shortformer", layernorm="none")
    m = AttentionOnlyTransformer(spec)
    tok, prev, pos, out = 0, V, 2 * V, 2 * V + T
    scale = SHARP * np.sqrt(d_head)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.W_E[torch.arange(V), tok + torch.arange(V)] = 1.0
        m.W_pos[torch.arange(T), pos + torch.arange(T)] = 1.0
        a0, a1 = m.blocks[0].attn, m.blocks[1].attn
        a0.W_Q[0, pos + torch.arange(T), torch.arange(T)] = scale  # query at position i ...
        a0.W_K[0, pos + torch.arange(T - 1), torch.arange(1, T)] = 1.0  # ... matches key at i - 1
        a0.W_V[0, tok + torch.arange(V), torch.arange(V)] = 1.0
        a0.W_O[0, torch.arange(V), prev + torch.arange(V)] = 1.0
        a1.W_Q[0, tok + torch.arange(V), torch.arange(V)] = scale  # current token ...
        a1.W_K[0, prev + torch.arange(V), torch.arange(V)] = 1.0  # ... equals the key's previous token
        a1.W_V[0, tok + torch.arange(V), torch.arange(V)] = 1.0
        a1.W_O[0, torch.arange(V), out + torch.arange(V)] = 1.0
        m.W_U[out + torch.arange(V), torch.arange(V)] = 10.0
    return m.eval()


@pytest.fixture(scope="module")
def setup():
    model = hand_built()
    tokens = torch.from_numpy(RepeatedTokens(V, T, rep_len=10)(batch_rng(0, 0, "probe"), 4))
    logits, patterns = model(tokens, return_patterns=True)
    return model, tokens, logits, patterns


def test_hand_built_heads_score_as_designed(setup):
    model, tokens, logits, patterns = setup
    prev = torch.stack([probes.previous_token_score(p) for p in patterns])
    pm = torch.stack([probes.prefix_matching_score(p, tokens) for p in patterns])
    assert prev[0, 0] > 0.99 and pm[1, 0] > 0.99
    assert prev[0, 1] < 0.3 and pm[0, 0] < 0.05 and pm[0, 1] < 0.2  # zero heads attend uniformly
    losses = probes.per_token_loss(logits, tokens)
    assert probes.induction_loss(losses, 10) < 0.01  # it really predicts the repeats
    assert losses[:, :9].mean() > 1.0  # and cannot predict the first, random, repeat
    scores = costly_head_scores(model, tokens, prev)
    assert scores["copying"][1, 0] > 0.9
    assert scores["ov_copying"][1, 0] > 0.99
    assert scores["induction_qk"][1, 0] > 0.99
    assert torch.isnan(scores["induction_qk"][0]).all()


def test_measure_scores_every_head_as_the_score_functions_do(setup, tmp_path):
    """The callback's one-op path (stacked weights, every layer at once) against the definitions."""
    from train.head_scores import Heads
    from train.measurements import Measurements

    model, tokens, logits, patterns = setup
    measurements = Measurements(tokens, tokens, rep_len=10, late=T - 2, early=2)
    values = measurements.probe_scores(Heads(model, tokens, measurements.score_weights))
    prev = torch.stack([probes.previous_token_score(p) for p in patterns])
    pm = torch.stack([probes.prefix_matching_score(p, tokens) for p in patterns])
    torch.testing.assert_close(values["previous_token"], prev)
    torch.testing.assert_close(values["prefix_matching"], pm)
    assert values["prefix_matching"][1, 0] > 0.99 and values["previous_token"][0, 0] > 0.99


def test_k_composition_finds_the_previous_token_head(setup):
    model, *_ = setup
    a0, a1 = model.blocks[0].attn, model.blocks[1].attn
    comp = probes.k_composition_score(a1.W_Q, a1.W_K, a0.W_V, a0.W_O)  # [head1, head0]
    assert comp.shape == (2, 2)
    assert comp[0, 0] > 0.2 and torch.nan_to_num(comp[0, 1]) == 0 and torch.nan_to_num(comp[1]).abs().max() == 0


def test_eigen_scores_known_answers():
    eye = torch.eye(4)
    assert probes.ov_copying_score(eye, eye[None], eye[None], eye).item() == pytest.approx(1.0)
    assert probes.ov_copying_score(eye, -eye[None], eye[None], eye).item() == pytest.approx(-1.0)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues +-i: no positive mass
    e2 = torch.eye(2)
    assert probes.ov_copying_score(e2, rot[None], e2[None], e2).item() == pytest.approx(0.0, abs=1e-6)


def test_agrees_with_transformer_lens(setup):
    """Our scores of TransformerLens' own patterns (the installed version: 4.x bridge or 3.x) equal ours."""
    pytest.importorskip("transformer_lens")
    from analysis.transformerlens import to_transformer_lens

    model, tokens, logits, patterns = setup
    ht = to_transformer_lens(model)
    tl_logits, cache = ht.run_with_cache(tokens)
    torch.testing.assert_close(tl_logits, logits, atol=1e-4, rtol=1e-4)
    for l in range(2):
        tl_pattern = cache[f"blocks.{l}.attn.hook_pattern"]
        torch.testing.assert_close(tl_pattern, patterns[l], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probes.prefix_matching_score(tl_pattern, tokens),
                                   probes.prefix_matching_score(patterns[l], tokens))
