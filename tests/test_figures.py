"""`python -m analysis figures` on constructed run directories whose content the test writes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from analysis.figures import FIGURES, heads_heatmap, make_figures
from analysis.figures.pca import joint_pca
from analysis.runs import AnalysisError

N_CTX, EVAL_SIZE, N_HEADS = 16, 4, 2
STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 100]
TOKENS_PER_STEP = 1000


def write_run(run_dir, compose_cfg, n_layers=2, smeared=False, d_mlp=0, eval_seed=1234, window=(8, 32),
              token_losses=None, ablation=False, metrics=True):
    """A run directory with known content: an ICL curve falling over `window` (steps), per-head scores,
    per-token losses (`token_losses [checkpoint, eval * (n_ctx - 1)]`, random if None), a checkpoint."""
    cfg = compose_cfg("logger=none", f"model.n_layers={n_layers}", f"model.n_heads={N_HEADS}", "model.d_model=16",
                      f"model.n_ctx={N_CTX}", f"model.smeared_key={str(smeared).lower()}", f"model.d_mlp={d_mlp}",
                      f"data.eval_size={EVAL_SIZE}", f"data.eval_seed={eval_seed}", "probes.rep_len=5")
    run_dir.mkdir(parents=True)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    cfg_dict.pop("hydra", None)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg_dict)))
    if not metrics:
        return run_dir
    m = run_dir / "metrics"
    m.mkdir()
    rng = np.random.default_rng(n_layers + 10 * smeared)
    detected, window = window, window or (8, 32)  # window=None: the curve falls, no phase change recorded
    steps = np.arange(0, STEPS[-1] + 1)
    tokens = steps * TOKENS_PER_STEP
    icl = np.where(steps < window[0], -0.1, np.where(steps > window[1], -1.0, -0.1 - 0.9 * (steps - window[0]) /
                                                    (window[1] - window[0])))
    loss = 4.0 - 0.01 * steps + icl
    pq.write_table(pa.table({"step": steps, "tokens": tokens, "loss": loss, "icl_score": icl,
                             "induction_loss": loss}), m / "train.parquet")
    heads = [{"step": int(s), "tokens": int(t), "layer": layer, "head": head,
              "previous_token": 0.9 * (layer == 0 and head == 0) * min(1, s / window[1]),
              "prefix_matching": 0.8 * (layer == n_layers - 1 and head == 1) * min(1, s / window[1]) + 0.02}
             for s, t in zip(steps, tokens) for layer in range(n_layers) for head in range(N_HEADS)]
    pq.write_table(pa.Table.from_pylist(heads), m / "heads.parquet")
    ev = steps[::4]
    by_pos = [list(4.0 - (1 - i / 99) * np.log1p(np.arange(N_CTX - 1)) * 0.2) for i in ev]
    pq.write_table(pa.table({"step": ev, "tokens": ev * TOKENS_PER_STEP, "loss": loss[ev], "icl_score": icl[ev],
                             "loss_by_position": by_pos}), m / "eval.parquet")
    if token_losses is None:
        token_losses = rng.normal(size=(len(STEPS), EVAL_SIZE * (N_CTX - 1)))
    pq.write_table(pa.table({"step": STEPS, "tokens": [s * TOKENS_PER_STEP for s in STEPS],
                             "token_losses": [list(map(float, row)) for row in token_losses]}),
                   m / "eval_token_losses.parquet")
    head_records = [{"layer": layer, "head": head,
                     "class": "induction" if (layer == n_layers - 1 and head == 1 and (n_layers > 1 or smeared))
                     else "previous_token" if (layer == 0 and head == 0) else "other",
                     "prefix_matching": 0.8 if (layer == n_layers - 1 and head == 1) else 0.02,
                     "previous_token": 0.9 if (layer == 0 and head == 0) else 0.05}
                    for layer in range(n_layers) for head in range(N_HEADS)]
    summary = {"status": "finished", "steps": STEPS[-1], "tokens": STEPS[-1] * TOKENS_PER_STEP,
               "phase_change": {"onset_step": window[0], "peak_step": sum(window) // 2, "end_step": window[1],
                                "onset_tokens": window[0] * TOKENS_PER_STEP + 7,  # not on a grid point
                                "peak_tokens": sum(window) // 2 * TOKENS_PER_STEP,
                                "end_tokens": window[1] * TOKENS_PER_STEP + 3,
                                "icl_at_onset": -0.1, "icl_at_end": -1.0} if detected else None,
               "heads": head_records}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    from train.build import build_model

    ckpt = run_dir / "checkpoints"
    ckpt.mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in build_model(cfg).state_dict().items()}},
               ckpt / "step=0000100.ckpt")
    (ckpt / "index.json").write_text(json.dumps(
        {"checkpoints": [{"step": 100, "tokens": 100 * TOKENS_PER_STEP, "file": "step=0000100.ckpt"}]}))
    if ablation:
        (run_dir / "analysis").mkdir()
        rows = [{"step": s, "tokens": s * TOKENS_PER_STEP, "method": "zero", "heads": f"{layer}.{head}",
                 "layer": layer, "head": head, "n_ablated": 1, "delta_icl_score": 0.1 * layer + 0.01 * s}
                for s in (0, 16, 64, 100) for layer in range(n_layers) for head in range(N_HEADS)]
        rows.append({**rows[0], "heads": "0.0+0.1", "layer": None, "head": None, "n_ablated": 2})
        pq.write_table(pa.Table.from_pylist(rows), run_dir / "analysis" / "ablation_zero.parquet")
    return run_dir


@pytest.fixture
def three_runs(tmp_path, compose_cfg):
    return [write_run(tmp_path / "runs" / "two", compose_cfg, n_layers=2, ablation=True),
            write_run(tmp_path / "runs" / "one", compose_cfg, n_layers=1, window=None),
            write_run(tmp_path / "runs" / "smeared", compose_cfg, n_layers=1, smeared=True, window=(4, 16))]


def test_joint_pca_recovers_a_known_plane():
    rng = np.random.default_rng(0)
    dim = 40
    u, v = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T  # an orthonormal basis of a plane
    mean = rng.normal(size=dim)
    # Coordinates in the plane: centered, uncorrelated columns with different spreads, so the
    # principal axes are u and v themselves.
    t = np.linspace(-1, 1, 12)
    coords = np.stack([3 * t, np.cos(np.pi * t) - np.cos(np.pi * t).mean()], axis=1)
    coords[:, 1] -= coords[:, 0] * (coords[:, 0] @ coords[:, 1]) / (coords[:, 0] @ coords[:, 0])
    points = mean + coords @ np.stack([u, v])
    got, explained, components, _ = joint_pca([points[:5], points[5:]], k=2)  # two models, fitted jointly
    got = np.concatenate(got)
    for i, axis in enumerate((u, v)):
        sign = np.sign(components[i] @ axis)
        np.testing.assert_allclose(components[i], sign * axis, atol=1e-10)
        np.testing.assert_allclose(got[:, i], sign * coords[:, i], atol=1e-10)
    np.testing.assert_allclose(explained.sum(), 1.0, atol=1e-12)
    assert explained[0] > explained[1]


def test_pca_figure_projects_each_models_checkpoints(tmp_path, compose_cfg):
    rng = np.random.default_rng(1)
    dim = EVAL_SIZE * (N_CTX - 1)
    basis = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T
    a = np.stack([np.arange(len(STEPS)), np.zeros(len(STEPS))], 1) * 2.0
    b = np.stack([np.arange(len(STEPS)), np.ones(len(STEPS))], 1) * 2.0
    r1 = write_run(tmp_path / "a", compose_cfg, token_losses=a @ basis + 5)
    r2 = write_run(tmp_path / "b", compose_cfg, n_layers=1, token_losses=b @ basis + 5)
    make_figures([r1, r2], tmp_path / "out", only=["pca"], log=lambda s: None)
    t = pq.read_table(tmp_path / "out" / "05_pca.parquet").to_pylist()
    pc1 = {m: [r["pc1"] for r in t if r["model"] == m] for m in ("2L", "1L")}
    pc2 = {m: [r["pc2"] for r in t if r["model"] == m] for m in ("2L", "1L")}
    # PC1 runs along the training direction (spacing 2 per checkpoint), PC2 separates the models by 2.
    assert np.allclose(np.abs(np.diff(pc1["2L"])), 2.0) and np.allclose(pc1["2L"], pc1["1L"])
    assert np.allclose(np.abs(np.array(pc2["2L"]) - np.array(pc2["1L"])), 2.0)


def test_shaded_window_equals_summary(three_runs):
    from analysis.figures.curves import icl_figure
    from analysis.figures.run_set import open_runs

    runs = open_runs(three_runs, log=lambda s: None)
    plot = icl_figure(runs)
    spans = {p.get_gid(): p for p in plot.fig.axes[0].patches if (p.get_gid() or "").startswith("phase_change:")}
    for r in runs:
        pc = json.loads((r.path / "summary.json").read_text())["phase_change"]
        if pc is None:
            assert f"phase_change:{r.label}" not in spans
            continue
        patch = spans[f"phase_change:{r.label}"]
        if hasattr(patch, "get_width"):
            x0, x1 = patch.get_x(), patch.get_x() + patch.get_width()
        else:
            xs = np.asarray(patch.get_xy())[:, 0]
            x0, x1 = xs.min(), xs.max()
        assert (x0, x1) == (pc["onset_tokens"], pc["end_tokens"])
        rows = [row for row in plot.data.to_pylist() if row["model"] == r.label]
        assert {(row["phase_onset_tokens"], row["phase_end_tokens"]) for row in rows} == \
            {(pc["onset_tokens"], pc["end_tokens"])}


def test_every_figure_and_its_data_is_written_and_indexed(three_runs, tmp_path):
    out = tmp_path / "figs"
    entries = make_figures(three_runs, out, log=lambda s: None)
    assert [e.stem for e in entries] == [stem for stem, _ in FIGURES]
    assert all(e.skipped is None for e in entries), [(e.stem, e.skipped) for e in entries if e.skipped]
    index_html = (out / "index.html").read_text()
    index_md = (out / "index.md").read_text()
    for stem, _ in FIGURES:
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert pq.read_table(out / f"{stem}.parquet").num_rows > 0
        assert f'src="{stem}.png"' in index_html and f"({stem}.png)" in index_md
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp file
    ablation = pq.read_table(out / "07_ablation.parquet").to_pylist()
    assert {r["model"] for r in ablation} == {"2L"} and all(r["layer"] is not None for r in ablation)
    smeared = pq.read_table(out / "06_smeared_key.parquet").to_pylist()
    assert {r["model"] for r in smeared} == {"1L", "1L smeared"}
    attention = pq.read_table(out / "09_attention.parquet").to_pylist()
    best = {(r["model"], r["selected_by"]): (r["layer"], r["head"]) for r in attention}
    assert best[("2L", "prefix_matching")] == (1, 1) and best[("2L", "previous_token")] == (0, 0)
    assert len(attention) == 3 * 2 * N_CTX * N_CTX


def test_a_single_run_skips_what_it_cannot_support(tmp_path, compose_cfg):
    run = write_run(tmp_path / "run", compose_cfg)
    notes = []
    entries = make_figures([run], tmp_path / "out", log=notes.append)
    skipped = {e.stem for e in entries if e.skipped}
    assert skipped == {"06_smeared_key", "07_ablation", "08_model_table"}
    assert all(any(n.startswith(f"note: {s} skipped: ") for n in notes) for s in skipped)
    index = (tmp_path / "out" / "index.md").read_text()
    assert "## Not made" in index and "Smeared key" in index.split("## Not made")[1]
    assert not (tmp_path / "out" / "06_smeared_key.png").exists()


def test_a_sweep_directory_expands_to_its_jobs(tmp_path, compose_cfg):
    sweep = tmp_path / "sweep"
    write_run(sweep / "0_model.n_layers=1", compose_cfg, n_layers=1)
    write_run(sweep / "1_model.n_layers=2", compose_cfg, n_layers=2)
    (sweep / "2_model.n_layers=3" / ".hydra").mkdir(parents=True)  # a job that never got going
    notes = []
    make_figures([sweep], tmp_path / "out", only=["icl_score"], log=notes.append)
    models = {r["model"] for r in pq.read_table(tmp_path / "out" / "01_icl_score.parquet").to_pylist()}
    assert models == {"1L", "2L"}
    assert any("2_model.n_layers=3" in n and "left out" in n for n in notes)


def test_pca_refuses_runs_with_different_evaluation_sets(tmp_path, compose_cfg):
    a = write_run(tmp_path / "a", compose_cfg, eval_seed=1)
    b = write_run(tmp_path / "b", compose_cfg, n_layers=1, eval_seed=2)
    with pytest.raises(AnalysisError, match=r"data\.eval_seed=2 .*different evaluation sets"):
        make_figures([a, b], tmp_path / "out", only=["pca"], log=lambda s: None)
    entries = {e.stem: e for e in make_figures([a, b], tmp_path / "out2", only=["icl_score", "pca"], strict=False,
                                               log=lambda s: None)}
    assert "data.eval_seed" in entries["05_pca"].skipped
    assert entries["01_icl_score"].skipped is None  # the other figures are still made


def test_labels_come_from_the_config(tmp_path, compose_cfg):
    from analysis.figures.run_set import open_runs

    dirs = [write_run(tmp_path / "a", compose_cfg, n_layers=2, d_mlp=32),
            write_run(tmp_path / "b", compose_cfg, n_layers=1, smeared=True),
            write_run(tmp_path / "c", compose_cfg, n_layers=1),
            write_run(tmp_path / "d", compose_cfg, n_layers=1)]
    assert [r.label for r in open_runs(dirs, log=lambda s: None)] == ["2L MLP", "1L smeared", "1L (c)", "1L (d)"]


def one_line_error(capsys, argv):
    from analysis.__main__ import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_bad_input_is_one_line_naming_it(tmp_path, compose_cfg, capsys):
    missing = tmp_path / "nope"
    assert str(missing) in one_line_error(capsys, ["figures", str(missing), "--out", str(tmp_path / "o")])
    bare = write_run(tmp_path / "bare", compose_cfg, metrics=False)
    err = one_line_error(capsys, ["figures", str(bare), "--out", str(tmp_path / "o")])
    assert str(bare / "metrics" / "train.parquet") in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in one_line_error(capsys, ["figures", str(empty), "--out", str(tmp_path / "o")])
    good = write_run(tmp_path / "good", compose_cfg)
    assert "--only nonsense" in one_line_error(capsys, ["figures", str(good), "--only", "nonsense",
                                                         "--out", str(tmp_path / "o")])


def test_heads_heatmap_is_a_figure_of_both_scores():
    import matplotlib.pyplot as plt

    pm = np.array([[0.0, 0.1, 0.2], [0.9, 0.1, 0.0]])
    pt = np.array([[0.8, 0.0, 0.1], [0.0, 0.0, 0.1]])
    fig = heads_heatmap(pm, pt, title="step 100")
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 2
    np.testing.assert_array_equal(images[0], pm)
    np.testing.assert_array_equal(images[1], pt)
    assert "0.90" in [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)
    with pytest.raises(ValueError):
        heads_heatmap(pm, pt[:1])
