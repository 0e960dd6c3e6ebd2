"""Real training runs: induction heads form where the paper says they do, and not where they can't."""

import pytest
import json

import pyarrow.parquet as pq

from tests.conftest import run_train


def read_summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_quickstart_forms_induction_heads_in_a_phase_change(quickstart_run):
    s = read_summary(quickstart_run)
    assert s["status"] == "finished" and s["steps"] == 1000
    strong = [h for h in s["induction_heads"] if h["layer"] >= 1 and h["prefix_matching"] >= 0.5]
    assert strong, s["induction_heads"]
    assert s["previous_token_heads"] and all(h["layer"] == 0 for h in s["previous_token_heads"])
    pc = s["phase_change"]
    assert pc is not None
    assert pc["onset_step"] < pc["peak_step"] < pc["end_step"]
    assert pc["icl_at_onset"] - pc["icl_at_end"] >= 0.3
    # The window contains the step where the strongest induction head's prefix matching crosses 0.5.
    heads = pq.read_table(quickstart_run / "metrics" / "heads.parquet").to_pandas()
    best = strong[0]
    curve = heads[(heads["layer"] == best["layer"]) & (heads["head"] == best["head"])].sort_values("step")
    crossing = int(curve[curve.prefix_matching >= 0.5].step.iloc[0])
    assert pc["onset_step"] <= crossing <= pc["end_step"], (crossing, pc)


def test_quickstart_run_directory_holds_the_contract(quickstart_run):
    d = quickstart_run
    assert (d / "config.yaml").exists() and (d / "summary.json").exists()
    train = pq.read_table(d / "metrics" / "train.parquet").to_pandas()
    assert train.step.tolist() == list(range(0, 1001))  # every step, really
    heads = pq.read_table(d / "metrics" / "heads.parquet").to_pandas()
    assert len(heads) == 1001 * 2 * 4
    index = json.loads((d / "checkpoints" / "index.json").read_text())["checkpoints"]
    steps = [e["step"] for e in index]
    assert [e["step"] for e in index if not e.get("dense")] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 500, 512, 1000]
    assert steps == sorted(set(steps))
    assert all((d / "checkpoints" / e["file"]).exists() for e in index)
    losses = pq.read_table(d / "metrics" / "eval_token_losses.parquet").to_pandas()
    assert losses.step.tolist() == steps
    assert not list(d.rglob("*.tmp"))


@pytest.mark.slow
def test_one_layer_forms_no_induction_head(tmp_path):
    proc = run_train("logger=none", "model.n_layers=1", "trainer.max_steps=1000", "checkpoint.enabled=false",
                     run_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = read_summary(tmp_path)
    assert s["induction_heads"] == []
    assert max(h["prefix_matching"] for h in s["heads"]) < 0.3
    assert s["phase_change"] is None  # its early in-context-frequency gain stays under phase.min_drop


def test_smeared_key_one_layer_forms_an_induction_head(tmp_path):
    proc = run_train("logger=none", "model.n_layers=1", "model.smeared_key=true", "trainer.max_steps=400",
                     "checkpoint.enabled=false", run_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = read_summary(tmp_path)
    assert any(h["prefix_matching"] >= 0.5 for h in s["induction_heads"]), s["heads"]


@pytest.mark.slow
def test_text_two_layers_form_the_circuit_in_a_phase_change_and_one_layer_does_not(tmp_path):
    """The text experiment and its control, as users run them (about 4.5 + 3 minutes on 2 CPU cores)."""
    two, one = tmp_path / "two", tmp_path / "one"
    for name, run_dir in (("olsson_text", two), ("olsson_text_1l", one)):
        proc = run_train(f"experiment={name}", "logger=none", run_dir=run_dir, timeout=3600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    s2, s1 = read_summary(two), read_summary(one)
    assert any(h["layer"] == 1 and h["prefix_matching"] >= 0.5 for h in s2["induction_heads"]), s2["heads"]
    phase = s2["phase_change"]  # seed 0 measured: 900-1800, drop 0.30, final -0.35
    assert phase is not None and phase["icl_drop"] >= 0.25, phase
    assert phase["end_step"] <= 0.75 * s2["steps"], phase  # the window closes well before the run ends
    assert s2["final"]["icl_score"] <= -0.3, s2["final"]
    assert s1["induction_heads"] == [] and max(h["prefix_matching"] for h in s1["heads"]) < 0.2
    assert s1["phase_change"] is None, s1["phase_change"]
    assert s1["final"]["icl_score"] >= s2["final"]["icl_score"] + 0.15, (s1["final"], s2["final"])


CONTROL_STEPS = 600  # the 2-layer quickstart run is through its phase change by then (window ~350-800)


@pytest.fixture(scope="module")
def one_layer_run(tmp_path_factory):
    """The quickstart setting with one layer, CONTROL_STEPS steps, trained in-process without
    checkpoints (about 20 s on 2 CPU cores)."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF
    from train.config import register
    from train.run import run

    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", "trainer.enable_progress_bar=false", "model.n_layers=1",
                                           f"trainer.max_steps={CONTROL_STEPS}", "checkpoint.enabled=false"])
    run_dir = tmp_path_factory.mktemp("one_layer") / "run"
    run(cfg, run_dir)
    return run_dir


def test_one_layer_control_forms_no_induction_head_where_two_layers_do(one_layer_run, quickstart_run):
    """Olsson et al.'s negative control, cheaply: one attention layer cannot compose a previous-token
    head with an induction head, so within CONTROL_STEPS steps no head ever reaches the induction
    threshold and summary.json names no phase change; the 2-layer quickstart run (the shared fixture,
    the same setting and data stream), over its first CONTROL_STEPS steps, does both."""
    from omegaconf import OmegaConf

    from train.phase import detect_phase_change

    s = read_summary(one_layer_run)
    cfg = OmegaConf.load(one_layer_run / "config.yaml")
    threshold = cfg.probes.induction_threshold
    assert s["status"] == "finished" and s["steps"] == CONTROL_STEPS
    assert cfg.model.n_layers == 1
    assert s["induction_heads"] == []
    heads = pq.read_table(one_layer_run / "metrics" / "heads.parquet").to_pandas()
    assert heads.step.nunique() == CONTROL_STEPS + 1 and set(heads.layer) == {0}
    assert heads.prefix_matching.max() < threshold  # at no step, not only the last
    assert s["phase_change"] is None
    one_icl = s["final"]["icl_score"]

    # The 2-layer run over the same steps: an induction head and a phase change (as summary.json would
    # report them for a run stopped at CONTROL_STEPS: the same rows, the same detector and settings).
    two_cfg = OmegaConf.load(quickstart_run / "config.yaml")
    assert OmegaConf.masked_copy(two_cfg, ["data", "optim", "probes", "phase", "seed"]) == \
        OmegaConf.masked_copy(cfg, ["data", "optim", "probes", "phase", "seed"])
    two_heads = pq.read_table(quickstart_run / "metrics" / "heads.parquet").to_pandas()
    at_end = two_heads[two_heads.step == CONTROL_STEPS]
    assert at_end[at_end.layer == 1].prefix_matching.max() >= threshold
    ev = pq.read_table(quickstart_run / "metrics" / "eval.parquet").to_pandas()
    ev = ev[ev.step <= CONTROL_STEPS]
    p = two_cfg.phase
    window = detect_phase_change(ev.step.to_numpy(), ev.tokens.to_numpy(), ev.icl_score.to_numpy(), p.smooth,
                                 p.threshold, p.min_drop, p.min_step)
    assert window is not None and window["onset_step"] < CONTROL_STEPS
    two_icl = ev.icl_score.iloc[-1] if ev.step.iloc[-1] == CONTROL_STEPS else None
    assert two_icl is not None and two_icl < one_icl - 0.5, (two_icl, one_icl)
