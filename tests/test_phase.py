import numpy as np
import pytest

from train.phase import classify_heads, detect_phase_change


def sigmoid_curve(center_step, width=0.3, drop=1.0, noise=0.0, seed=0):
    steps = np.arange(0, 2001, 10)
    tokens = steps * 2048
    x = np.log(np.maximum(tokens, 1))
    icl = -0.2 - drop / (1 + np.exp(-(x - np.log(center_step * 2048)) / width))
    icl += np.random.default_rng(seed).normal(0, noise, len(icl))
    return steps, tokens, icl


def test_window_is_centred_on_the_steepest_fall():
    steps, tokens, icl = sigmoid_curve(500)
    pc = detect_phase_change(steps, tokens, icl)
    assert pc["onset_step"] < 500 < pc["end_step"]
    assert abs(np.log(pc["peak_step"] / 500)) < 0.1
    assert 0.75 < pc["icl_drop"] < 1.0  # most of the 1-nat fall happens inside the window
    assert pc["peak_tokens"] == pc["peak_step"] * 2048


def test_noise_does_not_move_the_window_much():
    steps, tokens, icl = sigmoid_curve(800, noise=0.05)
    pc = detect_phase_change(steps, tokens, icl)
    assert abs(np.log(pc["peak_step"] / 800)) < 0.2


def test_min_step_skips_an_earlier_steeper_fall():
    steps, tokens, icl = sigmoid_curve(1000, drop=0.5)
    early = sigmoid_curve(40, width=0.1, drop=0.5)[2] + 0.2  # a sharp fall around step 40
    icl = icl + early
    assert detect_phase_change(steps, tokens, icl)["peak_step"] < 100
    pc = detect_phase_change(steps, tokens, icl, min_step=200)
    assert pc["onset_step"] >= 200 and abs(np.log(pc["peak_step"] / 1000)) < 0.1


def test_no_fall_no_phase_change():
    steps, tokens, icl = sigmoid_curve(500, drop=0.0, noise=0.01)
    assert detect_phase_change(steps, tokens, icl, min_drop=0.1) is None
    steps, tokens, icl = sigmoid_curve(500, drop=-1.0)  # ICL getting worse
    assert detect_phase_change(steps, tokens, icl) is None
    assert detect_phase_change([0, 1], [0, 10], [0.0, -1.0]) is None  # too few points


def test_head_classes():
    prev = np.array([[0.9, 0.1], [0.1, 0.2]])
    pm = np.array([[0.0, 0.1], [0.8, 0.3]])
    heads = classify_heads(prev, pm, prev_threshold=0.5, induction_threshold=0.5)
    assert [h["class"] for h in heads] == ["previous_token", "other", "induction", "other"]


# --- the evaluation set's real cadence, with missing values ---------------------------------------

def evaluation_steps(max_steps=1500):
    """The steps at which a run with the default config measures the evaluation set (and so has an ICL
    score for `summary.json`'s phase change): the probes' cadence (log-spaced, then every
    `eval_every_n_steps`), every checkpoint, and the last step; with their training tokens."""
    from train.callbacks.checkpoint import is_scheduled
    from train.config import CheckpointConfig, DataConfig, ModelConfig, ProbesConfig
    from train.measurements import eval_due

    p, c = ProbesConfig(), CheckpointConfig()
    steps = np.array([s for s in range(max_steps + 1) if eval_due(s, p.eval_every_n_steps)
                      or is_scheduled(s, c.log_spaced, c.every_n_steps) or s == max_steps])
    return steps, steps * DataConfig.batch_size * ModelConfig.n_ctx


def phase_defaults():
    from dataclasses import asdict

    from train.config import PhaseConfig

    return asdict(PhaseConfig())


def with_missing(steps, icl, center, fraction=0.25, seed=0):
    """`icl` with a random `fraction` of its values NaN, and the one nearest `center` too."""
    missing = np.random.default_rng(seed).random(len(steps)) < fraction
    missing[np.argmin(np.abs(steps - center))] = True
    return np.where(missing, np.nan, icl), missing


@pytest.mark.parametrize("center", [20, 300, 600])  # in the log-spaced part, just after it, every 50
def test_window_found_on_the_evaluation_cadence_despite_missing_values(center):
    steps, tokens = evaluation_steps()
    assert steps[:10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10] and 1450 in steps and 1475 not in steps
    x = np.log(np.maximum(tokens, 1))
    drop = 1.2
    icl = -0.2 - drop / (1 + np.exp(-(x - np.log(center * tokens[1])) / 0.3))  # tokens[1]: tokens per step
    icl_nan, missing = with_missing(steps, icl, center, seed=center)
    assert 0.15 < missing.mean() < 0.4
    pc = detect_phase_change(steps, tokens, icl_nan, **phase_defaults())
    assert pc is not None
    assert pc["onset_step"] < center < pc["end_step"], pc
    assert abs(np.log(pc["peak_step"] / center)) < 0.25, pc
    assert pc["icl_drop"] > 0.75 * drop, pc
    measured = set(steps[~missing].tolist())  # the window's steps are steps that have a value
    assert {pc["onset_step"], pc["peak_step"], pc["end_step"]} <= measured, pc
    assert pc["peak_tokens"] == tokens[steps.tolist().index(pc["peak_step"])]
    # NaN entries are left out, exactly as if those steps had not been measured.
    assert pc == detect_phase_change(steps[~missing], tokens[~missing], icl[~missing], **phase_defaults())


def test_flat_curve_with_missing_values_has_no_window():
    steps, tokens = evaluation_steps()
    icl = -0.2 + np.random.default_rng(1).normal(0, 0.01, len(steps))
    icl_nan, _ = with_missing(steps, icl, center=300, seed=1)
    assert detect_phase_change(steps, tokens, icl_nan, **phase_defaults()) is None
    # A small early gain (in-context token frequencies, under phase.min_drop) is no phase change either.
    x = np.log(np.maximum(tokens, 1))
    small = icl - 0.05 / (1 + np.exp(-(x - np.log(30 * tokens[1])) / 0.3))
    assert detect_phase_change(steps, tokens, with_missing(steps, small, 30, seed=2)[0], **phase_defaults()) is None
    # Too few measured values to tell.
    sparse = np.full(len(steps), np.nan)
    sparse[[5, 30, 50]] = [-0.2, -1.0, -1.4]
    assert detect_phase_change(steps, tokens, sparse, **phase_defaults()) is None
    assert detect_phase_change(steps, tokens, np.full(len(steps), np.nan), **phase_defaults()) is None


def test_rows_in_any_order_give_the_same_window():
    from train.phase import detect_phase_change

    steps = np.arange(1, 2001, 10)
    icl = -1.0 / (1 + np.exp(-(np.log(steps) - np.log(400)) * 6))
    ordered = detect_phase_change(steps, steps * 100, icl)
    shuffled = np.random.default_rng(0).permutation(len(steps))
    assert ordered is not None
    assert detect_phase_change(steps[shuffled], steps[shuffled] * 100, icl[shuffled]) == ordered
