"""Rollouts through vLLM, the way TRL and verl scale them: a colocated engine on every rank, or a server.

transformers ``generate`` through FSDP pays one all-gather per layer per new token; at the paper's scale
(2,048 CoTs of up to 1,024 tokens per step, 200 steps) that is impractical.  Two engines here, both
written against vLLM's public API and both working under torchrun:

- ``vllm-colocate`` (``VLLMColocateRollout``): one ``vllm.LLM`` in every training process, on the
  process's own GPU (``distributed_executor_backend="external_launcher"`` under torchrun, as TRL's
  colocate mode does; ``--vllm-tensor-parallel-size`` > 1 splits one engine over that many ranks, which
  then ask it for all their prompts together, each keeping its own share).  The
  engine starts from the model's config with dummy weights (``load_format="dummy"``: nothing is written
  to disk) and sleeps (``enable_sleep_mode``, level 2: weights and KV cache released) while the trainer
  trains.  Before each rollout it wakes its weight memory, receives the trained weights
  (``LLM.collective_rpc`` running the worker model's ``load_weights``), wakes its KV cache, samples, and
  goes back to sleep.
- ``vllm-server`` (``VLLMServerRollout``): a separate ``trl vllm-serve`` process on other GPUs (TRL's
  server: ``trl vllm-serve --model M --tensor-parallel-size N``).  Rank 0 pushes every weight to it
  through TRL's ``VLLMClient`` (``init_communicator``, ``update_named_param``, ``reset_prefix_cache``)
  before each rollout, then asks it for every rank's prompts at once and hands each rank its CoTs
  (as TRL's server mode does).

Weights are pushed before every rollout, i.e. after every optimizer update that precedes it (with
``--epochs-per-batch`` > 1 the engine gets the last of a batch's updates, the weights the next rollout
must sample from).  What is pushed is the full, merged model: FSDP shards are gathered (``full_tensor``,
a collective every rank joins in the same order) and a LoRA adapter is merged into its base weight
(``W + scaling * B @ A``, in fp32 or wider) in the pushed copy only.

Neither engine can run without CUDA and vllm; the tests drive both with fake engines that record the
calls (``tests/test_vllm_rollout.py``).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from real.judge.batching import cut_at_marker, truncate_prompt_ids
from real.loop.rollout_groups import group_rollouts, value_text

logger = logging.getLogger(__name__)

VLLM_ENGINES = ("vllm-colocate", "vllm-server")
SLEEP_LEVEL = 2  # weights and KV cache released between rollouts; weights come back from the trainer
PUSH_CHUNK_BYTES = 1 << 30  # gathered weights handed to a colocated engine per call


class MissingPackage(ImportError, ValueError):
    """A package the chosen engine needs is not installed (a ValueError too: ``real train`` reports it as a
    bad setting, exit 2, without a traceback)."""


def import_vllm():
    """The vllm package, or an error that says how to get it and what to use instead."""
    try:
        import vllm
    except ImportError as exc:
        raise MissingPackage(f"--rollout vllm-colocate / vllm-server need the vllm package (pip install "
                          f"'real-kernels[vllm]', CUDA only); use --rollout hf otherwise ({exc})") from None
    return vllm


# --- the weights an engine receives -----------------------------------------------------------


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard (a DTensor) is gathered from every rank (a collective)."""
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor()
    return tensor


def _strip_peft_prefix(name: str) -> str:
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def _lora_scalings(model) -> Dict[str, float]:
    """``{module name: scaling}`` of every LoRA layer of the active adapter (peft: lora_alpha / r)."""
    out = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and hasattr(module, "lora_A"):
            adapter = getattr(module, "active_adapter", None) or "default"
            adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
            out[name] = float(scaling[adapter])
    return out


def engine_weights(model) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(Hugging Face name, full tensor)`` of every weight an inference engine needs, LoRA merged.

    Every rank of an FSDP run must iterate this to the end, in step: each sharded tensor is gathered by
    a collective.  Adapter weights are merged (``W + scaling * B @ A`` in fp32, cast back), never
    returned (what peft's ``merge_and_unload`` computes, without touching the model)."""
    scalings = _lora_scalings(model)
    state = model.state_dict()
    for key, value in state.items():
        if ".lora_" in key:
            continue  # read below, with its base weight
        name = _strip_peft_prefix(key)
        module = key.rsplit(".", 1)[0].replace(".base_layer", "")
        if ".base_layer." in key and module in scalings:
            suffix = key.rsplit(".", 1)[1]
            base = _full(value)
            if suffix == "weight":
                adapter = _active_adapter_keys(state, module)
                wide = torch.promote_types(base.dtype, torch.float32)
                a, b = _full(state[adapter[0]]).to(wide), _full(state[adapter[1]]).to(wide)
                base = (base.to(wide) + scalings[module] * (b @ a)).to(base.dtype)
            yield name.replace(".base_layer", ""), base
            continue
        yield name, _full(value)


def _active_adapter_keys(state, module: str) -> Tuple[str, str]:
    a = [k for k in state if k.startswith(module + ".lora_A.") and k.endswith(".weight")]
    b = [k for k in state if k.startswith(module + ".lora_B.") and k.endswith(".weight")]
    if len(a) != 1 or len(b) != 1:
        raise ValueError(f"{module}: expected one LoRA adapter, found {len(a)} A / {len(b)} B weights "
                         "(several adapters cannot be pushed to an inference engine)")
    return a[0], b[0]


# --- shared by both engines ----------------------------------------------------------------------


def prompt_token_ids(tokenizer, prompts: Sequence[str], max_prompt_tokens: Optional[int]) -> List[List[int]]:
    """Each prompt's token ids, cut to its last ``max_prompt_tokens`` as the training batch cuts them."""
    out = []
    for p in prompts:
        ids = list(tokenizer(p)["input_ids"])
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids = truncate_prompt_ids(ids, max_prompt_tokens, tokenizer.bos_token_id)
        out.append(ids)
    return out


def finish_text(text: str, marker: str, with_score: bool, score_values: Sequence[float]) -> str:
    """What the HF engine returns for the same generation: cut after the first marker (REAL: the marker
    appended when the CoT never wrote it), or (GRPO) after the score that follows it."""
    if not with_score:
        body = cut_at_marker(text, marker)
        return f"{body} {marker}" if body else marker
    cut = text.find(marker)
    if cut < 0:
        return text
    head, rest = text[:cut + len(marker)], text[cut + len(marker):]
    stripped = rest.lstrip()
    for value in sorted(score_values, key=lambda v: -len(value_text(v))):
        if stripped.startswith(value_text(value)):
            return head + rest[:len(rest) - len(stripped) + len(value_text(value))]
    return text


class _Ranks:
    """Rank and world size of this process: the run's ``DistEnv``, else torch.distributed's group."""

    def __init__(self, env=None):
        if env is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            self.rank = env.rank if env is not None else 0
            self.world_size = env.world_size if env is not None else 1
        self.is_distributed, self.is_main = self.world_size > 1, self.rank == 0


class _SamplingSettings:
    def __init__(self, *, temperature: float, top_p: float, max_new_tokens: int, score_values: Sequence[float],
                 marker: str, max_prompt_tokens: Optional[int]):
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.score_values, self.marker, self.max_prompt_tokens = list(score_values), marker, max_prompt_tokens


# --- colocated ---------------------------------------------------------------------------------


class VLLMColocateRollout(_SamplingSettings):
    """A vLLM engine inside this training process, asleep between rollouts (see the module docstring)."""

    name = "vllm-colocate"

    def __init__(self, model, tokenizer, *, env=None, gpu_memory_utilization: float = 0.3,
                 tensor_parallel_size: int = 1, sleep: bool = True, **sampling):
        super().__init__(**sampling)
        self._vllm = import_vllm()
        self.tokenizer = tokenizer
        self.sleep = sleep
        ranks = _Ranks(env)
        if tensor_parallel_size < 1 or ranks.world_size % tensor_parallel_size:
            raise ValueError(f"vllm_tensor_parallel_size {tensor_parallel_size} must divide the "
                             f"{ranks.world_size} rank(s)")
        # The engine runs in this process (under torchrun on torchrun's group, as TRL's colocate mode), so
        # collective_rpc hands it the weight tensors themselves, not pickled copies.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # The engine needs the config and tokenizer from a folder; the weights come from the trainer.
        self._folder = tempfile.mkdtemp(prefix="real-vllm-")
        config = getattr(model, "get_base_model", lambda: model)().config
        config.save_pretrained(self._folder)
        tokenizer.save_pretrained(self._folder)
        # The engine samples in 16-bit whatever the trainer keeps (the released runs: fp32 weights, bf16 vLLM);
        # load_weights casts what it receives.
        dtype = "float16" if next(model.parameters()).dtype == torch.float16 else "bfloat16"
        kwargs = dict(model=self._folder, dtype=dtype, load_format="dummy", seed=ranks.rank // tensor_parallel_size,
                      gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                      enable_sleep_mode=sleep, enable_prefix_caching=True,
                      max_model_len=(self.max_prompt_tokens or config.max_position_embeddings) + self.max_new_tokens)
        if ranks.is_distributed:
            kwargs["distributed_executor_backend"] = "external_launcher"
        # Tensor parallel: the ranks of a group run one engine together and must all ask it for the same
        # prompts (vLLM's external launcher is SPMD); each rank then keeps its own share.
        self.tp_group, self.tp_rank = None, 0
        if tensor_parallel_size > 1:
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(g, g + tensor_parallel_size)) for g in range(0, ranks.world_size, tensor_parallel_size)])
            self.tp_rank = ranks.rank % tensor_parallel_size
        self.llm = self._vllm.LLM(**kwargs)
        self.pushes = 0
        if sleep:
            self.llm.sleep(level=SLEEP_LEVEL)

    def push_weights(self, model) -> None:
        """The trained weights into the engine (every rank calls it: FSDP shards are gathered), in chunks of
        about ``PUSH_CHUNK_BYTES`` so that only one chunk of gathered tensors exists at a time."""
        chunk, size = [], 0
        with torch.no_grad():
            for name, tensor in engine_weights(model):
                chunk.append((name, tensor))
                size += tensor.numel() * tensor.element_size()
                if size >= PUSH_CHUNK_BYTES:
                    self.llm.collective_rpc(_load_weights, args=(chunk,))
                    chunk, size = [], 0
            if chunk:
                self.llm.collective_rpc(_load_weights, args=(chunk,))
        self.llm.reset_prefix_cache()
        self.pushes += 1

    def generate(self, model, prompts: Sequence[str], group_size: int, *, seed: int,
                 with_score: bool = False):
        if self.sleep:
            self.llm.wake_up(tags=["weights"])  # weights first: the KV cache is allocated after the copy
        self.push_weights(model)
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        try:
            ids = prompt_token_ids(self.tokenizer, prompts, self.max_prompt_tokens)
            shares = [(ids, seed)]
            if self.tp_group is not None:
                shares = [None] * torch.distributed.get_world_size(self.tp_group)
                torch.distributed.all_gather_object(shares, (ids, seed), group=self.tp_group)
            params = self._vllm.SamplingParams(
                n=group_size, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_new_tokens,
                seed=shares[0][1], stop=None if with_score else [self.marker], include_stop_str_in_output=True)
            everything = [x for share, _ in shares for x in share]
            outputs = self.llm.generate([{"prompt_token_ids": x} for x in everything], params, use_tqdm=False)
            start = sum(len(share) for share, _ in shares[:self.tp_rank])
            mine = outputs[start:start + len(ids)]
            per_prompt = [[finish_text(c.text, self.marker, with_score, self.score_values) for c in out.outputs]
                          for out in mine]
            sampled = sum(len(c.token_ids) for out in mine for c in out.outputs)
        finally:
            if self.sleep:
                self.llm.sleep(level=SLEEP_LEVEL)
        return group_rollouts(prompts, per_prompt, group_size, with_score, self.score_values, self.marker,
                              sampled_tokens=sampled)

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)


def _load_weights(worker, weights) -> None:
    """Runs on each vLLM worker (``collective_rpc`` passes the worker first): the model loads the weights,
    Hugging Face names and all (vLLM maps them onto its fused layers)."""
    worker.model_runner.model.load_weights(weights=weights)


# --- server ------------------------------------------------------------------------------------


def trl_client(host: str, port: int, group_port: int, timeout: float):
    """TRL's client of a ``trl vllm-serve`` process (its weight-update group included)."""
    try:
        from trl.extras.vllm_client import VLLMClient
    except ImportError as exc:
        raise MissingPackage(f"--rollout vllm-server needs trl and vllm (pip install 'real-kernels[vllm]'); start "
                          f"the server with `trl vllm-serve --model MODEL --tensor-parallel-size N` ({exc})") from None
    client = VLLMClient(host=host, server_port=port, group_port=group_port, connection_timeout=timeout)
    if getattr(client, "pynccl_comm", None) is None:  # TRL >= 0.19 joins the weight-update group on request
        client.init_communicator(device=torch.cuda.current_device())
    return client


class VLLMServerRollout(_SamplingSettings):
    """Rollouts from a separate ``trl vllm-serve`` process; rank 0 pushes the weights to it."""

    name = "vllm-server"

    def __init__(self, model, tokenizer, *, env=None, host: str = "127.0.0.1", port: int = 8000,
                 group_port: int = 51216, timeout: float = 240.0, client_factory: Optional[Callable] = None,
                 **sampling):
        super().__init__(**sampling)
        self.tokenizer = tokenizer
        self.ranks = _Ranks(env)
        factory = client_factory or trl_client
        self.client = factory(host, port, group_port, timeout) if self.ranks.is_main else None
        self.pushes = 0
        self._warned_seed = False

    def push_weights(self, model) -> None:
        """Every rank gathers (FSDP), rank 0 sends; the others wait until the server has the weights."""
        with torch.no_grad():
            for name, tensor in engine_weights(model):
                if self.client is not None:
                    self.client.update_named_param(name, tensor)
        if self.client is not None:
            self.client.reset_prefix_cache()
        if self.ranks.is_distributed:
            torch.distributed.barrier()
        self.pushes += 1

    def generate(self, model, prompts: Sequence[str], group_size: int, *, seed: int,
                 with_score: bool = False):
        self.push_weights(model)
        if not self._warned_seed:
            logger.warning("--rollout vllm-server: TRL's server takes no per-request seed, so a resumed run does "
                           "not sample the CoTs an uninterrupted one would have")
            self._warned_seed = True
        ids = prompt_token_ids(self.tokenizer, prompts, self.max_prompt_tokens)
        texts = [self.tokenizer.decode(x, skip_special_tokens=False) for x in ids]
        # Rank 0 holds the client: it asks for every rank's prompts at once and hands each rank its share.
        distributed = self.ranks.is_distributed
        shares = [texts]
        if distributed:
            shares = [None] * self.ranks.world_size
            torch.distributed.all_gather_object(shares, texts)
        completions = None
        if self.client is not None:
            everything = [t for share in shares for t in share]
            result = self.client.generate(everything, n=group_size, temperature=self.temperature, top_p=self.top_p,
                                          max_tokens=self.max_new_tokens)
            completions = list(result["completion_ids"] if isinstance(result, dict) else result)
            if len(completions) != len(everything) * group_size:
                raise RuntimeError(f"the vLLM server returned {len(completions)} completions for {len(everything)} "
                                   f"prompts x {group_size}")
        if distributed:
            box = [completions]
            torch.distributed.broadcast_object_list(box, src=0)
            completions = box[0]
        start = sum(len(share) for share in shares[:self.ranks.rank]) * group_size
        mine = completions[start:start + len(prompts) * group_size]
        decoded = [finish_text(self.tokenizer.decode(c, skip_special_tokens=True), self.marker, with_score,
                               self.score_values) for c in mine]
        per_prompt = [decoded[i * group_size:(i + 1) * group_size] for i in range(len(prompts))]
        return group_rollouts(prompts, per_prompt, group_size, with_score, self.score_values, self.marker,
                              sampled_tokens=sum(len(c) for c in mine))

    def close(self) -> None:
        """Leave the server's weight-update group (once; the server keeps running)."""
        if self.client is not None and hasattr(self.client, "close_communicator"):
            self.client.close_communicator()
        self.client = None
