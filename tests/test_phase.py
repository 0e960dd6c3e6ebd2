import numpy as np

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
