"""`real train` on two CPU ranks (gloo) takes the same steps as one process with the same global batch.

Two layers:

- the command as users run it: ``torchrun --nproc_per_node=2 -m real.loop.train_cli
  --parallel fsdp`` (TRACT: reference CoTs, no sampling) logs the same losses
  (relative 1e-4) and writes the same weights as ``python -m real.loop.train_cli``; the
  2-rank checkpoint then resumes under ``--parallel ddp`` on 2 ranks and in one
  process, each matching the uninterrupted one-process run;
- REAL itself, through ``Trainer`` in spawned ranks: sampling is replaced by a
  deterministic stand-in (so both runs see the same CoTs; the sampler's own
  distributed path is checked in tests/test_distributed.py), and the two-rank
  runs under FSDP (full, and LoRA with gradient checkpointing and a token
  budget small enough to split the groups into micro-batches) and DDP must give
  the one-process losses and weights.  The tiny model ties its LM head to the
  embeddings, and the fused head reads that weight directly, so this is the
  ZeRO-3 trap the distributed module exists for.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib

import pytest
import torch
import torch.multiprocessing as mp
from rank_utils import assert_same_weights, free_port
from safetensors.torch import load_file

from real.loop.config import make_config
from real.judge.prompts import SCORE_MARKER
from real.loop.rollout_groups import Rollouts

pytestmark = pytest.mark.usefixtures("one_thread")

CLI = ["--model", "tiny", "--data", "synthetic", "--device", "cpu", "--synthetic-train-size", "64",
       "--synthetic-eval-size", "8", "--eval-size", "6", "--max-new-tokens", "8", "--prompts-per-step", "4",
       "--lr", "1e-3", "--no-progress", "--eval-every", "0", "--save-every", "2"]
REAL_SCENARIOS = {  # name -> overrides of the REAL run
    "fsdp": dict(parallel="fsdp"),
    "ddp": dict(parallel="ddp"),
    "fsdp-lora-ckpt-microbatches": dict(parallel="fsdp", lora_rank=4, gradient_checkpointing=True,
                                        micro_batch_tokens=160, unsharded_rollouts=True),
    # a second FSDP root (the frozen reference policy) and a pre-pass, with split micro-batches
    "fsdp-kl-microbatches": dict(parallel="fsdp", kl_coef=0.05, micro_batch_tokens=160),
}
REAL_STEPS = 2


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "real.loop.train_cli", *args]
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _one_process(args, cwd):
    done = subprocess.run([sys.executable, "-m", "real.loop.train_cli", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    return done


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r["loss"] for r in map(json.loads, fh) if r["type"] == "train"}


def _weights(folder):
    name = "adapter_model.safetensors" if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")) \
        else "model.safetensors"
    return load_file(os.path.join(folder, name))


def _assert_same_losses(expected, got, steps, what):
    for step in steps:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), f"{what}: step {step}"


def test_torchrun_fsdp_and_ddp_match_one_process_and_resume_across_rank_counts(tmp_path):
    args = ["--method", "tract", *CLI]
    one = str(tmp_path / "one")
    _one_process([*args, "--steps", "4", "--output-dir", one], tmp_path)
    expected = _losses(one)
    assert expected[1] != expected[4], "the steps did not change the loss"

    fsdp = str(tmp_path / "fsdp")
    done = _torchrun([*args, "--steps", "2", "--output-dir", fsdp, "--parallel", "fsdp"], tmp_path)
    assert done.stdout.count("done: 2 steps") == 1  # rank 0 alone reports
    _assert_same_losses(expected, _losses(fsdp), [1, 2], "fsdp")
    assert_same_weights(_weights(os.path.join(one, "checkpoint-2")), _weights(os.path.join(fsdp, "checkpoint-2")),
                         "fsdp, 2 ranks")
    state = json.loads(open(os.path.join(fsdp, "checkpoint-2", "trainer_state.json")).read())
    assert state["world_size"] == 2

    # the 2-rank checkpoint continues on 2 DDP ranks, and in one process
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    shutil.copytree(fsdp, ddp)
    shutil.copytree(fsdp, single)
    _torchrun([*args, "--steps", "4", "--output-dir", ddp, "--parallel", "ddp", "--resume"], tmp_path)
    _one_process([*args, "--steps", "4", "--output-dir", single, "--resume"], tmp_path)
    for name, folder in (("fsdp -> ddp", ddp), ("fsdp -> one process", single)):
        _assert_same_losses(expected, _losses(folder), [1, 2, 3, 4], name)
        assert_same_weights(_weights(os.path.join(one, "checkpoint-4")), _weights(os.path.join(folder, "checkpoint-4")),
                             name)


def test_torchrun_real_samples_through_the_sharded_model(tmp_path):
    """REAL with real sampling (transformers generate inside the FSDP root) on 2 ranks: runs, evaluates, saves."""
    out = str(tmp_path / "real")
    _torchrun(["--method", "real", *CLI, "--steps", "1", "--group-size", "2", "--parallel", "fsdp",
               "--unsharded-rollouts", "--output-dir", out], tmp_path)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    train, evals = [r for r in records if r["type"] == "train"], [r for r in records if r["type"] == "eval"]
    assert len(train) == 1 and train[0]["ranks"] == 2 and train[0]["sequences"] == 8  # 4 prompts x 2, both ranks
    assert train[0]["generated_tokens"] > 0 and train[0]["loss"] == train[0]["loss"]  # sampled, not NaN
    assert len(evals) == 1 and evals[0]["n"] == 6
    assert os.path.isfile(os.path.join(out, "checkpoint-1", "model.safetensors"))


# --- REAL with a deterministic stand-in for sampling --------------------------------------

_PIECES = ["a ok", "b wrong c ok", "ok ok wrong", "wrong", "c ok d ok e wrong", "ok"]


class FixedRollouts:
    """G CoTs per prompt that depend on the prompt alone (not on the rank, batch or RNG)."""

    def generate(self, model, prompts, group_size, *, seed, with_score=False):
        cots = []
        for p in prompts:
            h = zlib.crc32(p.encode())
            cots.extend(f"{_PIECES[(h + 3 * k) % len(_PIECES)]} {SCORE_MARKER}" for k in range(group_size))
        return Rollouts(prompts=[p for p in prompts for _ in range(group_size)], cots=cots,
                        decoded_scores=[None] * len(cots), group_size=group_size)

    def close(self):
        pass


def _real_config(out_dir, **overrides):
    base = dict(method="real", model="tiny", data=["synthetic"], synthetic_train_size=64, synthetic_eval_size=8,
                eval_size=6, prompts_per_step=4, group_size=4, max_new_tokens=8, lr=1e-3, progress=False,
                output_dir=str(out_dir), seed=0, steps=REAL_STEPS, device="cpu")
    base.update(overrides)
    return make_config(**base)


def _real_run(out_dir, **overrides):
    from real.loop.train import Trainer

    trainer = Trainer(_real_config(out_dir, **overrides), log=lambda m: None)
    trainer.engine = FixedRollouts()
    result = trainer.run()
    trainer.close()  # as real.loop.train_cli.main does: nothing may hold the process group at teardown
    losses = [r["loss"] for r in result.records if r["type"] == "train"]
    micro = [r["micro_batches"] for r in result.records if r["type"] == "train"]
    evals = [r for r in result.records if r["type"] == "eval"]
    return losses, micro, evals[-1]


def _worker(rank: int, world: int, port: int, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    warnings.simplefilter("ignore")
    from real.multi_gpu.distributed import cleanup_distributed

    results = {}
    try:  # the first Trainer joins the group; a hang fails within a minute and a half
        for name, overrides in REAL_SCENARIOS.items():
            results[name] = _real_run(os.path.join(workdir, name), collective_timeout=90, **overrides)
    finally:
        left = cleanup_distributed()
    # gloo threads alive at interpreter exit could abort the process: teardown must end them all
    assert not left, f"rank {rank}: gloo threads still running after cleanup_distributed: {left}"
    if rank == 0:
        torch.save(results, os.path.join(workdir, "results.pt"))


def test_real_on_two_ranks_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for name, overrides in REAL_SCENARIOS.items():
        overrides = {k: v for k, v in overrides.items() if k != "parallel"}
        one_dir = tmp_path / f"one-{name}"
        losses, micro, final_eval = _real_run(one_dir, **overrides)
        got_losses, got_micro, got_eval = results[name]
        assert losses[0] != losses[-1], name
        torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(losses), rtol=1e-4, atol=0,
                                   msg=lambda m, name=name: f"{name}: losses differ from one process: {m}")
        assert_same_weights(_weights(one_dir / f"checkpoint-{REAL_STEPS}"),
                             _weights(tmp_path / name / f"checkpoint-{REAL_STEPS}"), name)
        # evaluation splits the held-out prompts over the ranks and gathers the predictions
        assert got_eval["n"] == final_eval["n"] == 6
        assert got_eval["pearson"] == pytest.approx(final_eval["pearson"], abs=1e-4), name
        if "micro_batch_tokens" in overrides:
            assert min(micro) > 1 and min(got_micro) > 1, "the token budget should split the step"


def test_launch_settings_that_cannot_work_on_several_ranks_are_clear_errors(tmp_path):
    from types import SimpleNamespace

    from real.multi_gpu.distributed import DistEnv
    from real.loop.train import Trainer

    def check(world, **overrides):
        cfg = _real_config(tmp_path, **overrides)
        Trainer._check_distributed(SimpleNamespace(config=cfg, env=DistEnv(rank=0, world_size=world)))

    check(2)  # 4 prompts over 2 ranks: fine
    with pytest.raises(ValueError, match="multiple of 3"):
        check(3)
    with pytest.raises(ValueError, match="unsynchronised"):
        check(2, parallel="none")
    check(2, rollout="vllm-colocate")  # vLLM works under torchrun
    check(2, rollout="vllm-server")
    with pytest.raises(ValueError, match="vllm-tensor-parallel-size 4 must divide the 2 ranks"):
        check(2, rollout="vllm-colocate", vllm_tensor_parallel_size=4)


# --- a late rank -----------------------------------------------------------------------------

def _late_worker(rank: int, world: int, port: int, workdir: str) -> None:
    """Rank 1 stops itself (SIGSTOP, as a preempted or hung process would be) at step 2; rank 0 must give up after
    --collective-timeout and say that rank 1 is the late one."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import signal
    import warnings

    warnings.simplefilter("ignore")
    from real.multi_gpu import distributed as dist_utils
    from real.loop.train import Trainer

    trainer = Trainer(_real_config(os.path.join(workdir, "late"), method="tract", steps=5, collective_timeout=4,
                                   parallel="ddp"), log=lambda m: None)
    step_once = trainer.train_step

    def stop_at_step_2(step):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGSTOP)
        return step_once(step)

    trainer.train_step = stop_at_step_2
    try:
        trainer.run()
        message = "no error"
    except dist_utils.CollectiveTimeout as exc:
        message = str(exc)
    if rank == 0:
        with open(os.path.join(workdir, "late.txt"), "w") as fh:
            fh.write(message)
    os._exit(0)  # the group is broken: no teardown


def test_a_stopped_rank_is_named_after_the_collective_timeout(tmp_path):
    import signal
    import time

    ctx = mp.start_processes(_late_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    report = tmp_path / "late.txt"
    try:
        deadline = time.time() + 180
        while not report.exists() and time.time() < deadline:
            time.sleep(0.5)
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(30)
    message = report.read_text()
    assert "--collective-timeout 4 s" in message and "rank 1 has stopped answering" in message, message
    assert "last at step 2" in message, message
