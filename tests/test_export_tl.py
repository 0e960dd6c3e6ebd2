"""TransformerLens export (analysis/transformerlens.py): the file, the command, and the 3.x
`HookedTransformer` path (tested where TransformerLens 3.x is installed: `make test-tl3`; the 4.x bridge
is tests/test_tl_bridge.py)."""

import itertools

import pytest
import torch

from analysis.transformerlens import ExportError, export, installed_major, load, load_hooked_transformer, read_export
from train.model import AttentionOnlyTransformer, ModelConfig  # noqa: E402


needs_tl3 = pytest.mark.skipif(installed_major() != 3, reason="needs transformer-lens 3.x (make test-tl3)")


def random_model(**kw) -> AttentionOnlyTransformer:
    torch.manual_seed(0)
    spec = dict(n_layers=2, n_heads=2, d_model=16, d_head=8, n_ctx=20, d_vocab=11)
    model = AttentionOnlyTransformer(ModelConfig(**{**spec, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases and LayerNorm parameters away from their init
            p.add_(0.1 * torch.randn_like(p))
    return model


@needs_tl3
@pytest.mark.parametrize("positional, layernorm, d_mlp",
                         list(itertools.product(["shortformer", "learned", "rotary", "none"], ["pre", "none"], [0, 32])))
def test_round_trip_logits_match(tmp_path, positional, layernorm, d_mlp):
    model = random_model(positional=positional, layernorm=layernorm, d_mlp=d_mlp)
    path = export(model, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)  # plain types only
    assert payload["format"] == "induction-harness/transformer-lens"
    tl = load_hooked_transformer(path)
    assert tl.cfg.attn_only == (d_mlp == 0)
    x = torch.randint(0, 11, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(x) - tl(x)).abs().max().item()
    assert diff < 1e-4, diff


@needs_tl3
def test_patterns_match_transformer_lens_hooks(tmp_path):
    model = random_model(positional="rotary")
    tl = load_hooked_transformer(export(model, tmp_path / "model.pt"))
    x = torch.randint(0, 11, (2, 20))
    with torch.no_grad():
        _, patterns = model(x, return_patterns=True)
        _, cache = tl.run_with_cache(x)
    for layer, pattern in enumerate(patterns):
        torch.testing.assert_close(pattern, cache[f"blocks.{layer}.attn.hook_pattern"], atol=1e-5, rtol=1e-4)


@needs_tl3
@pytest.mark.parametrize("scheme, key", [(dict(smeared_key=True), "smeared_key"),
                                         (dict(position_layers=1), "position_layers=1"),
                                         (dict(layernorm="final"), "layernorm=final")])
def test_what_3x_cannot_express_is_refused_in_one_line(tmp_path, scheme, key):
    path = export(random_model(**scheme), tmp_path / "model.pt")  # every scheme exports (4.x loads it)
    with pytest.raises(ExportError, match=f"model.pt: model.{key}.*TransformerLens 4 loads it"):
        load_hooked_transformer(path)


def test_not_an_export(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ExportError, match="not a TransformerLens export"):
        read_export(tmp_path / "other.pt")
    with pytest.raises(ExportError, match="not found"):
        read_export(tmp_path / "missing.pt")


def test_export_command_on_the_trained_run(quickstart_run, tmp_path):
    from analysis.__main__ import main
    from train.load import checkpoints, load_config, load_model

    ckpt = checkpoints(quickstart_run)[-1]["path"]
    out = tmp_path / "quickstart.pt"
    assert main(["export-tl", str(ckpt), str(out)]) == 0
    ours = load_model(ckpt, load_config(quickstart_run))
    pytest.importorskip("transformer_lens")
    tl = load(out)  # the installed TransformerLens: a 4.x bridge or a 3.x HookedTransformer
    x = torch.randint(1, ours.config.d_vocab, (4, ours.config.n_ctx), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0  # BOS
    with torch.no_grad():
        assert (ours(x) - tl(x)).abs().max().item() < 1e-4
    assert main(["export-tl", str(quickstart_run), str(tmp_path / "last.pt")]) == 0  # a run directory: its last
