"""``real eval``: score a judge on benchmark files, as the paper reports it.

Three sources of predictions, one table (Pearson / Spearman / Kendall x100 per
benchmark, then the average over benchmarks), printed and optionally written as
JSON:

- ``--predictions FILE``: a JSON-lines file of ``{"idx": ..., "prediction": ...}``
  rows.  ``idx`` is the **0-based row position in the data file** (the shipped
  Prometheus files' own ``idx`` field numbers prompts and repeats four times,
  so it cannot name a row).  With several ``--data`` files, either give one
  predictions file per data file, in the same order, or one file whose rows
  carry ``"source"`` = the data file's stem (e.g. ``"vicuna_eval"``).  An
  optional ``"method"`` field gives one table line per method (files written by
  ``--save-predictions`` carry it).  ``prediction`` may be null (an unparsable
  generation).  Such rows are reported both ways (``--unparsable both``, the
  default): dropped (the method's own line) and scored 0 as the released REAL
  evaluation does (the line ``METHOD [unparsable=0]``); ``--unparsable drop`` or
  ``zero`` keeps one rule.  Under the table one line always gives each method's
  count of unparsable rows per benchmark.
- ``--baseline gpt4-loo``: the human-level reference.  Each row has three GPT-4
  grades; for each choice of held-out grade, every row is predicted by the mean
  of the other two and scored against the held-out one; the coefficients are
  averaged over the three choices.
- ``--model PATH`` (a folder, a Hub name, or ``tiny``): runs the judge as the
  paper evaluates it (``real.judge.inference``): RAIL (the expected score at the score
  position) averaged over ``--n-samples`` CoTs sampled at temperature 1.0 and
  top-p 0.9 (``rail-sampled``), RAIL after a greedy CoT (``rail-greedy``),
  standard decoding (``decode``: generate greedily, parse the score) and the
  released validation's decoded score (``decode-released``: one CoT sampled at
  --temperature / --top-p to its end, its last character if that is a digit,
  else 0); a line under the table says when the model is a random or an
  untrained one.  The defaults are the released validation's: --max-new-tokens
  1024, one sampled CoT at temperature 1.0 and top-p 0.9.  ``--data DIR``
  stands for the paper's four benchmarks in DIR.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from real.judge.data import group_by_source, JudgeExample, load_prometheus, with_chat_templates, with_score_phrase
from real.judge.metrics import average_correlations, correlations, format_table, json_safe, with_average
from real.judge.prompts import score_phrase, ScoreScale
from real.model.checkpoint_files import is_checkpoint, read_saved_config, STATE_FILE

BASELINES = ("gpt4-loo",)
# How a judge model predicts (not the training methods): RAIL on sampled CoTs (n averaged), RAIL on a greedy
# CoT, standard decoding (generate greedily, parse the score), and the released validation's decoded score
# (real.judge.inference.DECODING_RULES 'released': a sampled CoT's last character if it is a digit, else 0).  The
# paper reports RAIL on sampled CoTs (temperature 1.0, top-p 0.9, as the released validation) and greedy.
PREDICTION_METHODS = ("rail-sampled", "rail-greedy", "decode", "decode-released")
DEFAULT_MAX_NEW_TOKENS = 1024  # the released max_response_length, which its validation generates up to
PAPER_BENCHMARKS = ("feedback_bench.json", "flask_eval.json", "vicuna_eval.json", "mt_bench_eval.json")
DEFAULT_METHOD = "predictions"
UNPARSABLE_RULES = ("both", "drop", "zero")  # zero: the released REAL evaluation's rule
ZERO_SUFFIX = " [unparsable=0]"

Results = Dict[str, Dict[str, dict]]  # method -> benchmark -> correlations


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it has a meaningful one."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="real eval",
        description="Score judge predictions against benchmark files: Pearson / Spearman / Kendall "
                    "x100 per benchmark and their average, as in the REAL paper.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE",
                        help="benchmark files (Prometheus eval .json or Feedback-Collection .json/.jsonl); "
                             "each is one column of the table, named by its file stem; a folder stands for the "
                             "paper's four benchmarks in it (" + ", ".join(PAPER_BENCHMARKS) + ", as `real data "
                             "download benchmarks DIR` writes them)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", nargs="+", metavar="FILE",
                        help="JSON-lines predictions: rows {idx, prediction[, source][, method]}, idx = 0-based "
                             "row in the data file; one file per --data file (same order), or one file "
                             "whose rows name their data file stem in 'source'")
    source.add_argument("--baseline", choices=BASELINES,
                        help="gpt4-loo: leave-one-grade-out GPT-4 agreement (predict each grade by the mean of "
                             "the other grades, average over the held-out choice)")
    source.add_argument("--model", metavar="PATH",
                        help="a local transformers causal LM directory, a Hugging Face Hub name (e.g. Qwen/Qwen3-8B; "
                             "the local cache first), or 'tiny' for the built-in random model; "
                             "runs RAIL and standard-decoding inference")
    parser.add_argument("--output", metavar="FILE.json", help="also write the table (raw coefficients) as JSON")
    parser.add_argument("--limit", type=int, metavar="N", help="use only the first N rows of each data file")
    parser.add_argument("--unparsable", choices=UNPARSABLE_RULES, default="both",
                        help="predictions that are null (an unparsable generation): drop them from the "
                             "correlations, score them 0 (the released REAL evaluation), or report both lines; "
                             "their count is always printed")
    parser.add_argument("--skip-malformed", action="store_true",
                        help="skip malformed data rows (with a warning and a count) instead of failing")

    model = parser.add_argument_group("judge model options (with --model)")
    model.add_argument("--methods", nargs="+", choices=PREDICTION_METHODS, default=list(PREDICTION_METHODS),
                       help="rail-sampled: expected score averaged over --n-samples sampled CoTs; rail-greedy: "
                            "after one greedy CoT; decode: generate (greedy) and parse the score; decode-released: "
                            "the released validation's decoded score (one CoT sampled at --temperature / --top-p "
                            "to its end; its last character if that is a digit, else 0)")
    model.add_argument("--n-samples", type=int, default=1, metavar="N",
                       help="sampled CoTs per prompt for rail-sampled, their expected scores averaged (the released "
                            "validation samples 1)")
    model.add_argument("--temperature", type=float, default=1.0, metavar="T",
                       help="sampling temperature of rail-sampled and decode-released (the released validation's)")
    model.add_argument("--top-p", type=float, default=0.9, metavar="P",
                       help="nucleus sampling of rail-sampled and decode-released (the released validation's)")
    model.add_argument("--seed", type=int, default=0, help="seed of the sampled CoTs")
    model.add_argument("--score-phrase", default=None,
                       help="the phrase the score follows: prometheus ('[RESULT] N'), released ('So the overall "
                            "score is N', with the released prompt layout) or the phrase itself; default: the one "
                            "the checkpoint was trained with (its train_config.json), else prometheus")
    model.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                       help="lay each prompt out as a user turn of the tokenizer's chat template, when it has one")
    model.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                       help="longest CoT generated per prompt (the released max_response_length)")
    model.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts per generation batch")
    model.add_argument("--normalize", action="store_true",
                       help="RAIL: renormalise the score probabilities over the score tokens")
    model.add_argument("--device", default="auto", help="torch device; auto = cuda when available, else cpu")
    model.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="model weights dtype; auto lets the loader choose")
    model.add_argument("--save-predictions", metavar="FILE.jsonl",
                       help="write every prediction as JSON lines {source, idx, method, prediction}; "
                            "the file can be scored again with --predictions")
    return parser


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


# --- data -------------------------------------------------------------------------

def load_benchmarks(paths: Sequence[str], limit: Optional[int], skip_malformed: bool) -> Dict[str, List[JudgeExample]]:
    """Benchmark name (file stem) -> its examples (the first ``limit`` rows)."""
    paths = expand_benchmark_folders(paths)
    stems = [Path(p).stem for p in paths]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"--data files must have distinct stems (they name the benchmarks), repeated: {duplicates}")
    benchmarks = {}
    for path in paths:
        examples = load_prometheus(path, skip_malformed=skip_malformed)
        benchmarks[Path(path).stem] = examples[:limit] if limit else examples
    return benchmarks


def expand_benchmark_folders(paths: Sequence[str]) -> List[str]:
    """Each folder replaced by the paper's benchmark files found in it (in the paper's column order)."""
    out: List[str] = []
    for path in paths:
        if not Path(path).is_dir():
            out.append(path)
            continue
        found = [str(Path(path) / name) for name in PAPER_BENCHMARKS if (Path(path) / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds none of the benchmark files {', '.join(PAPER_BENCHMARKS)}; "
                                    f"fetch them with `real data download benchmarks {path}`")
        out.extend(found)
    return out


# --- the three sources of predictions --------------------------------------------

def _correlations_for(label: str, predictions, targets) -> dict:
    """correlations(), with its warnings (dropped rows, constant input) naming method and benchmark."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = correlations(predictions, targets)
    for warning in caught:
        warnings.warn(f"{label}: {warning.message}", warning.category, stacklevel=3)
    return result


def gpt4_loo(benchmarks: Dict[str, List[JudgeExample]]) -> Results:
    """Leave-one-grade-out agreement of the GPT-4 grades, per benchmark."""
    per_benchmark = {}
    for name, examples in benchmarks.items():
        counts = {len(e.grades) for e in examples}
        if len(counts) != 1 or min(counts) < 2:
            raise ValueError(f"{name}: gpt4-loo needs the same number (>= 2) of grades on every row, "
                             f"found grade counts {sorted(counts)}")
        n_grades = counts.pop()
        folds = []
        for held_out in range(n_grades):
            predictions = [(sum(e.grades) - e.grades[held_out]) / (n_grades - 1) for e in examples]
            targets = [e.grades[held_out] for e in examples]
            folds.append(_correlations_for(f"gpt4-loo on {name} (held-out grade {held_out})", predictions, targets))
        result = average_correlations(folds)
        result["n"], result["dropped"] = len(examples), 0
        per_benchmark[name] = result
    return {"gpt4-loo": per_benchmark}


def _read_prediction_rows(path: Path) -> List[Tuple[int, dict]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"predictions file not found: {path}") from None
    rows = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {line_no}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append((line_no, row))
    if not rows:
        raise ValueError(f"{path}: no predictions (file is empty)")
    return rows


def _prediction_value(value, where: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: 'prediction' must be a number or null, got {value!r}")
    return float(value)


def read_predictions(paths: Sequence[str], sources: Sequence[str]) -> Dict[str, Dict[Tuple[str, int], Optional[float]]]:
    """method -> (source, idx) -> prediction, from one file per source or one file for all."""
    if len(paths) == len(sources):
        default_sources = list(sources)
    elif len(paths) == 1:
        default_sources = [None]
    else:
        raise ValueError(f"give one --predictions file for all --data files or one per data file; "
                         f"got {len(paths)} predictions files for {len(sources)} data files")
    out: Dict[str, Dict[Tuple[str, int], Optional[float]]] = {}
    for path, default_source in zip(map(Path, paths), default_sources):
        for line_no, row in _read_prediction_rows(path):
            where = f"{path}: line {line_no}"
            for key in ("idx", "prediction"):
                if key not in row:
                    raise ValueError(f"{where}: missing field {key!r}")
            idx = row["idx"]
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise ValueError(f"{where}: 'idx' must be a row position (integer >= 0), got {idx!r}")
            source = row.get("source", default_source)
            if source is None:
                raise ValueError(f"{where}: missing 'source' (needed when one predictions file serves "
                                 f"several data files; use the data file stem, one of {list(sources)})")
            if source not in sources:
                raise ValueError(f"{where}: unknown source {source!r}; data file stems are {list(sources)}")
            if default_source is not None and source != default_source:
                raise ValueError(f"{where}: source {source!r} but this file is paired with {default_source!r}")
            method = str(row.get("method", DEFAULT_METHOD))
            key = (source, idx)
            table = out.setdefault(method, {})
            if key in table:
                raise ValueError(f"{where}: duplicate prediction for {source} row {idx} (method {method!r}); "
                                 "'idx' is the 0-based row position in the data file, not the file's own "
                                 "'idx' field, which repeats")
            table[key] = _prediction_value(row["prediction"], where)
    return out


def _unparsable(value: Optional[float]) -> bool:
    return value is None or not math.isfinite(value)


def score_predictions(benchmarks: Dict[str, List[JudgeExample]],
                      predictions: Dict[str, Dict[Tuple[str, int], Optional[float]]],
                      unparsable: str = "both") -> Results:
    """method -> benchmark -> correlations (with ``unparsable``: the count of null predictions).

    ``unparsable`` (UNPARSABLE_RULES): null predictions dropped (``drop``), scored 0 (``zero``, the
    released REAL evaluation), or both: the method's line drops them and, where there are any, a line
    ``METHOD [unparsable=0]`` scores them 0.
    """
    if unparsable not in UNPARSABLE_RULES:
        raise ValueError(f"unparsable must be one of {UNPARSABLE_RULES}, got {unparsable!r}")
    results: Results = {}
    for method, table in predictions.items():
        used = set()
        dropped, zeroed = {}, {}
        for name, examples in benchmarks.items():
            keys = [(name, e.meta["row"]) for e in examples]
            missing = [k[1] for k in keys if k not in table]
            if missing:
                raise ValueError(f"predictions ({method}) miss {len(missing)} of {len(keys)} rows of {name}, "
                                 f"first rows: {missing[:5]}")
            used.update(keys)
            values, targets = [table[k] for k in keys], [e.target for e in examples]
            count = sum(map(_unparsable, values))
            if unparsable != "zero":
                dropped[name] = dict(_correlations_for(f"{method} on {name}", values, targets), unparsable=count)
            if unparsable == "both" and not count:
                zeroed[name] = dropped[name]  # nothing to score 0: the same numbers
            elif unparsable != "drop":
                zeroed[name] = dict(_correlations_for(f"{method} (unparsable = 0) on {name}",
                                                      [0.0 if _unparsable(v) else v for v in values], targets),
                                    unparsable=count)
        unused = len(table) - len(used)
        if unused:
            print(f"real eval: note: {unused} prediction(s) ({method}) match no evaluated row "
                  "(beyond --limit or skipped rows) and were ignored", file=sys.stderr)
        if unparsable == "zero":
            results[method] = zeroed
            continue
        results[method] = dropped
        if unparsable == "both" and any(r["unparsable"] for r in zeroed.values()):
            results[method + ZERO_SUFFIX] = zeroed
    return results


def unparsable_line(results: Results) -> str:
    """One line: every method's count of unparsable predictions, per benchmark."""
    parts = []
    for method, per_benchmark in results.items():
        if method.endswith(ZERO_SUFFIX):
            continue
        counts = {name: r.get("unparsable", 0) for name, r in per_benchmark.items() if name != "Average"}
        total = sum(counts.values())
        rows = sum(r.get("n", 0) + r.get("dropped", 0) for name, r in per_benchmark.items() if name != "Average")
        parts.append(f"{method} {total} of {rows}" + (" (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")"
                                                      if len(counts) > 1 else ""))
    return "unparsable predictions: " + "; ".join(parts)


def model_caution(name: str) -> Optional[str]:
    """A line saying when ``--model`` is a random or an untrained judge (its numbers are then no result)."""
    import os

    from real.model.tiny import TINY_NAME  # here: tiny imports transformers, which --predictions does without

    if name == TINY_NAME:
        return (f"caution: --model {TINY_NAME} is a random, untrained model built on the spot: its correlations are "
                "noise, not a result about judges")
    if not os.path.exists(name):
        return (f"caution: --model {name} is a published model, not a judge trained here (the paper's "
                "'before training' row); train one with `real train` for the other rows")
    if not is_checkpoint(name):
        return (f"note: {name} is not a checkpoint of `real train` (no {STATE_FILE}): make sure it is the judge "
                "you mean to evaluate")
    return None


def trained_score_phrase(model: str) -> Optional[str]:
    """The --score-phrase a `real train` checkpoint folder was trained with (its train_config.json), else None."""
    import os

    if not os.path.isdir(model):
        return None
    saved = read_saved_config(model) or {}
    phrase = saved.get("score_phrase") if isinstance(saved, dict) else None
    return phrase if isinstance(phrase, str) else None


def run_model(benchmarks: Dict[str, List[JudgeExample]], args) -> Dict[str, Dict[Tuple[str, int], Optional[float]]]:
    """method -> (source, idx) -> prediction, by running the judge (PREDICTION_METHODS)."""
    # Imported here: torch/transformers and the inference code are only needed for --model.
    import torch

    from real.judge.inference import predict_decode, predict_rail
    from real.model.loading import load_model_and_tokenizer, resolve_device
    device = resolve_device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_model_and_tokenizer(args.model, device=device, dtype=dtype)
    model.eval()
    if args.score_phrase is None:
        trained = trained_score_phrase(args.model)
        args.score_phrase = trained or "prometheus"
        if trained:
            print(f"real eval: --score-phrase {trained} (the checkpoint's train_config.json)", file=sys.stderr)
    scale = ScoreScale.from_tokenizer(tokenizer, marker=score_phrase(args.score_phrase))
    keys = [(name, e.meta["row"]) for name, examples in benchmarks.items() for e in examples]
    examples = with_score_phrase([e for examples in benchmarks.values() for e in examples], args.score_phrase)
    examples = with_chat_templates(examples, tokenizer, args.chat_template)
    prompts = [e.prompt for e in examples]
    common = dict(score_token_ids=scale.token_ids, score_values=scale.values, max_new_tokens=args.max_new_tokens,
                  batch_size=args.batch_size, normalize=args.normalize, progress=True, marker=scale.marker)
    out = {}
    if "rail-sampled" in args.methods:
        print(f"real eval: RAIL on {len(prompts)} prompts, {args.n_samples} sampled CoT(s) each (temperature "
              f"{args.temperature}, top-p {args.top_p}), expected scores averaged", file=sys.stderr)
        torch.manual_seed(args.seed)
        values = predict_rail(model, tokenizer, prompts, n_samples=args.n_samples, greedy=False,
                              temperature=args.temperature, top_p=args.top_p, **common)
        out["rail-sampled"] = dict(zip(keys, values))
    if "rail-greedy" in args.methods:
        print(f"real eval: RAIL on {len(prompts)} prompts, one greedy CoT each", file=sys.stderr)
        out["rail-greedy"] = dict(zip(keys, predict_rail(model, tokenizer, prompts, greedy=True, **common)))
    if "decode" in args.methods:
        print(f"real eval: standard decoding on {len(prompts)} prompts (greedy)", file=sys.stderr)
        values = predict_decode(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, low=scale.low, high=scale.high, progress=True,
                                marker=scale.marker)
        out["decode"] = dict(zip(keys, values))
    if "decode-released" in args.methods:
        print(f"real eval: the released decoded score on {len(prompts)} prompts (one CoT sampled at temperature "
              f"{args.temperature}, top-p {args.top_p}, to its end; 0 unless it ends in a digit)", file=sys.stderr)
        torch.manual_seed(args.seed)
        values = predict_decode(model, tokenizer, prompts, greedy=False, temperature=args.temperature,
                                top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                low=scale.low, high=scale.high, progress=True, marker=scale.marker, rule="released")
        out["decode-released"] = dict(zip(keys, values))
    return out


def save_predictions(path: str, predictions: Dict[str, Dict[Tuple[str, int], Optional[float]]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for method, table in predictions.items():
            for (source, idx), value in table.items():
                value = None if value is None or not math.isfinite(value) else float(value)
                handle.write(json.dumps({"source": source, "idx": idx, "method": method, "prediction": value}) + "\n")


# --- output -----------------------------------------------------------------------

def report(results: Results, args, mode: str) -> dict:
    return {
        "command": "real eval",
        "mode": mode,
        "data": list(args.data),
        "limit": args.limit,
        "scale": "correlation coefficients in [-1, 1] (the printed table shows them x100); null = undefined",
        "results": {method: with_average(per_benchmark) for method, per_benchmark in results.items()},
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        _positive("--limit", args.limit)
        _positive("--n-samples", args.n_samples)
        _positive("--max-new-tokens", args.max_new_tokens)
        _positive("--batch-size", args.batch_size)
        benchmarks = load_benchmarks(args.data, args.limit, args.skip_malformed)
        if args.baseline:
            mode, results = f"baseline:{args.baseline}", gpt4_loo(benchmarks)
        elif args.predictions:
            mode = "predictions"
            results = score_predictions(benchmarks, read_predictions(args.predictions, list(benchmarks)),
                                        args.unparsable)
        else:
            mode = f"model:{args.model}"
            predictions = run_model(benchmarks, args)
            if args.save_predictions:
                save_predictions(args.save_predictions, predictions)
            results = score_predictions(benchmarks, predictions, args.unparsable)
    except (ValueError, FileNotFoundError) as exc:
        print(f"real eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    if not args.baseline:
        print(unparsable_line(results))
    caution = model_caution(args.model) if args.model else None
    if caution:
        print(caution)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(json_safe(report(results, args, mode)), handle, indent=2, allow_nan=False)
            handle.write("\n")
        print(f"real eval: wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
