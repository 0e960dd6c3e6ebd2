"""analysis/tl_bridge.py: our model as a TransformerLens 4.x TransformerBridge computes our logits and
patterns, for every scheme; its hooks, weights, head detector and export files."""

import itertools
import warnings

import pytest
import torch

from importlib.metadata import version  # noqa: E402

pytest.importorskip("transformer_lens")
if not version("transformer-lens").startswith("4."):  # pragma: no cover
    pytest.skip("needs transformer-lens 4.x", allow_module_level=True)

import analysis.tl_bridge as E  # noqa: E402
from analysis.transformerlens import ExportError, export, spec_of, tl_state_dict  # noqa: E402
from train.model import AttentionOnlyTransformer, HeadEdit, ModelConfig  # noqa: E402

SPEC = dict(n_layers=2, n_heads=2, d_model=32, d_vocab=64, n_ctx=32)
SCHEMES = [dict(positional=p, layernorm=n)
           for p, n in itertools.product(["shortformer", "learned", "rotary", "none"], ["pre", "final", "none"])]
SCHEMES += [dict(positional=p, layernorm=n, d_mlp=24) for p, n in (("shortformer", "pre"), ("rotary", "final"),
                                                                   ("learned", "none"))]
SCHEMES += [dict(positional="shortformer", position_layers=1), dict(positional="rotary", position_layers=1),
            dict(positional="shortformer", smeared_key=True), dict(positional="rotary", smeared_key=True, d_mlp=24),
            dict(n_layers=3, positional="shortformer", position_layers=2, smeared_key=True, layernorm="final")]
ids = ["-".join(f"{k}={v}" for k, v in s.items()) for s in SCHEMES]


def random_model(**kw) -> AttentionOnlyTransformer:
    torch.manual_seed(0)
    model = AttentionOnlyTransformer(ModelConfig(**{**SPEC, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases, LayerNorm and smear parameters away from their init
            p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(batch=3, t=32, d_vocab=64, seed=1):
    x = torch.randint(1, d_vocab, (batch, t), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = 0  # BOS
    return x


def assert_same(model, bridge, x, logit_tol=1e-4, pattern_tol=1e-5, logprobs=False):
    with torch.no_grad():
        ours, patterns = model(x, return_patterns=True)
        logits, cache = bridge.run_with_cache(x)
    if logprobs:  # compatibility-mode processing centres the unembedding: logits shift per position
        ours, logits = ours.log_softmax(-1), logits.log_softmax(-1)
    assert (ours - logits).abs().max().item() < logit_tol
    for layer, pattern in enumerate(patterns):
        theirs = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert theirs.shape == pattern.shape  # [batch, head, query, key]
        assert (pattern - theirs).abs().max().item() < pattern_tol


@pytest.mark.parametrize("scheme", SCHEMES, ids=ids)
def test_bridge_matches_logits_and_patterns(scheme):
    model = random_model(**scheme)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # conversion emits no warnings
        bridge = E.to_bridge(model)
    assert type(bridge).__name__ == "TransformerBridge" and bridge.cfg.architecture == E.ARCHITECTURE
    assert_same(model, bridge, tokens())
    assert_same(model, bridge, tokens(t=11, seed=2))  # shorter than n_ctx


@pytest.mark.parametrize("scheme", [SCHEMES[0], dict(positional="rotary", d_mlp=24), dict(layernorm="final"),
                                    dict(positional="learned", layernorm="none", d_mlp=24),
                                    dict(positional="shortformer", position_layers=1, smeared_key=True)],
                         ids=["default", "rotary-mlp", "final", "learned-noln-mlp", "short-pl1-smear"])
def test_compatibility_mode(scheme):
    model = random_model(**scheme)
    assert_same(model, E.to_bridge(model, compatibility_mode="no_processing"), tokens())
    # HookedTransformer-style processing (fold_ln, centring, fold_value_biases): same log-probs and patterns
    assert_same(model, E.to_bridge(model, compatibility_mode=True), tokens(), logprobs=True)


def test_export_files_round_trip(tmp_path):
    for scheme in (dict(), dict(positional="rotary", d_mlp=24), dict(positional="none", layernorm="none"),
                   dict(layernorm="final"), dict(position_layers=1, smeared_key=True)):
        model = random_model(**scheme)
        path = export(model, tmp_path / "model.pt")
        assert torch.load(path, weights_only=True)["version"] == 2
        assert_same(model, E.load_bridge(path), tokens())
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ExportError, match="not a TransformerLens export"):
        E.load_bridge(tmp_path / "other.pt")


def test_version_1_exports_still_load(tmp_path):
    """A file of the earlier format (HookedTransformerConfig keyword arguments; positional=none as zero
    W_pos) loads as the same model."""
    from analysis.transformerlens import FORMAT, hooked_config

    for scheme in (dict(), dict(positional="rotary", d_mlp=24), dict(positional="none", layernorm="none")):
        model = random_model(**scheme)
        state = tl_state_dict(model)
        if scheme.get("positional") == "none":
            state["pos_embed.W_pos"] = torch.zeros(32, 32)
        torch.save({"format": FORMAT, "version": 1, "config": __import__("json").dumps(hooked_config(spec_of(model))),
                    "state_dict": state}, tmp_path / "v1.pt")
        assert_same(model, E.load_bridge(tmp_path / "v1.pt"), tokens())


def test_hooks_match_ours_and_edits_propagate():
    model = random_model(positional="rotary", d_mlp=24)
    bridge = E.to_bridge(model)
    x = tokens()
    zs = {}
    edits = {layer: HeadEdit(z=lambda z, layer=layer: zs.setdefault(layer, z)) for layer in range(2)}
    with torch.no_grad():
        model(x, edits=edits)
        _, cache = bridge.run_with_cache(x)
    for layer in range(2):  # hook_z: [batch, pos, head, d_head] (ours is [batch, head, pos, d_head])
        assert (cache[f"blocks.{layer}.attn.hook_z"] - zs[layer].transpose(1, 2)).abs().max() < 1e-5
        assert cache[f"blocks.{layer}.attn.hook_q"].shape == (3, 32, 2, 16)
        assert cache[f"blocks.{layer}.attn.hook_rot_q"].shape == (3, 32, 2, 16)
    assert cache["blocks.0.hook_resid_pre"].shape == (3, 32, 32)
    assert cache["blocks.1.hook_resid_mid"].shape == (3, 32, 32)

    # an edit at hook_pattern changes the output as our own pattern edit does (ablation parity)
    fixed = torch.tril(torch.ones(32, 32))
    fixed = (fixed / fixed.sum(-1, keepdim=True)).expand(3, 2, 32, 32)
    with torch.no_grad():
        ours = model(x, edits={1: HeadEdit(pattern=fixed)})
        theirs = bridge.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: fixed)])
    assert (ours - theirs).abs().max() < 1e-4


def test_weights_read_back_in_transformer_lens_shapes():
    model = random_model(d_mlp=24)
    bridge = E.to_bridge(model)
    block = bridge.blocks[1]
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
        assert torch.equal(getattr(block.attn, name), getattr(model.blocks[1].attn, name)), name
    assert torch.equal(bridge.W_E, model.W_E) and torch.equal(bridge.W_pos, model.W_pos)
    assert torch.equal(bridge.W_U, model.W_U) and torch.equal(bridge.b_U, model.b_U)
    assert torch.equal(bridge.W_in[1], model.blocks[1].mlp.W_in)


def test_head_detector_runs_and_agrees_with_our_patterns():
    from transformer_lens.head_detector import compute_head_attention_similarity_score, detect_head

    model = random_model()
    bridge = E.to_bridge(model)
    seq = " ".join(str(t) for t in [5, 9, 3, 17, 40, 8, 5, 9, 3, 17, 40, 8])  # repeated: induction-shaped
    x = bridge.to_tokens(seq)
    assert x[0, 0] == 0 and x.shape == (1, 13)  # the digit tokenizer prepends BOS = 0
    with torch.no_grad():
        _, patterns = model(x, return_patterns=True)
    for name in ("previous_token_head", "induction_head"):
        scores = detect_head(bridge, seq, name)
        assert scores.shape == (2, 2) and ((scores >= 0) & (scores <= 1)).all()
        detection = getattr(__import__("transformer_lens.head_detector", fromlist=["x"]),
                            f"get_{name}_detection_pattern")(x.cpu())
        for layer, head in itertools.product(range(2), range(2)):
            ours = compute_head_attention_similarity_score(
                patterns[layer][0, head], detection_pattern=detection, exclude_bos=False,
                exclude_current_token=False, error_measure="mul")
            assert abs(scores[layer, head].item() - ours) < 1e-5


def test_a_hand_built_induction_circuit_is_detected():
    """Hand-set weights make the default-scheme (shortformer) model a clean two-layer induction circuit:
    layer 0 head 0 a previous-token head, layer 1 head 0 an induction head. detect_head on the bridge must
    find both."""
    model = random_model(n_heads=1, d_model=64, d_head=64, layernorm="none")
    big = 100.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # residual dims: 0..15 token identity, 16..47 position (shortformer: queries and keys only),
        # 48..63 the previous token (written by layer 0)
        model.W_E[:16, :16] = torch.eye(16)
        model.W_pos[torch.arange(32), 16 + torch.arange(32)] = 1.0
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        a0.W_Q[0, 16:48, :32] = torch.eye(32) * big  # query at p ...
        a0.W_K[0, 16:48, :32] = torch.diag(torch.ones(31), 1)  # ... matches the key at p - 1
        a0.W_V[0, :16, :16] = torch.eye(16)
        a0.W_O[0, :16, 48:64] = torch.eye(16)  # copy that key's token into the previous-token dims
        a1.W_Q[0, :16, :16] = torch.eye(16) * big  # query token ...
        a1.W_K[0, 48:64, :16] = torch.eye(16)  # ... matches keys whose previous token equals it
    bridge = E.to_bridge(model)
    seq = " ".join(str(t) for t in [3, 7, 11, 2, 9, 5, 14] * 3)
    from transformer_lens.head_detector import detect_head

    prev = detect_head(bridge, seq, "previous_token_head")
    ind = detect_head(bridge, seq, "induction_head")
    assert prev[0, 0] > 0.9 and prev[1, 0] < 0.5, prev
    assert ind[1, 0] > 0.6 and ind[0, 0] < 0.2, ind


def test_smeared_key_is_a_mapped_parameter_with_hooks():
    model = random_model(smeared_key=True)
    bridge = E.to_bridge(model)
    sd = bridge.state_dict()
    for layer in range(2):
        assert torch.equal(sd[f"blocks.{layer}.attn.smear.weight"], model.blocks[layer].attn.smear_alpha)
    _, cache = bridge.run_with_cache(tokens())
    assert cache["blocks.1.attn.smear.hook_out"].shape == (3, 2, 32, 16)  # [batch, head, pos, d_head]


def test_weights_that_do_not_fit_are_refused():
    model = random_model()
    state = tl_state_dict(model)
    with pytest.raises(ExportError, match="do not fit"):
        E.bridge_from_state({**spec_of(model), "n_heads": 4, "d_head": 8}, state)
    state.pop("blocks.1.attn.W_Q")
    with pytest.raises(ExportError, match="do not fit"):
        E.bridge_from_state(spec_of(model), state)
