import numpy as np
import pytest
import torch

from train import probes
from train.data.synthetic import RepeatedTokens, batch_rng


def one_hot_pattern(batch: int, t: int, target) -> torch.Tensor:
    """A pattern `[batch, 1, t, t]` where query i attends fully to key target(i)."""
    p = torch.zeros(batch, 1, t, t)
    for i in range(t):
        p[:, 0, i, target(i)] = 1.0
    return p


def test_previous_token_score_known_answers():
    t = 10
    prev = one_hot_pattern(2, t, lambda i: max(i - 1, 0))
    bos = one_hot_pattern(2, t, lambda i: 0)
    uniform = torch.ones(2, 1, t, t).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    assert probes.previous_token_score(prev).item() == pytest.approx(1.0)
    assert probes.previous_token_score(bos).item() == pytest.approx(1 / (t - 1))  # only i=1 hits 0
    expected = np.mean([1 / (i + 1) for i in range(1, t)])
    assert probes.previous_token_score(uniform).item() == pytest.approx(expected)


def test_prefix_matching_score_known_answers():
    r, t = 5, 16
    tokens = torch.from_numpy(RepeatedTokens(20, t, r)(batch_rng(0, 0, "probe"), 3))
    # An ideal induction head: query i (in a later repeat) attends to i - r + 1, the token after the
    # previous occurrence of its own token.
    induction = one_hot_pattern(3, t, lambda i: i - r + 1 if i > r else 0)
    assert probes.prefix_matching_score(induction, tokens).item() == pytest.approx(1.0)
    # Attending to the previous occurrence itself (not the token after it) scores 0.
    duplicate = one_hot_pattern(3, t, lambda i: i - r if i > r else 0)
    assert probes.prefix_matching_score(duplicate, tokens).item() == pytest.approx(0.0)
    # Half the attention on the right place: 0.5.
    half = 0.5 * induction + 0.5 * duplicate
    assert probes.prefix_matching_score(half, tokens).item() == pytest.approx(0.5)


def test_prefix_matching_mask_marks_the_token_after_each_earlier_occurrence():
    tokens = torch.tensor([[0, 7, 3, 7, 9, 7]])
    mask = probes.prefix_matching_mask(tokens)[0]
    # Query 5 (token 7): earlier 7s at 1 and 3, so keys 2 and 4 match.
    assert mask[5].nonzero().flatten().tolist() == [2, 4]
    # Query 3 (token 7): the earlier 7 at 1, so key 2.
    assert mask[3].nonzero().flatten().tolist() == [2]
    # Query 1: no earlier occurrence.
    assert not mask[1].any()


def test_icl_score_and_positions():
    # The paper's single positions (span 1): 500 and 50 of 512, scaled to the context.
    assert probes.icl_positions(512, span=1) == (slice(500, 501), slice(50, 51))
    assert probes.icl_positions(128, span=1) == (slice(125, 126), slice(12, 13))
    assert probes.icl_positions(128, late=100, early=10, span=1) == (slice(100, 101), slice(10, 11))
    # Windows a factor of 2 wide in position, centred in log position: 50/sqrt2 .. 50*sqrt2 = 36..70;
    # the late window is cut at the last index (510).
    assert probes.icl_positions(512) == (slice(354, 511), slice(36, 71))
    with pytest.raises(ValueError):
        probes.icl_positions(128, late=5, early=10)
    with pytest.raises(ValueError, match="overlap"):
        probes.icl_positions(128, late=20, early=10, span=4)
    losses = torch.zeros(4, 127)
    losses[:, 125] = 1.0
    losses[:, 12] = 3.0
    assert probes.icl_score(losses, 125, 12).item() == pytest.approx(-2.0)
    late, early = probes.icl_positions(128)  # 89..126 and 9..16
    losses = torch.zeros(4, 127)
    losses[:, 89:127] = 1.0
    losses[:, 9:17] = torch.arange(8.0)  # mean 3.5
    losses[:, 17] = 100.0  # outside both windows
    assert probes.icl_score(losses, late, early).item() == pytest.approx(1.0 - 3.5)


def test_per_token_loss_and_induction_loss():
    tokens = torch.tensor([[0, 1, 2, 1, 2]])
    logits = torch.full((1, 5, 4), -1e4)
    logits[0, torch.arange(4), tokens[0, 1:]] = 1e4  # perfect predictions
    logits[0, 0] = 0.0  # uniform at the first position
    losses = probes.per_token_loss(logits, tokens)
    assert losses.shape == (1, 4)
    assert losses[0, 0].item() == pytest.approx(np.log(4))
    assert losses[0, 1:].abs().max().item() < 1e-4
    assert probes.induction_loss(losses, rep_len=2).item() == pytest.approx(0.0, abs=1e-4)


def test_copying_score_known_answers():
    tokens = torch.tensor([[1, 2, 3]])
    unembed = torch.eye(4)  # the residual stream is the logits
    pattern = torch.zeros(1, 1, 3, 3)
    pattern[0, 0, :, 0] = 1.0  # every query attends to position 0, token 1
    copy = torch.zeros(1, 1, 3, 4)
    copy[..., 1] = 5.0  # raises token 1: what it attends to
    other = torch.zeros(1, 1, 3, 4)
    other[..., 3] = 5.0  # raises token 3: never attended
    # One attended token of 4: a raise spread evenly would put 1/4 on it (chance).
    assert probes.copying_score(copy, pattern, tokens, unembed).item() == pytest.approx(1.0)
    assert probes.copying_score(other, pattern, tokens, unembed).item() == pytest.approx((0 - 0.25) / 0.75)
    both = copy + other  # half the raise on the attended token
    assert probes.copying_score(both, pattern, tokens, unembed).item() == pytest.approx((0.5 - 0.25) / 0.75)
    assert probes.copying_score(torch.zeros(1, 1, 3, 4), pattern, tokens, unembed).item() == 0.0  # raises nothing


def test_copying_score_of_a_head_unrelated_to_its_attention_is_near_zero():
    g = torch.Generator().manual_seed(0)
    V, T, B = 64, 40, 16
    tokens = torch.randint(0, V, (B, T), generator=g)
    pattern = torch.rand(B, 1, T, T, generator=g).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    random_out = torch.randn(B, 1, T, V, generator=g)  # logits unrelated to what the head attends to
    assert abs(probes.copying_score(random_out, pattern, tokens, torch.eye(V)).item()) < 0.05
    # A head attending to one earlier position per query (as an induction head does) and raising that
    # token, over a little noise: a copying head.
    keys = (torch.rand(B, T, generator=g) * torch.arange(1, T + 1)).long()  # key <= query
    sharp = torch.nn.functional.one_hot(keys, T).float()[:, None]  # [B, 1, T, T]
    attended = torch.gather(tokens, 1, keys)
    copying = 3 * torch.nn.functional.one_hot(attended, V).float()[:, None]
    assert probes.copying_score(copying, sharp, tokens, torch.eye(V)).item() == pytest.approx(1.0)
    # Noise over the other 63 tokens takes most of the raise (about 0.3 of it stays on the copied
    # token), yet the score stays clearly above the unrelated head's 0.
    assert probes.copying_score(copying + 0.3 * random_out, sharp, tokens, torch.eye(V)).item() > 0.2


def test_evaluation_cadence_is_log_spaced_then_linear():
    from train.measurements import eval_due

    steps = [s for s in range(0, 260) if eval_due(s, 50)]
    assert steps[:9] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    early = [s for s in steps if 8 < s < 50]
    ratios = np.diff(np.log2(early))
    assert len(early) == 10 and np.all(ratios > 0.1) and np.all(ratios < 0.4)  # about 4 per doubling
    assert [s for s in steps if s >= 50] == [50, 100, 150, 200, 250]
    assert [s for s in range(0, 40) if eval_due(s, 10)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 20, 30]


def test_cadence_costly_scores_only_with_both_cheap_scores_and_evaluation():
    from train.measurements import Cadence

    cadence = Cadence(every_n_steps=2, eval_every_n_steps=10, circuits_every_n_steps=20)
    due = {s: cadence.at(s) for s in range(0, 61)}
    assert [s for s, d in due.items() if d.circuits] == [0, 20, 40, 60]
    assert all(d.scores == (s % 2 == 0) for s, d in due.items())
    assert not due[3].scores and due[3].evaluate  # log-spaced evaluation before step 10, odd steps too
    off = Cadence(enabled=False).at(0)
    assert not (off.scores or off.evaluate or off.circuits)
