"""real.loop.train when things go wrong: long rows, preemption, resumes that would change the run, non-finite
training, a torn or damaged run directory, and input that must be refused in a sentence.

Each case here failed (silently, by losing work, or with a traceback) before the fixes it names."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from real.loop import checkpoint as ckpt
from real.loop.config import make_config
from real.judge.synthetic import make_splits
import real.loop.train as train_module
from real.loop.train import Trainer
from real.loop.train_cli import main
from real.model import checkpoint_files

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out, **overrides):
    base = dict(model="tiny", data=["synthetic"], synthetic_train_size=64, synthetic_eval_size=8, eval_size=8,
                prompts_per_step=2, group_size=2, max_new_tokens=8, eval_max_new_tokens=8, lr=1e-3,
                progress=False, output_dir=str(out), seed=0, eval_every=0)
    base.update(overrides)
    return make_config(**base)


def _lines(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _quiet(*args, **kwargs):
    return None


# --- 5. long rows ---------------------------------------------------------------------------

def test_generation_respects_the_prompt_and_cot_limits(tmp_path):
    """A very long row (in training and held out) is cut to --max-prompt-tokens before generate sees it, and no
    more than --max-cot-tokens are generated (before: the whole prompt went to generate)."""
    train, held = make_splits(4, 4, seed=0)
    long_train = [dataclasses.replace(e, prompt="word " * 3000 + e.prompt) for e in train[:2]]
    long_held = [dataclasses.replace(held[0], prompt="word " * 3000 + held[0].prompt)] + held[1:]
    trainer = Trainer(_cfg(tmp_path, method="real", steps=1, max_prompt_tokens=48, max_cot_tokens=6,
                           max_new_tokens=32, eval_max_new_tokens=32),
                      train_examples=long_train, eval_examples=long_held, log=_quiet)
    generate, seen = trainer.model.generate, []

    def checked_generate(*args, **kwargs):
        width = kwargs["input_ids"].shape[1]
        seen.append((width, kwargs["generation_config"].max_new_tokens))
        assert width <= 48, f"generate got a {width}-token prompt (--max-prompt-tokens 48)"
        assert kwargs["generation_config"].max_new_tokens <= 6
        return generate(*args, **kwargs)

    trainer.model.generate = checked_generate
    result = trainer.run()
    assert len(seen) >= 2  # rollouts and the evaluation
    assert result.final_eval["n"] == 4


def test_training_on_a_prometheus_file_says_how_many_prompts_are_cut_and_by_how_much(tmp_path):
    """A Prometheus-layout file with long prompts: the run says, once at the start, how many training and
    held-out prompts lose tokens and how many (before: a warning per batch, with no sizes)."""
    rows = [{"orig_instruction": "word " * (400 if i % 2 else 5) + f"question {i}", "orig_response": "an answer",
             "orig_reference_answer": "the reference", "orig_criteria": "Is it right?",
             **{f"orig_score{k}_description": f"level {k}" for k in range(1, 6)},
             "orig_feedback": "Fine.", "orig_score": str(1 + i % 5)} for i in range(12)]
    data = tmp_path / "long.json"
    data.write_text(json.dumps(rows))
    said = []
    Trainer(_cfg(tmp_path / "run", method="tract", data=[str(data)], steps=1, max_prompt_tokens=128,
                 eval_fraction=0.5), log=said.append)
    notes = [line for line in said if "--max-prompt-tokens 128" in line]
    assert len(notes) == 2, said
    assert "of 6 training prompts are longer" in notes[0] and "tokens cut at the median" in notes[0]
    assert "held-out prompts" in notes[1]
    median, most = (int(notes[0].split(": ")[2].split(" tokens cut")[0]),
                    int(notes[0].split("median, ")[1].split(" at most")[0]))
    assert 0 < median <= most and most > 195, notes[0]  # the 200-word prompts lose at least their padding


def test_the_final_checkpoint_is_written_before_the_final_evaluation(tmp_path):
    """An evaluation that dies (e.g. out of memory) no longer takes the run with it; --resume then evaluates."""
    trainer = Trainer(_cfg(tmp_path, method="raft", steps=2), log=_quiet)

    def dies(step):
        raise RuntimeError("out of memory in the evaluation")

    trainer.evaluate = dies
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.run()
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    resumed = Trainer(_cfg(tmp_path, method="raft", steps=2, resume=True), log=_quiet).run()
    assert resumed.last_step == 2 and resumed.final_eval is not None
    assert [r["type"] for r in _lines(tmp_path / "metrics.jsonl")] == ["train", "train", "eval"]


# --- 6. SIGTERM -----------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "real.loop.train_cli", "--method", "raft", "--model", "tiny", "--data",
                             "synthetic", "--synthetic-train-size", "64", "--prompts-per-step", "2", "--steps",
                             "100000", "--no-progress", "--device", "cpu", "--output-dir", str(out)],
                            env=env, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    saved = ckpt.latest_checkpoint(str(out))
    assert saved is not None, err[-3000:]
    last = [r["step"] for r in _lines(metrics) if r["type"] == "train"][-1]
    assert saved.endswith(f"checkpoint-{last}") and "SIGTERM" in err


# --- 7. --resume validates the configuration ------------------------------------------------------

@pytest.fixture
def one_step_run(tmp_path):
    Trainer(_cfg(tmp_path / "base", method="raft", steps=1), log=_quiet).run()
    return tmp_path / "base"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("change,field", [
    (dict(seed=1), "seed"), (dict(method="tract"), "method"), (dict(synthetic_train_size=32), "synthetic_train_size"),
    (dict(lr=0.5), "lr"), (dict(tiny_config={"hidden_size": 96}), "tiny_config"),
])
def test_resume_refuses_a_different_run_naming_the_fields(tmp_path, one_step_run, change, field):
    out = _copy(one_step_run, tmp_path / "again")
    with pytest.raises(ValueError, match=rf"{field}.*--allow-config-change"):
        Trainer(_cfg(out, **dict(dict(method="raft", steps=2, resume=True), **change)), log=_quiet)


def test_resume_with_allow_config_change_uses_and_records_the_new_values(tmp_path, one_step_run):
    out = _copy(one_step_run, tmp_path / "again")
    trainer = Trainer(_cfg(out, method="raft", steps=2, resume=True, lr=0.5, allow_config_change=True), log=_quiet)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.5]
    result = trainer.run()
    assert result.records[0]["lr"] == 0.5
    saved = json.loads(open(os.path.join(result.checkpoint, checkpoint_files.CONFIG_FILE)).read())
    assert saved["lr"] == 0.5
    # settings that only change how (not what) the run computes need no permission
    Trainer(_cfg(out, method="raft", steps=3, resume=True, lr=0.5, eval_every=5, save_every=3,
                 micro_batch_tokens=8192), log=_quiet)


def test_resume_into_another_model_shape_is_a_clear_error(tmp_path, one_step_run):
    out = _copy(one_step_run, tmp_path / "again")
    with pytest.raises(ValueError, match=r"checkpoint-1.*does not fit the model"):
        Trainer(_cfg(out, method="raft", steps=2, resume=True, tiny_config={"hidden_size": 96},
                     allow_config_change=True), log=_quiet)


# --- 8. non-finite training -----------------------------------------------------------------

@pytest.mark.parametrize("method", ["raft", "real"])
def test_a_huge_learning_rate_stops_the_run_without_a_bad_checkpoint(tmp_path, method):
    trainer = Trainer(_cfg(tmp_path, method=method, steps=8, lr=1e30, save_every=1), log=_quiet)
    with pytest.raises(train_module.TrainingFailed, match=r"step 4.*non-finite.*3 steps in a row"):
        trainer.run()
    records = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r.get("update_skipped", False) for r in records] == [False, True, True, True]
    assert [step for step, _ in ckpt.list_checkpoints(str(tmp_path))] == [1]


def test_a_non_finite_learning_rate_is_refused(tmp_path, capsys):
    assert main(["--method", "raft", "--lr", "inf", "--output-dir", str(tmp_path)]) == 2
    assert "lr must be a finite number" in capsys.readouterr().err


def test_one_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path):
    trainer = Trainer(_cfg(tmp_path, method="raft", steps=3), log=_quiet)
    step_once = trainer.method.loss

    def nan_at_step_2(fwd, inputs, norms):
        loss, terms = step_once(fwd, inputs, norms)
        if trainer.stream.position == 4:  # step 2
            loss = loss * float("nan")
        return loss, terms

    trainer.method.loss = nan_at_step_2
    before = None

    def keep(step, record_step=trainer.train_step):
        nonlocal before
        if step == 2:
            before = [p.detach().clone() for p in trainer.trainable]
        record = record_step(step)
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, trainer.trainable)), "the NaN step changed weights"
        return record

    trainer.train_step = keep
    result = trainer.run()
    assert result.last_step == 3 and result.checkpoint.endswith("checkpoint-3")
    assert [r.get("update_skipped", False) for r in result.records if r["type"] == "train"] == [False, True, False]


# --- 9. metrics.jsonl ---------------------------------------------------------------------------

def test_resume_drops_a_torn_last_metrics_line(tmp_path, recwarn):
    Trainer(_cfg(tmp_path, method="raft", steps=2, save_every=1), log=_quiet).run()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"type": "train", "st')  # killed while writing
    logged = []
    Trainer(_cfg(tmp_path, method="raft", steps=3, resume=True), log=logged.append).run()
    assert [(r["type"], r["step"]) for r in _lines(tmp_path / "metrics.jsonl")] == \
        [("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)]
    assert any("torn" in m and "metrics.jsonl" in m for m in logged)


def test_resume_rewrites_metrics_atomically(tmp_path, monkeypatch):
    """A crash while the log is rewritten (resume from an older checkpoint) leaves the old log whole."""
    import builtins

    import real.loop.run_dir

    Trainer(_cfg(tmp_path, method="raft", steps=2, save_every=1), log=_quiet).run()
    os.remove(os.path.join(ckpt.latest_checkpoint(str(tmp_path)), checkpoint_files.STATE_FILE))  # resume from step 1
    before = (tmp_path / "metrics.jsonl").read_text()

    class Crashing:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def write(self, text):
            raise OSError("killed while rewriting")

        writelines = write

    def crashing_open(path, mode="r", *args, **kwargs):
        fh = builtins.open(path, mode, *args, **kwargs)
        return Crashing(fh) if "w" in mode else fh

    monkeypatch.setattr(real.loop.run_dir, "open", crashing_open, raising=False)
    with pytest.raises(ValueError, match="killed while rewriting"):
        Trainer(_cfg(tmp_path, method="raft", steps=3, resume=True), log=_quiet).run()
    assert (tmp_path / "metrics.jsonl").read_text() == before


# --- 10. damaged checkpoints --------------------------------------------------------------------

def _damage(path):
    if path.endswith(".json"):
        with open(path, "w") as fh:
            fh.write("{not json")
    else:
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)


@pytest.fixture
def two_checkpoints(tmp_path):
    Trainer(_cfg(tmp_path / "run", method="raft", steps=2, save_every=1), log=_quiet).run()
    return tmp_path / "run"


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json", "scheduler.pt",
                                  "rng_state.pt"])
def test_a_damaged_checkpoint_is_named_and_resume_falls_back(tmp_path, two_checkpoints, name):
    out = _copy(two_checkpoints, tmp_path / name)
    _damage(str(out / "checkpoint-2" / name))
    with pytest.raises(ValueError, match=rf"checkpoint-2.*{name}"):
        ckpt.verify_checkpoint(str(out / "checkpoint-2"))
    logged = []
    trainer = Trainer(_cfg(out, method="raft", steps=3, resume=True), log=logged.append)
    assert trainer.resume_from.endswith("checkpoint-1") and trainer.step == 1
    assert any("checkpoint-2" in m and name in m and "checkpoint-1" in m for m in logged), logged
    result = trainer.run()
    assert [r["step"] for r in _lines(out / "metrics.jsonl") if r["type"] == "train"] == [1, 2, 3]
    assert result.checkpoint.endswith("checkpoint-3")


def test_loading_a_damaged_checkpoint_names_the_file(tmp_path, two_checkpoints):
    folder = two_checkpoints / "checkpoint-2"
    _damage(str(folder / "optimizer.pt"))
    fresh = Trainer(_cfg(tmp_path / "fresh", method="raft", steps=1), log=_quiet)
    with pytest.raises(ValueError, match="optimizer.pt"):
        ckpt.load_checkpoint(str(folder), model=fresh.model, optimizer=fresh.optimizer)


# --- 11. input refused in a sentence ------------------------------------------------------------

def test_bad_paths_and_tiny_config_are_sentences(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    assert main(["--data", str(tmp_path / "adir"), "--output-dir", str(tmp_path / "o1")]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["--method", "raft", "--output-dir", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["--method", "raft", "--tiny-config", "hidden_size=-5", "--output-dir", str(tmp_path / "o3")]) == 2
    assert "hidden_size" in capsys.readouterr().err


def _rows(path, prompts):
    with open(path, "w") as fh:
        for i, prompt in enumerate(prompts):
            fh.write(json.dumps({"instruction": prompt, "output": f"Feedback: ok [RESULT] {1 + i % 5}",
                                 "orig_score": 1 + i % 5}) + "\n")
    return str(path)


def test_a_one_row_file_warns_that_nothing_is_evaluated(tmp_path):
    data = _rows(tmp_path / "one.jsonl", ["Rate this.\n###Feedback:"])
    logged = []
    Trainer(_cfg(tmp_path / "o", method="raft", steps=1, data=[data]), log=logged.append)
    assert any("no held-out examples" in m for m in logged), logged


def test_rows_on_both_sides_of_the_split_are_dropped_from_the_held_out_side(tmp_path):
    data = _rows(tmp_path / "dup.jsonl", [f"Rate {i % 5}.\n###Feedback:" for i in range(40)])
    logged = []
    trainer = Trainer(_cfg(tmp_path / "o", method="raft", steps=1, data=[data], eval_fraction=0.25),
                      log=logged.append)
    train_prompts = {e.prompt for e in trainer.train_examples}
    assert not any(e.prompt in train_prompts for e in trainer.eval_examples)
    assert any("also in the training split" in m for m in logged), logged
