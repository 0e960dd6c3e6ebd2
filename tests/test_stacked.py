"""Stacked ensembles (`seeds=N seed_execution=stacked`): the members in one model with a leading member
dimension, each bit-identical on the CPU to the same member trained as a process (itself the standalone
run of its seed, tests/test_ensemble.py); measured, checkpointed and logged per member; a failing member
stops alone; a killed stack resumes bit-exactly."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ROOT, run_train
from tests.wandb_records import summarize

PROC = Path("/proc")
STEPS = 64  # a log-spaced checkpoint of both kinds of ensemble
ARGS = ("seeds=2", "seed=3", "seed_execution=stacked", f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=0")


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    """Seeds 3 and 4 of the quickstart, stacked, W&B offline."""
    run_dir = tmp_path_factory.mktemp("stacked") / "stack"
    proc = run_train(*ARGS, run_dir=run_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def checkpoint(run_dir, k: int, step: int = STEPS) -> dict:
    return torch.load(run_dir / "members" / str(k) / "checkpoints" / f"step={step:07d}.ckpt", weights_only=True)


def assert_same_member(a_dir, b_dir, k: int, step: int = STEPS) -> None:
    """Member k of two ensembles: the same weights, optimizer state and metric rows up to `step`."""
    a, b = checkpoint(a_dir, k, step), checkpoint(b_dir, k, step)
    assert a.keys() == b.keys() and a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][n], b["state_dict"][n]) for n in a["state_dict"])
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i][key], sb[i][key]) for i in sa for key in ("step", "exp_avg", "exp_avg_sq"))
    assert a["optimizer_states"][0]["param_groups"] == b["optimizer_states"][0]["param_groups"]
    assert (a["loops"], a["lr_schedulers"], a["StreamDataModule"], a["tokens_seen"], a["callbacks"]) == \
           (b["loops"], b["lr_schedulers"], b["StreamDataModule"], b["tokens_seen"], b["callbacks"])
    for name in ("train", "heads", "eval"):
        ta, tb = (pq.read_table(d / "members" / str(k) / "metrics" / f"{name}.parquet").to_pandas() for d in (a_dir, b_dir))
        ta, tb = (t[t.step <= step].reset_index(drop=True) for t in (ta, tb))
        assert len(ta) > 0 and ta.equals(tb), name


def test_each_stacked_member_is_bit_identical_to_the_same_member_as_a_process(stacked, ensemble):
    """The process ensemble's members are the standalone runs of their seeds, bit for bit; so then is
    each stacked member: weights, AdamW moments, loop and data positions, every metric row."""
    for k in (0, 1):
        assert_same_member(stacked[0], ensemble[0], k)
    # and member 0 is not member 1
    assert not torch.equal(checkpoint(stacked[0], 0)["state_dict"]["model.W_E"],
                           checkpoint(stacked[0], 1)["state_dict"]["model.W_E"])


MODEL_OPTIONS = [{}, {"positional": "rotary"}, {"positional": "learned"}, {"positional": "none"},
                 {"layernorm": "final"}, {"layernorm": "none"}, {"smeared_key": True}, {"d_mlp": 32},
                 {"position_layers": 1}, {"freeze_embedding": True},
                 {"n_layers": 3, "positional": "rotary", "position_layers": 1, "smeared_key": True}]


@pytest.mark.parametrize("option", MODEL_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_every_model_option_stacked_is_each_model_alone(option):
    """For every model option: one stacked step gives each member the loss and gradients of its model
    alone, bit for bit, and the batched measurement pass (an accelerator's) each member's own values."""
    import copy

    from train import probes
    from train.measurements import Measurements
    from train.model import AttentionOnlyTransformer
    from train.model_config import ModelConfig
    from train.stacked import StackedLM
    from train.stacked_members import BatchedMeasurements

    cfg = ModelConfig(**{"n_layers": 2, "n_heads": 4, "d_model": 32, "n_ctx": 32, "d_vocab": 16, **option}).checked()
    models = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        models.append(AttentionOnlyTransformer(cfg))
    alone = [copy.deepcopy(m) for m in models]
    stack = StackedLM(models, {}, total_steps=1)
    stack.bind_members()
    tokens = torch.randint(0, 16, (3, 8, 32), generator=torch.Generator().manual_seed(0))
    stack.training_step({"tokens": tokens}, 0).backward()
    stacked_params = dict(stack.model.named_parameters())
    for k, model in enumerate(alone):
        loss = probes.per_token_loss(model(tokens[k]), tokens[k]).mean()
        loss.backward()
        assert torch.equal(stack.member_losses[k], loss.detach())
        for name, p in model.named_parameters():
            assert (p.grad is None) == (stacked_params[name].grad is None), name
            assert p.grad is None or torch.equal(stacked_params[name].grad[k], p.grad), name

    repeated = torch.randint(1, 16, (4, 10), generator=torch.Generator().manual_seed(1)).repeat(1, 4)[:, :31]
    probe = torch.cat([torch.zeros(4, 1, dtype=torch.long), repeated], dim=1)
    late, early = probes.icl_positions(32)
    measurements = Measurements(probe, tokens[0], 10, late, early)
    measurements.max_logits = 6 * 32 * 16  # the evaluation set in chunks of 6 sequences, 2 in the batched pass
    batched = BatchedMeasurements(measurements, stack)
    assert batched.every_member.max_logits == 2 * 32 * 16  # all members' logits at once: the same memory
    batched = batched.values(scores=True, evaluate=True)
    for k in range(3):
        own = measurements(stack.member_models[k], scores=True, evaluate=True)
        assert own.keys() == batched.keys()
        for name in own:  # the same values up to float32 rounding: the pass's matrix products are blocked
            # for the stack's shapes (bit for bit at the quickstart's: test_a_non_finite_member_stops_alone)
            torch.testing.assert_close(batched[name][k], own[name], rtol=1e-5, atol=1e-6, msg=name)


def test_stacked_summary_report_wandb_and_member_loading(stacked):
    run_dir, proc = stacked
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["seeds"] == [3, 4] and s["finished"] == 2
    assert s["execution"]["stacked"] == 2
    assert "Ensemble finished: 2/2 seeds (3-4) finished, stacked x" in proc.stdout
    assert "member 1 (seed 4): finished" in proc.stdout
    for k in (0, 1):
        member = json.loads((run_dir / "members" / str(k) / "summary.json").read_text())
        assert member["status"] == "finished" and member["steps"] == STEPS
    heads = pq.read_table(run_dir / "metrics" / "heads.parquet").to_pandas()
    assert sorted(set(zip(heads.member, heads.seed))) == [(0, 3), (1, 4)]
    # W&B: one run per member in one process, in one group named for the ensemble, each finished.
    runs = [summarize(next((run_dir / "members" / str(k) / "wandb").glob("offline-run-*/run-*.wandb")))
            for k in (0, 1)]
    assert [r["group"] for r in runs] == ["stack", "stack"] and [r["name"] for r in runs] == ["stack-seed3", "stack-seed4"]
    assert all(r["finished"] for r in runs) and runs[0]["id"] != runs[1]["id"]
    assert max(runs[1]["global_steps"]) == STEPS
    # A member loads as a standalone model; the stacked checkpoint holds both.
    from analysis import Run

    model = Run(run_dir / "members" / "1").model(STEPS)
    ckpt = checkpoint(run_dir, 1)
    assert torch.equal(model.W_E, ckpt["state_dict"]["model.W_E"])
    both = torch.load(run_dir / "checkpoints" / "stacked.ckpt", weights_only=True)
    assert torch.equal(both["state_dict"]["model.W_E"][1], ckpt["state_dict"]["model.W_E"])
    assert both["alive"].tolist() == [True, True]


def test_a_non_finite_member_stops_alone(stacked, compose_cfg, tmp_path, monkeypatch):
    """Member 1's weights turn NaN at step 5: it fails with its own error and keeps only the checkpoints
    before it; member 0 ends bit-identical to member 0 of the stack without the NaN. Measured here in one
    batched pass for both members (as on a GPU): the same values, bit for bit, as measured one by one."""
    import train.stacked_members as members
    from train.ensemble import run_ensemble
    from train.stacked import StackedLM

    monkeypatch.setattr(members, "batch_measurements", lambda device: True)
    passes = []
    values = members.BatchedMeasurements.values
    monkeypatch.setattr(members.BatchedMeasurements, "values",
                        lambda self, *a: passes.append(self.cache is None or self.cache[0][0] != self.stacked.global_step)
                        or values(self, *a))

    step_of = StackedLM.training_step

    def poisoned(self, batch, batch_idx):
        if self.global_step == 5:
            with torch.no_grad():
                self.model.W_U[1] = float("nan")
        return step_of(self, batch, batch_idx)

    monkeypatch.setattr(StackedLM, "training_step", poisoned)
    run_dir = tmp_path / "nan"
    cfg = compose_cfg(*ARGS, "logger=none", "trainer.enable_progress_bar=false")
    lines = []
    s = run_ensemble(cfg, run_dir, (None, "nan"), echo=lines.append)
    assert s["status"] == "failed" and s["finished"] == 1
    assert [(f["member"], f["seed"]) for f in s["failed"]] == [(1, 4)]
    assert s["failed"][0]["error"].startswith("non-finite training loss at step 6")
    assert any(line.startswith("  member 1 (seed 4): failed") for line in lines)
    assert sum(passes) == STEPS  # one batched pass at each step but step 0 (the costly scores: per member)
    member1 = json.loads((run_dir / "members" / "1" / "summary.json").read_text())
    assert member1["status"] == "failed" and "non-finite" in member1["error"]
    index = json.loads((run_dir / "members" / "1" / "checkpoints" / "index.json").read_text())["checkpoints"]
    assert [e["step"] for e in index] == [0, 1, 2, 4]
    assert_same_member(run_dir, stacked[0], 0)
    both = torch.load(run_dir / "checkpoints" / "stacked.ckpt", weights_only=True)
    assert both["alive"].tolist() == [True, False]
    assert not both["state_dict"]["model.W_U"][1].any()  # stopped at zero, where it stays


def test_a_stack_whose_members_all_fail_stops(compose_cfg, tmp_path, monkeypatch):
    """Both members turn NaN at step 5: each fails alone at its guard's next check (the checkpoint of
    step 8), and the stack then stops, as a standalone run would, instead of training zeros to the end."""
    from train.ensemble import run_ensemble
    from train.stacked import StackedLM

    step_of = StackedLM.training_step
    trained = []

    def poisoned(self, batch, batch_idx):
        trained.append(self.global_step)
        if self.global_step == 5:
            with torch.no_grad():
                self.model.W_U.fill_(float("nan"))
        return step_of(self, batch, batch_idx)

    monkeypatch.setattr(StackedLM, "training_step", poisoned)
    run_dir = tmp_path / "nan"
    s = run_ensemble(compose_cfg(*ARGS, "logger=none", "trainer.enable_progress_bar=false"), run_dir, (None, "nan"),
                     echo=lambda line: None)
    assert [f["member"] for f in s["failed"]] == [0, 1] and s["finished"] == 0
    assert max(trained) == 7  # the step whose update made step 8: then it stopped
    train = pq.read_table(run_dir / "metrics" / "train.parquet").to_pandas()
    assert train.step.max() < 8  # the rows from the NaN on are not kept
    assert torch.load(run_dir / "checkpoints" / "stacked.ckpt", weights_only=True)["global_step"] == 4
    member = json.loads((run_dir / "members" / "0" / "summary.json").read_text())
    assert member["status"] == "failed" and member["steps"] < 8


def test_a_stack_stopped_by_an_error_resumes_every_member(stacked, compose_cfg, tmp_path, monkeypatch):
    """Member 1's metrics cannot be written once (a full disk) at the last step: the whole stack stops
    there (a member that stopped alone could not rejoin the stack), every member reports it, and
    `resume=` continues both from the stacked checkpoint to the uninterrupted stack's ends, bit for bit."""
    import errno

    from train.ensemble import run_ensemble
    from train.metrics_sink import MetricsSink

    write, failed = MetricsSink.write_rows, []

    def full_once(self, rows, *args, **kwargs):
        path = self.tables["train"].path
        if not failed and path.parts[-3] == "1" and rows and rows[-1].step == STEPS:
            failed.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(self, rows, *args, **kwargs)

    monkeypatch.setattr(MetricsSink, "write_rows", full_once)
    run_dir = tmp_path / "full"
    args = (*ARGS, "logger=none", "trainer.enable_progress_bar=false")
    s = run_ensemble(compose_cfg(*args), run_dir, (None, "full"), echo=lambda line: None)
    assert failed and s["status"] == "failed" and s["finished"] == 0
    assert [f["member"] for f in s["failed"]] == [0, 1]
    assert all(f["error"].startswith(f"the stack stopped at step {STEPS} (") and "No space left" in f["error"]
               and f["error"].endswith(f"resume= continues it from step {STEPS // 2}") for f in s["failed"])
    assert torch.load(run_dir / "checkpoints" / "stacked.ckpt", weights_only=True)["global_step"] == STEPS // 2
    s = run_ensemble(compose_cfg(*args, f"resume={run_dir}"), run_dir, (None, "full"), echo=lambda line: None)
    assert s["status"] == "finished" and s["finished"] == 2
    for k in (0, 1):
        assert_same_member(run_dir, stacked[0], k)


def test_a_stack_killed_before_its_summaries_resumes_to_them(stacked, tmp_path):
    """Killed after the stacked checkpoint of the last step, before the summaries: `resume=` has no step
    left to train and writes every member's summary, and the ensemble's, as the run would have."""
    import shutil

    run_dir = tmp_path / "stack"
    shutil.copytree(stacked[0], run_dir)
    for path in [run_dir / "summary.json", *run_dir.glob("members/*/summary.json")]:
        path.unlink()
    proc = run_train(*ARGS, "logger=none", f"resume={run_dir}", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["finished"] == 2
    for k in (0, 1):
        before, after = (json.loads((d / "members" / str(k) / "summary.json").read_text())
                         for d in (stacked[0], run_dir))
        assert after["status"] == "finished"
        assert {key: after[key] for key in ("steps", "tokens", "final", "phase_change", "heads")} == \
               {key: before[key] for key in ("steps", "tokens", "final", "phase_change", "heads")}


def test_a_killed_stack_resumes_bit_exactly(stacked, tmp_path):
    """SIGKILL after step 32's checkpoints; `resume=` with the same overrides continues from the stacked
    checkpoint, and both members end as the uninterrupted stack's, metric rows included."""
    run_dir = tmp_path / "stack"
    cmd = [sys.executable, "-m", "train", *ARGS, "logger=none", "trainer.enable_progress_bar=false"]
    proc = subprocess.Popen([*cmd, f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stacked_ckpt = run_dir / "checkpoints" / "stacked.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if stacked_ckpt.exists() and torch.load(stacked_ckpt, weights_only=True)["global_step"] >= 32:
            break
        time.sleep(0.05)
    loader = [int(pid) for pid in (PROC / str(proc.pid) / "task" / str(proc.pid) / "children")
              .read_text().split()]
    assert loader  # the data-loader worker
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 10  # it ends with the killed run (train/parent_watch.py)
    while time.time() < deadline and any((PROC / str(pid)).exists() for pid in loader):
        time.sleep(0.1)
    assert not any((PROC / str(pid)).exists() for pid in loader)
    killed_at = torch.load(stacked_ckpt, weights_only=True)["global_step"]
    assert 32 <= killed_at < STEPS, killed_at
    done = subprocess.run([*cmd, f"hydra.run.dir={run_dir}", f"resume={run_dir}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for k in (0, 1):
        assert_same_member(run_dir, stacked[0], k)
    assert json.loads((run_dir / "summary.json").read_text())["finished"] == 2
