"""The bad-input catalogue: every case fails before any work with one line that starts with the key or
file it is about, a non-zero exit code, no traceback (unless `HYDRA_FULL_ERROR=1`), and no file left.

`CONFIG_CASES` and `RESUME_CASES` are checked in-process (the message `python -m train` prints is
`one_line(error)`); the end-to-end tests at the bottom run the CLI for a sample of them. Elsewhere:
text data (tests/test_text_data.py), code-running pickles (tests/test_untrusted.py), SIGKILL and
resume (tests/test_resume.py), a full disk (tests/test_disk_full.py).
"""

import json
import os

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ROOT, run_train
from train.__main__ import one_line
from train.config import validate
from train.load import read_checkpoint

# Keys that each had no case before: every override but the last makes a valid config (checked by
# test_one_key_cases_fail_only_for_their_key), the last breaks one `_require` check of the key it names.
ONE_KEY_CASES = {
    # the data options' own keys (train/config.py validate_icl_task, and validate for spans)
    "n_states below 2": (["data=icl_markov", "probes.rep_len=3", "data.n_states=1"],
                         "data.n_states=1: must be at least 2"),
    "negative Dirichlet alpha": (["data=icl_markov", "probes.rep_len=3", "data.alpha=-1"],
                                 "data.alpha=-1.0: must be positive"),
    "zero triggers": (["data=bigram_triggers", "data.n_triggers=0"],
                      "data.n_triggers=0: must be between 1 and data.d_vocab - 2 = 62"),
    "zero pairs": (["data=icl_classification", "data.n_pairs=0"], "data.n_pairs=0: must be at least 1"),
    "pairs longer than the context": (["data=icl_classification", "data.n_pairs=32"],
                                      "data.n_pairs=32: needs 2 * n_pairs + 3 = 67 tokens"),
    "zero burstiness": (["data=icl_classification", "data.burstiness=0"],
                        "data.burstiness=0: must be at least 1"),
    "burstiness not dividing pairs": (["data=icl_classification", "data.burstiness=3"],
                                      "data.burstiness=3: must divide data.n_pairs=8"),
    "labels fewer than context classes": (["data=icl_classification", "data.n_labels=3"],
                                          "data.n_labels=3: must be at least n_pairs / burstiness + 2 = 4"),
    "classes all in the context": (["data=icl_classification", "data.n_classes=2"],
                                   "data.n_classes=2: must exceed n_pairs / burstiness = 2"),
    "zero items per class": (["data=icl_classification", "data.items_per_class=0"],
                             "data.items_per_class=0: must be at least 1"),
    "novel classes fewer than context classes": (["data=icl_classification", "data.n_novel_classes=1"],
                                                 "data.n_novel_classes=1: must be at least n_pairs / burstiness = 2"),
    "negative zipf exponent": (["data=icl_classification", "data.zipf_alpha=-1"],
                               "data.zipf_alpha=-1.0: must be 0 or more"),
    "p_bursty above 1": (["data=icl_classification", "data.p_bursty=1.5"], "data.p_bursty=1.5: must be in [0, 1]"),
    "negative noise": (["data=icl_classification", "data.noise=-0.1"], "data.noise=-0.1: must be in [0, 1]"),
    "p_relabel above 1": (["data=icl_classification", "data.p_relabel=2"], "data.p_relabel=2.0: must be in [0, 1]"),
    "negative spans per sequence": (["data.spans_per_seq=-1"], "data.spans_per_seq=-1: must be 0 or more"),
    "negative random-copies spans": (["data=random_copies", "data.spans_per_seq=-1"],
                                     "data.spans_per_seq=-1: must be 0 or more"),
    # probes and model keys checked in loops
    "zero evaluation interval": (["probes.eval_every_n_steps=0"], "probes.eval_every_n_steps=0: must be at least 1"),
    "zero probe sequences": (["probes.n_sequences=0"], "probes.n_sequences=0: must be at least 1"),
    "zero task batch": (["probes.task_size=0"], "probes.task_size=0: must be at least 1"),
    "negative heatmap interval": (["probes.heatmap_every_n_steps=-1"], "probes.heatmap_every_n_steps=-1: must be 0"),
    "zero init_std": (["model.init_std=0"], "model.init_std=0.0: must be positive"),
    "zero seeds": (["seeds=0"], "seeds=0: must be at least 1"),
    "zero seed workers": (["seed_workers=0"], "seed_workers=0: must be at least 1"),
    "unknown seed execution": (["seed_execution=threads"], "seed_execution=threads: expected processes or stacked"),
    "stacked with interventions": (["seeds=2", "seed_execution=stacked",
                                    "intervene=[{heads: [L0H0], kind: zero, from_step: 0, to_step: 10}]"],
                                   "intervene=[...]: a stacked ensemble trains without interventions"),
    "stacked with workers": (["seeds=2", "seed_execution=stacked", "seed_workers=2"],
                             "seed_workers=2: a stacked ensemble trains every member in this process"),
    "stacked and compiled": (["seeds=2", "seed_execution=stacked", "compile=true"],
                             "compile=True: a stacked ensemble is not compiled"),
    "stacked in fp16": (["seeds=2", "seed_execution=stacked", "trainer.precision=16-mixed"],
                        "trainer.precision=16-mixed: fp16's loss scaling would couple the members"),
    "stacked members with their own language": (["seeds=2", "seed_execution=stacked", "data.language_seed=${seed}"],
                                                "data.language_seed: 0 for seed 0 but 1 for seed 1; the members of a "
                                                "stacked ensemble share one model, data generator and optimizer"),
}

# (overrides, the start of the error line after "error: ")
CONFIG_CASES = {
    # unknown options and groups, wrong types, bad syntax (Hydra and OmegaConf)
    "unknown key": (["model.n_layer=2"], "model.n_layer: Key 'n_layer' not in 'ModelConfig'"),
    "unknown top-level key": (["max_steps=10"], "max_steps: Key 'max_steps' not in 'Config'"),
    "unknown group": (["foo=bar"], "foo: Key 'foo' not in 'Config'"),
    "unknown data option": (["data=nonexistent"], "data=nonexistent: no such option (options: "),
    "unknown experiment": (["experiment=nope"], "experiment=nope: no such option (options: "),
    "int given text": (["model.n_layers=two"], "model.n_layers: Value 'two' of type 'str' could not be converted"),
    "float given text": (["optim.lr=fast"], "optim.lr: Value 'fast' of type 'str' could not be converted"),
    "bool given text": (["model.smeared_key=maybe"], "model.smeared_key: Value 'maybe' is not a valid bool"),
    "unknown layernorm": (["model.layernorm=post"], "model.layernorm: Invalid value 'post'"),
    "not an enum option": (["model.positional=absolute"], "model.positional: Invalid value 'absolute'"),
    "override syntax": (["model.n_layers=[1"], "model.n_layers=[1: "),
    "unknown interpolation": (["model.d_vocab=${nope}"], "model.d_vocab: Interpolation key 'nope' not found"),
    # impossible model shapes, zero or negative sizes
    "d_model not divisible": (["model.d_model=65"], "model.d_model=65: must be divisible by model.n_heads=4"),
    "zero layers": (["model.n_layers=0"], "model.n_layers=0: must be at least 1"),
    "negative heads": (["model.n_heads=-2"], "model.n_heads=-2: must be at least 1"),
    "zero d_head": (["model.d_head=0"], "model.d_head=0: must be at least 1"),
    "odd rotary d_head": (["model.positional=rotary", "model.d_head=7"], "model.d_head=7: must be even"),
    "negative d_mlp": (["model.d_mlp=-1"], "model.d_mlp=-1: must be 0"),
    "vocab too small": (["model.d_vocab=2"], "model.d_vocab=2: must be at least 3"),
    "data vocab exceeds model's": (["data.d_vocab=100", "model.d_vocab=64"], "data.d_vocab=100: exceeds model.d_vocab=64"),
    "tiny context": (["model.n_ctx=4"], "model.n_ctx=4: must be at least 8"),
    # n_ctx smaller than the probes need
    "context shorter than probes": (["model.n_ctx=32"], "probes.rep_len=20: needs a context of 1 + 2 * rep_len = 41 tokens; model.n_ctx=32"),
    "ICL positions reversed": (["probes.icl_early=10", "probes.icl_late=5"], "probes.icl_late/icl_early/icl_span: "),
    "probe repeats too short": (["probes.rep_len=2"], "probes.rep_len=2: must be at least 3"),
    "probe longer than vocab": (["data.d_vocab=16", "probes.rep_len=20", "model.n_ctx=64"], "probes.rep_len=20: needs that many distinct tokens"),
    # data sizes
    "zero batch": (["data.batch_size=0"], "data.batch_size=0: must be at least 1"),
    "negative eval set": (["data.eval_size=-1"], "data.eval_size=-1: must be at least 1"),
    "negative loader workers": (["data.num_workers=-1"], "data.num_workers=-1: must be 0"),
    "span min > max": (["data.span_len_min=30", "data.span_len_max=20"], "data.span_len_min=30: must be between 1 and"),
    "zero concentration": (["data.concentration=0"], "data.concentration=0.0: must be positive"),
    "zero rep_len": (["data=repeated_tokens", "data.rep_len=0"], "data.rep_len=0: must be between 1"),
    "unknown text windows": (["data=text_stdlib", "data.windows=sliding"], "data.windows=sliding: expected packed or random"),
    "negative embed_std": (["model.embed_std=-1"], "model.embed_std=-1.0: must be positive"),
    # zero or negative rates and steps
    "zero lr": (["optim.lr=0"], "optim.lr=0.0: must be positive"),
    "negative lr": (["optim.lr=-1e-3"], "optim.lr=-0.001: must be positive"),
    "negative weight decay": (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be 0 or more"),
    "beta of 1": (["optim.betas=[1.0,0.99]"], "optim.betas=[1.0, 0.99]: each must be in [0, 1)"),
    "negative warm-up": (["optim.warmup_steps=-5"], "optim.warmup_steps=-5: must be 0 or more"),
    "min_lr_ratio above 1": (["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2.0: must be in [0, 1]"),
    "unknown schedule": (["optim.schedule=exotic"], "optim.schedule=exotic: expected constant, cosine or linear"),
    "position_layers with learned": (["model.positional=learned", "model.position_layers=1"],
                                     "model.position_layers=1: applies to shortformer and rotary positions"),
    "zero position_layers": (["model.position_layers=0"], "model.position_layers=0: must be at least 1"),
    "zero steps": (["trainer.max_steps=0"], "trainer.max_steps=0: must be at least 1"),
    "zero accumulation": (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0: must be at least 1"),
    "negative clipping": (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1.0: must be 0 or more"),
    "zero probe interval": (["probes.every_n_steps=0"], "probes.every_n_steps=0: must be at least 1"),
    "zero flush interval": (["probes.flush_every_n_steps=0"], "probes.flush_every_n_steps=0: must be at least 1"),
    "negative circuits interval": (["probes.circuits_every_n_steps=-1"], "probes.circuits_every_n_steps=-1: must be 0"),
    "exclude half the tokens": (["probes.exclude_fraction=0.5"], "probes.exclude_fraction=0.5: must be in [0, 0.5)"),
    "negative checkpoint interval": (["checkpoint.every_n_steps=-1"], "checkpoint.every_n_steps=-1: must be 0"),
    "zero dense interval": (["checkpoint.dense_every_n_steps=0"], "checkpoint.dense_every_n_steps=0: must be at least 1"),
    "dense start above 1": (["checkpoint.dense_start_fraction=1.5"], "checkpoint.dense_start_fraction=1.5: must be in (0, 1]"),
    "negative dense max": (["checkpoint.dense_max=-1"], "checkpoint.dense_max=-1: must be 0"),
    "unknown W&B mode": (["logger.wandb.mode=sometimes"], "logger.wandb.mode=sometimes: expected offline"),
    "zero W&B timeout": (["logger.wandb.init_timeout=0"], "logger.wandb.init_timeout=0.0: must be positive"),
    **ONE_KEY_CASES,
}


def config_error(compose_cfg, overrides) -> str:
    """The line `python -m train` prints for these overrides (composition, then validation)."""
    try:
        validate(compose_cfg(*overrides))
    except Exception as e:
        return one_line(e)
    raise AssertionError(f"{overrides} were accepted")


@pytest.mark.parametrize("overrides, expected", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_config_is_one_line_naming_the_key(compose_cfg, overrides, expected):
    message = config_error(compose_cfg, overrides)
    assert message.startswith(expected), message
    assert "\n" not in message


@pytest.mark.parametrize("overrides", [c[0] for c in ONE_KEY_CASES.values()], ids=ONE_KEY_CASES.keys())
def test_one_key_cases_fail_only_for_their_key(compose_cfg, overrides):
    """Without its last override a case's config is valid: the error is that key's own check."""
    validate(compose_cfg(*overrides[:-1]))


def required_keys(path, prefix: str = "") -> set[str]:
    """The key named by every `_require(ok, KEY, ...)` call in a source file: a string, an f-string or a
    name bound by an enclosing `for NAME in (constants)` loop, each expanded over the loop's values."""
    import ast

    def expand(arg, loops):
        if isinstance(arg, ast.Constant):
            return [arg.value]
        if isinstance(arg, ast.Name):
            return loops[arg.id]
        if isinstance(arg, ast.JoinedStr):
            out = [""]
            for part in arg.values:
                values = [part.value] if isinstance(part, ast.Constant) else loops[part.value.id]
                out = [o + str(v) for o in out for v in values]
            return out
        raise AssertionError(f"{path}: cannot read the key of _require(..., {ast.unparse(arg)}, ...)")

    keys: set[str] = set()

    def visit(node, loops):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple):
            loops = {**loops, node.target.id: [e.value for e in node.iter.elts]}
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_require":
            keys.update(prefix + key for key in expand(node.args[1], loops))
        for child in ast.iter_child_nodes(node):
            visit(child, loops)

    visit(ast.parse(path.read_text()), {})
    return keys


def test_every_checked_key_has_a_bad_input_case():
    """Every key that `validate` (train/config.py) or the model config (train/model_config.py) checks
    with `_require` has a case above whose expected line starts with `key=`."""
    keys = required_keys(ROOT / "train" / "config.py") | required_keys(ROOT / "train" / "model_config.py", "model.")
    # The parser sees literal keys, f-string keys and loop-variable keys.
    assert {"data.batch_size", "probes.task_size", "data.p_relabel", "model.n_layers", "model.init_std"} <= keys
    covered = {expected.split("=", 1)[0] for _, expected in CONFIG_CASES.values()}
    assert sorted(keys - covered) == []


# --- data and resume: checked in-process through `run`, before any training ---------------------

def short_cfg(compose_cfg, *overrides):
    return compose_cfg("logger=none", "trainer.enable_progress_bar=false", "trainer.max_steps=4", *overrides)


def run_error(cfg, run_dir) -> str:
    from train.run import run

    with pytest.raises(Exception) as info:
        run(cfg, run_dir)
    return one_line(info.value)


def test_missing_and_unreadable_data_files(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("INDUCTION_HARNESS_CACHE", str(tmp_path / "cache"))
    missing = tmp_path / "nope.txt"
    cfg = short_cfg(compose_cfg, "data=text_files", f"data.data_files=[{missing}]", "data.tokenizer=byte",
                    "data.d_vocab=257")
    assert run_error(cfg, tmp_path / "a") == f"data.data_files: no such file: {missing}"
    garbage = tmp_path / "corpus.parquet"
    garbage.write_bytes(b"not parquet at all" * 10)
    cfg = short_cfg(compose_cfg, "data=text_files", f"data.data_files=[{garbage}]", "data.tokenizer=byte",
                    "data.d_vocab=257")
    assert run_error(cfg, tmp_path / "b").startswith(f"{garbage}: cannot be read as parquet")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 0, 1, 2, 4), trained in-process."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF
    from train.config import register
    from train.run import run

    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", "trainer.enable_progress_bar=false",
                                           "trainer.max_steps=4"])
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(cfg, run_dir)
    return run_dir


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def foreign(path):  # another program's torch.save: loads with weights_only=True, but is no checkpoint
    torch.save({"weights": torch.zeros(3), "epoch": 7}, path)


def not_a_dict(path):
    torch.save(torch.zeros(3), path)


RESUME_CASES = {
    "missing run directory": (None, [], "resume={run}: not a run directory (no config.yaml)"),
    "checkpoint file deleted": (lambda p: p.unlink(), [], "{ckpt}: checkpoint not found"),
    "empty index": (lambda p: (p.parent / "index.json").write_text('{"checkpoints": []}'), [],
                    "resume={run}: no checkpoint listed in checkpoints/index.json"),
    "truncated checkpoint": (truncate, [], "{ckpt}: not a loadable checkpoint"),
    "foreign checkpoint": (foreign, [], "{ckpt}: not a checkpoint of this harness"),
    "tensor, not a checkpoint": (not_a_dict, [], "{ckpt}: not a checkpoint of this harness"),
    "model config mismatch": (lambda p: None, ["model.n_heads=2"], "model.n_heads=2: the run being resumed used 4"),
    "data config mismatch": (lambda p: None, ["data.batch_size=16"], "data.batch_size=16: the run being resumed used 32"),
    "optimizer mismatch": (lambda p: None, ["optim.lr=0.001"], "optim.lr=0.001: the run being resumed used 0.005"),
    "probes mismatch": (lambda p: None, ["probes.rep_len=10"], "probes.rep_len=10: the run being resumed used"),
}


@pytest.mark.parametrize("damage, overrides, expected", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_bad_resume_is_one_line_naming_the_file(compose_cfg, trained_run, tmp_path, damage, overrides, expected):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step=0000004.ckpt"
    if damage is not None:
        copy_run(trained_run, run)
        damage(ckpt)
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) if run.exists() else None
    cfg = short_cfg(compose_cfg, f"resume={run}", "trainer.max_steps=8", *overrides)
    message = run_error(cfg, run)
    assert message.startswith(expected.format(run=run, ckpt=ckpt)), message
    after = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) if run.exists() else None
    assert after == before  # nothing written, nothing removed


def test_a_new_run_refuses_a_directory_holding_a_run(compose_cfg, trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    message = run_error(short_cfg(compose_cfg, "trainer.max_steps=8"), run)
    assert message.startswith(f"{run}: already holds a run (config.yaml); resume={run} continues it"), message
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_load_model_refuses_a_foreign_checkpoint(tmp_path):
    from train.errors import RunError
    from train.load import load_model

    path = tmp_path / "other.ckpt"
    foreign(path)
    with pytest.raises(RunError, match=r"not a checkpoint of this harness"):
        load_model(path, None)


# --- non-finite loss and gradients ----------------------------------------------------------------

class InfGrad(torch.autograd.Function):
    """Identity forward; infinite gradients backward: the loss stays finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_gradients_stop_the_run_and_keep_good_checkpoints(compose_cfg, tmp_path, monkeypatch):
    from train.errors import NonFiniteLoss
    from train.module import InductionLM
    from train.run import run

    training_step = InductionLM.training_step

    def poisoned(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        return InfGrad.apply(loss) if self.global_step == 5 else loss  # the update to step 6

    monkeypatch.setattr(InductionLM, "training_step", poisoned)
    run_dir = tmp_path / "run"
    cfg = short_cfg(compose_cfg, "trainer.max_steps=20", "probes.flush_every_n_steps=5")
    with pytest.raises(NonFiniteLoss, match=r"^non-finite gradients at step 6;"):
        run(cfg, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite gradients at step 6" in summary["error"]
    index = json.loads((run_dir / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert [e["step"] for e in index] == [0, 1, 2, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "index.json", *(f"step={s:07d}.ckpt" for s in (0, 1, 2, 4))]
    for entry in index:
        state = read_checkpoint(run_dir / "checkpoints" / entry["file"])["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())
    assert pq.read_table(run_dir / "metrics" / "train.parquet")["step"].to_pylist() == [0, 1, 2, 3, 4, 5]
    assert not list(run_dir.rglob("*.tmp"))


def test_non_finite_loss_stops_the_run_and_keeps_good_checkpoints(tmp_path):
    run = tmp_path / "nan"
    proc = run_train("logger=none", "optim.lr=1e30", "optim.warmup_steps=0", "trainer.gradient_clip_val=null",
                     "trainer.max_steps=200", "probes.flush_every_n_steps=5", run_dir=run, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: non-finite training loss at step")
    assert "Traceback" not in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    index = json.loads((run / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert index, "the checkpoints before the failure are kept"
    for entry in index:
        state = torch.load(run / "checkpoints" / entry["file"], weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())


# --- end to end: the CLI's exit code, one stderr line, no traceback, no files ---------------------

def unwritable_dir(tmp_path):
    """A run directory that cannot be created: under a read-only directory, or (as root, whom
    permissions do not stop) under a regular file."""
    if os.geteuid() == 0:
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "run", "Not a directory"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "run", "Permission denied"


CLI_CASES = {
    "hydra: unknown key": (["model.n_layer=2"], 2, "model.n_layer: "),
    "hydra: wrong type": (["model.n_layers=two"], 2, "model.n_layers: "),
    "validate: impossible shape": (["model.d_model=65"], 2, "model.d_model=65: "),
    "ensemble: stacked members apart": (["seeds=2", "seed_execution=stacked", "data.language_seed=${{seed}}"], 2,
                                        "data.language_seed: 0 for seed 0 but 1 for seed 1"),
    "resume: missing directory": pytest.param(["resume={run}"], 2, "resume={run}: not a run directory",
                                              marks=pytest.mark.slow),
    "unwritable run directory": ([], 1, "{run}: {why}"),
}


@pytest.mark.parametrize("overrides, code, expected", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_error_is_one_line_nonzero_and_leaves_nothing(tmp_path, overrides, code, expected):
    run, why = unwritable_dir(tmp_path) if code == 1 else (tmp_path / "run", "")
    proc = run_train("logger=none", *(o.format(run=run) for o in overrides), run_dir=run, timeout=300)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # one line
    assert proc.stderr.startswith("error: " + expected.format(run=run, why=why)), proc.stderr
    assert not run.exists()  # not even Hydra's .hydra/ and train.log


def test_full_error_shows_the_traceback(tmp_path):
    proc = run_train("model.n_layer=2", run_dir=tmp_path / "run", env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "n_layer" in proc.stderr
