import pytest
import torch

from train.model import AttentionOnlyTransformer, ModelConfig, Positional


def make(**kw):
    torch.manual_seed(0)
    spec = ModelConfig(**{"n_layers": 2, "n_heads": 4, "d_model": 32, "d_head": 8, "n_ctx": 24, "d_vocab": 17, **kw})
    return AttentionOnlyTransformer(spec).eval()


@pytest.mark.parametrize("positional", Positional)
@pytest.mark.parametrize("extra", [{}, {"smeared_key": True}, {"d_mlp": 16}, {"layernorm": "none"}, {"layernorm": "final"}])
def test_fused_equals_explicit_and_shapes(positional, extra):
    model = make(positional=positional, **extra)
    tokens = torch.randint(0, 17, (3, 24))
    fused = model(tokens)
    explicit, patterns = model(tokens, return_patterns=True)
    assert fused.shape == (3, 24, 17)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert len(patterns) == 2
    for p in patterns:
        assert p.shape == (3, 4, 24, 24)
        torch.testing.assert_close(p.sum(-1), torch.ones(3, 4, 24))
        assert torch.all(p.triu(1) == 0), "attention must be causal"


def test_positions_reach_the_residual_stream_only_with_learned():
    tokens = torch.full((1, 10), 5)  # the same token everywhere: only position can tell them apart
    # Identical values everywhere: wherever a head attends, its output is the same, unless positions
    # are added to the residual stream (learned). Shortformer and rotary touch queries and keys only.
    for scheme in ("none", "shortformer", "rotary"):
        out = make(positional=scheme, n_layers=1)(tokens)
        torch.testing.assert_close(out[0, 0].expand(10, -1), out[0], msg=scheme)
    out = make(positional="learned", n_layers=1)(tokens)
    assert not torch.allclose(out[0, 0], out[0, -1])
    # ... while their attention patterns do depend on position.
    distinct = torch.arange(1, 11)[None]
    for scheme in ("shortformer", "rotary"):
        _, p = make(positional=scheme, n_layers=1)(distinct, return_patterns=True)
        _, p_none = make(positional="none", n_layers=1)(distinct, return_patterns=True)
        assert not torch.allclose(p[0], p_none[0]), scheme


def test_shortformer_keeps_positions_out_of_values():
    model = make(positional="shortformer", n_layers=1)
    # A head whose query/key ignore positions entirely: zero the position embedding's effect by
    # checking that changing W_pos changes patterns but not the value vectors (W_V sees tokens only).
    tokens = torch.randint(1, 17, (2, 12))
    _, p1 = model(tokens, return_patterns=True)
    with torch.no_grad():
        model.W_pos.add_(torch.randn_like(model.W_pos))
    _, p2 = model(tokens, return_patterns=True)
    assert not torch.allclose(p1[0], p2[0])
    # With every pattern frozen to p1, the output no longer depends on W_pos.
    from train.model import HeadEdit

    a = model(tokens, edits={0: HeadEdit(pattern=p1[0])})
    with torch.no_grad():
        model.W_pos.zero_()
    b = model(tokens, edits={0: HeadEdit(pattern=p1[0])})
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("positional", ["shortformer", "rotary"])
def test_position_layers_keeps_positions_out_of_later_layers(positional):
    tokens = torch.randint(1, 17, (2, 12))
    for position_layers, layer1_moves in ((1, False), (None, True)):
        model = make(positional=positional, position_layers=position_layers)
        with torch.no_grad():
            model.blocks[0].attn.W_O.zero_()  # layer 1 then reads the token embeddings alone
            _, before = model(tokens, return_patterns=True)
            if positional == "shortformer":
                model.W_pos.add_(torch.randn_like(model.W_pos))
            else:
                for table in (model.rotary_cos, model.rotary_sin):
                    table.copy_(table.flip(0))  # reversed positions: relative offsets change sign
            _, after = model(tokens, return_patterns=True)
        assert not torch.allclose(before[0], after[0])  # layer 0 attends by position in both
        assert torch.allclose(before[1], after[1]) != layer1_moves, position_layers


def test_smeared_key_mixes_previous_key_and_keeps_first():
    model = make(smeared_key=True, n_layers=1)
    attn = model.blocks[0].attn
    k = torch.randn(2, 4, 6, 8)
    with torch.no_grad():
        attn.smear_alpha.copy_(torch.tensor([0.0, 100.0, -100.0, 1.0]))
    s = attn.smear(k)
    torch.testing.assert_close(s[:, :, 0], k[:, :, 0])
    torch.testing.assert_close(s[:, 1], k[:, 1])  # sigmoid(100) = 1: no smearing
    torch.testing.assert_close(s[:, 2, 1:], k[:, 2, :-1])  # sigmoid(-100) = 0: the previous key
    torch.testing.assert_close(s[:, 0, 1:], 0.5 * k[:, 0, 1:] + 0.5 * k[:, 0, :-1])
    assert attn.smear_alpha.requires_grad


def test_head_edit_zeroing_a_head_changes_output():
    model = make(n_layers=1)
    tokens = torch.randint(0, 17, (2, 24))

    def zero_head0(z):
        z = z.clone()
        z[:, 0] = 0
        return z

    base = model(tokens)
    edited = model(tokens, edits={0: __import__("train.model", fromlist=["HeadEdit"]).HeadEdit(z=zero_head0)})
    assert not torch.allclose(base, edited)


@pytest.mark.parametrize("frozen", [False, True])
def test_freeze_embedding_keeps_token_vectors_at_init_and_trains_the_rest(frozen):
    from train.module import InductionLM
    from train.probes import per_token_loss

    model = make(freeze_embedding=frozen).train()
    lm = InductionLM(model, {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1, "warmup_steps": 0,
                             "schedule": "constant", "min_lr_ratio": 0.1}, total_steps=10)
    opt = lm.configure_optimizers()["optimizer"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        tokens = torch.randint(0, 17, (4, 24))
        opt.zero_grad()
        per_token_loss(model(tokens), tokens).mean().backward()
        opt.step()
    assert torch.equal(model.W_E, before["W_E"]) == frozen  # weight decay would move it too
    assert not torch.equal(model.W_U, before["W_U"])
    assert not torch.equal(model.blocks[0].attn.W_Q, before["blocks.0.attn.W_Q"])


def test_gradient_clipping_keeps_the_norm_before_clipping_and_clips_to_the_limit():
    from train.module import InductionLM
    from train.probes import per_token_loss

    model = make(freeze_embedding=True).train()
    lm = InductionLM(model, {}, total_steps=1)
    tokens = torch.randint(0, 17, (4, 24))
    (100 * per_token_loss(model(tokens), tokens).mean()).backward()

    def grad_norm():
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))

    before = grad_norm()
    assert before > 1.0 and model.W_E.grad is None
    lm.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    torch.testing.assert_close(lm.last_grad_norm, before)
    torch.testing.assert_close(grad_norm(), torch.tensor(0.5), rtol=1e-4, atol=0)


def test_layernorm_final_normalises_only_before_the_unembedding():
    model = make(layernorm="final", positional="shortformer")
    tokens = torch.randint(0, 17, (2, 24))
    # By hand: the raw residual stream into every layer (positions into queries and keys), one
    # LayerNorm before the unembedding.
    x, pos = model.W_E[tokens], model.W_pos[:24]
    for block in model.blocks:
        x = x + block.attn(x + pos, x)[0]
    expected = torch.nn.functional.layer_norm(x, (32,), model.ln_final.weight, model.ln_final.bias) @ model.W_U + model.b_U
    torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)
    # Scaling the embeddings changes the function: no LayerNorm inside the layers takes the scale out.
    with torch.no_grad():
        model.W_E.mul_(3)
    assert not torch.allclose(model(tokens), expected, atol=1e-3)


def test_embed_std_sets_the_embeddings_init_only():
    model = make(embed_std=1.0, d_model=64, d_vocab=400, n_ctx=200)
    default = 0.8 / 64 ** 0.5
    assert abs(model.W_E.std().item() - 1.0) < 0.02 and abs(model.W_pos.std().item() - 1.0) < 0.02
    assert abs(model.blocks[0].attn.W_Q.std().item() - default) < 0.01
    assert abs(make(d_model=64, d_vocab=400, n_ctx=200).W_E.std().item() - default) < 0.01


def test_lr_schedule_warm_up_then_constant_cosine_or_linear_to_the_min_ratio():
    from train.module import lr_lambda

    warm = lr_lambda("constant", warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = lr_lambda("cosine", warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    assert cosine(4) == pytest.approx(1.0) and cosine(12) == pytest.approx(0.55)  # half-way: the mean
    assert cosine(20) == pytest.approx(0.1) and cosine(100) == pytest.approx(0.1)  # stays at the floor
    linear = lr_lambda("linear", warmup_steps=0, total_steps=10, min_lr_ratio=0.0)
    assert [linear(s) for s in (0, 5, 10, 11)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="optim.schedule='step'"):
        lr_lambda("step", 0, 10, 0.1)(3)


def test_model_config_derives_and_checks_in_one_place():
    from train.errors import ConfigError

    cfg = ModelConfig(d_model=32, n_heads=4, d_vocab=17, positional="rotary").checked()
    assert cfg.d_head == 8 and cfg.positional is Positional.rotary  # derived, and typed from the string
    assert AttentionOnlyTransformer(ModelConfig(d_model=32, n_heads=4, d_vocab=17)).config.d_head == 8
    bad = [({"d_model": 30}, r"^model.d_model=30: must be divisible by model.n_heads=4"),
           ({"positional": "absolute"}, r"^model.positional=absolute: expected one of shortformer, learned"),
           ({"positional": "learned", "position_layers": 1}, r"^model.position_layers=1: applies to shortformer"),
           ({"embed_std": 0.0}, r"^model.embed_std=0.0: must be positive")]
    for kw, message in bad:
        with pytest.raises(ConfigError, match=message):
            AttentionOnlyTransformer(ModelConfig(**{"d_model": 32, "n_heads": 4, "d_vocab": 17, **kw}))
    with pytest.raises(ConfigError, match=r"^model.n_layer: not a model option"):
        ModelConfig.from_node({"n_layer": 2, "d_vocab": 17})
