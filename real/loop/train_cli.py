"""`real train`'s command line: flags and config file to a TrainConfig, the run, exit codes, teardown.

``real.loop.train`` holds the loop; this is what wraps one run of it as a process:
``--print-config``, the tiny model's one thread, errors as one sentence (exit 2
for bad settings, 1 for a run that failed), Ctrl-C / SIGTERM / the STOP file
(exit 130 / 143 after a checkpoint), and the teardown that lets a torchrun
rank leave cleanly (``real.multi_gpu.distributed.cleanup_distributed``).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import List, Optional

import torch

from real.multi_gpu import distributed as dist_utils
from real.loop.config import build_parser, config_from_args, config_json
from real.model.loading import resolve_device
from real.loop.nonfinite import TrainingFailed
from real.loop.run_dir import METRICS_FILE, Aborted
from real.loop.train import Trainer

SYNTHETIC_DEFAULTS = {"max_new_tokens": 32}  # defaults for --data synthetic, below config file and flags


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog="real train", description=(
        "Train an LLM judge with REAL (regression-aware RL) or a baseline (GRPO, RAFT, TRACT). Settings come from "
        "--config FILE (YAML, TOML or JSON; keys = the flag names with underscores, a method's own settings under "
        "its name, e.g. real:, or at the top level) and/or flags; flags win. "
        "Ctrl-C, SIGTERM, or creating OUTPUT_DIR/STOP (under torchrun), stops after the current step with a "
        "checkpoint; --resume continues. "
        "Example: real train --method real --model tiny --data synthetic --steps 3 --output-dir runs/smoke"))
    args = parser.parse_args(argv)
    trainer, broken = None, False
    try:
        config = config_from_args(args)
        if config.data == ["synthetic"]:  # the synthetic task's CoTs are ~15 tokens: do not sample 256
            config = config_from_args(args, base=SYNTHETIC_DEFAULTS)
        if getattr(args, "print_config", False):
            print(config_json(config))
            return 0
        if not config.progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # save_pretrained's shard bars
        if config.threads == 0 and config.model == "tiny" and resolve_device(config.device).type == "cpu":
            torch.set_num_threads(1)  # see --threads: tiny ops do not split well, and one thread never stalls
        result = (trainer := Trainer(config)).run()
    except (ValueError, FileNotFoundError) as exc:
        print(f"real train: error: {exc}", file=sys.stderr)
        return 2
    except (TrainingFailed, dist_utils.CollectiveTimeout) as exc:
        broken = isinstance(exc, dist_utils.CollectiveTimeout)  # the group cannot be taken down in order
        print(f"real train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # a second Ctrl-C / SIGTERM
        print("real train: aborted (no checkpoint written for the unfinished step)", file=sys.stderr)
        return 128 + (exc.signum if isinstance(exc, Aborted) else signal.SIGINT)
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None
        dist_utils.cleanup_distributed(broken=broken)
    if result.interrupted:
        return 128 + (result.stop_signal or signal.SIGINT)  # 130 for Ctrl-C or the STOP file, 143 for SIGTERM
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 speaks for the run
        return 0
    print(f"done: {result.last_step} steps; metrics in {os.path.join(result.output_dir, METRICS_FILE)}; "
          f"checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    dist_utils.exit_process(main())
