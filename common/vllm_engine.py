"""vLLM as a colocated rollout and evaluation engine, with the HF engine's interface (common/generate.py):
in-process under torchrun (external_launcher), weights pushed from the trainer, their state owned here.

    engine = VLLMEngine(folder, tokenizer, tp=2, dtype="bf16", dummy_weights=True, processor=proc)
    engine.push_weights(fsdp.full_params(net), when_needed=True)   # the FSDP gather runs here, on every rank
    engine.generate(prompts, n, temperature, top_p, max_new_tokens, seeds, logprobs, per_rank)
        -> [[Sample] * n] * len(prompts)
"""

import gc
import dataclasses
import os

import torch

from common import dist
from common.generate import Prompt, Sample, block, prefill_of, response_prefill
from common.faults import injected
from common.model import DTYPES, banned_token_ids, decode_response, load_config, response_drop_ids


def _refresh_lm_heads(worker) -> None:
    """Re-run the LM heads' post-load processing after a reload (runs inside the vLLM worker, in-process).

    A head tied to the input embeddings (SmolLM2, Qwen2.5-VL-3B) receives no weights of its own: the reload fills the
    shared tensor through the embedding. On CPU the head's matmul runs on a oneDNN copy packed at load time, which
    would keep the old values (measured: greedy text from the dummy weights after a push). Re-processing repacks it
    from the shared tensor; on GPU the unquantised head has no such copy and this does nothing."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in worker.model_runner.get_model().modules():
        if isinstance(module, ParallelLMHead) and getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)


def tp_groups(tp: int, world_size: int, rank: int) -> tuple[int, int]:
    """(number of tensor-parallel groups, this rank's group): consecutive ranks [g * tp, (g + 1) * tp) form group g.
    SystemExit when tp does not divide the world size."""
    if tp < 1 or world_size % tp:
        raise SystemExit(f"--tp {tp} must divide the {world_size} ranks (vLLM tensor-parallel groups)")
    return world_size // tp, rank // tp


def tp_subgroup(tp: int, world_size: int, rank: int):
    """This rank's tensor-parallel group as a torch.distributed subgroup (None when tp == 1). Every rank must call
    it at the same time: each new_group is a collective over the whole world, made for every group in order."""
    if tp == 1:
        return None
    mine = None
    for g in range(world_size // tp):
        group = torch.distributed.new_group(list(range(g * tp, (g + 1) * tp)))
        mine = group if g == rank // tp else mine
    return mine


def gather_group(prompts: list, seeds: list, group) -> tuple[list, list, int]:
    """The tensor-parallel group's prompts and seeds, its ranks' in rank order, and where this rank's start.
    Only the group's ranks exchange them (images included), never the whole world (issue 20 item 11)."""
    mine = [(p.text, p.images, s) for p, s in zip(prompts, seeds)]
    peers = dist.all_gather_objects(mine, group=group)
    start = sum(len(x) for x in peers[: torch.distributed.get_rank(group)]) if group is not None else 0
    flat = [x for part in peers for x in part]
    return [Prompt(t, im) for t, im, _ in flat], [s for _, _, s in flat], start


class VLLMEngine:
    """vLLM behind the same interface, colocated with the trainer: one engine per torchrun rank, in-process.

    Launch: always vLLM's `external_launcher` executor (dist.init sets the torchrun variables for a plain single
    process too), so the engine core runs in this process and weights pass to it by reference, never serialised.
    Ranks are never vLLM data-parallel: each tensor-parallel group is an independent engine that generates its own
    prompts (vLLM's "external DP", as TRL's colocate mode and verl run it). vLLM's own `data_parallel_size > 1` would
    all-reduce on every model step and hang ranks that decode different numbers of tokens.

    Weights have one owner of their state, this object:
        self.weights   "current"   resident and equal to the last push (or to the checkpoint when nothing was pushed)
                       "stale"     resident, but the trainer has changed its weights since (mark_stale)
                       "discarded" dropped by sleep(level=2); the memory holds nothing usable
    The trainer pushes its weights explicitly before it generates (`push_weights(fsdp.full_params(net),
    when_needed=True)`: the FSDP gather is a collective at that call site); a generate() that finds them not
    "current" pushes from `weight_source` (tests) or raises, so no rollout ever runs on discarded or old weights,
    whatever sequence of rollouts, validations and updates the caller makes.

    Tensor-parallel groups (`tp` consecutive ranks; tp_groups checks that tp divides the world): every rank of a
    group must submit the same prompts. `generate(per_rank=True)` feeds them: each rank passes its own prompts
    (grpo.py), the group exchanges them (only within itself) and generates them together, each rank gets its own
    back. `shard(items)` gives a group's ranks the same contiguous part of a data set (evaluate.py).

    Platform facts are asked of vLLM, not guessed from the device name: sleep mode only where
    `current_platform.is_sleep_mode_available()`; on CPU, eager mode (torch.compile warm-up takes > 5 min on two
    cores), an explicit KV-cache size (`gpu_memory_utilization` would reserve that share of *host* RAM), whole
    prefills (no chunking; a context of min(8192, the model's) unless max_model_len says otherwise), and the process's torch thread
    count kept for the trainer (vLLM sets it to 1 unless OMP_NUM_THREADS is set).
    """

    def __init__(self, model: str, tokenizer, tp: int = 1, seed: int = 0, dtype: str = "bf16",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, sleep: bool = False,
                 dummy_weights: bool = False, max_images: int = 8, is_vl: bool = True, weight_source=None,
                 cpu_kv_cache_gb: float = 1.0, processor=None):
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"the vLLM engine runs under external_launcher and needs {var}: call "
                                   "common.dist.init() first (it sets them for a single process)")
        world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        self.tp = tp
        self.dp_size, self.dp_rank = tp_groups(tp, world_size, rank)
        self.group = tp_subgroup(tp, world_size, rank)
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:  # keep the trainer's threads: vLLM drops torch to 1 thread unless this is set
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        from vllm import LLM

        self.sleep_mode = bool(sleep) and current_platform.is_sleep_mode_available()
        kw = dict(model=model, tensor_parallel_size=tp, seed=seed, dtype=str(DTYPES[dtype]).removeprefix("torch."),
                  enable_sleep_mode=self.sleep_mode, max_model_len=max_model_len,
                  logprobs_mode="processed_logprobs", load_format="dummy" if dummy_weights else "auto",
                  distributed_executor_backend="external_launcher")
        if self.on_cpu:
            # Whole prefills: on CPU a seeded request whose prefill is split over steps crashes vLLM 0.32 when its
            # discarded token rewinds the generator ("CPU Generator does not use offset"); vLLM's own CPU path
            # turns chunking off the same way for MLA models.
            if max_model_len is None:  # the model's own limit, at most 8192 (the batch budget is as large)
                config = load_config(model)
                max_model_len = min(8192, int(getattr(getattr(config, "text_config", config),
                                                      "max_position_embeddings", 8192)))
            kw.update(enforce_eager=True, kv_cache_memory_bytes=int(cpu_kv_cache_gb * 2**30),
                      max_model_len=max_model_len, enable_chunked_prefill=False,
                      max_num_batched_tokens=max(max_model_len, 8192))
        else:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        if is_vl:
            kw["limit_mm_per_prompt"] = {"image": max_images, "video": 0}
            from vllm.engine.arg_utils import EngineArgs

            if "mm_device_do_normalize" in {f.name for f in dataclasses.fields(EngineArgs)}:
                # vLLM 0.32 moves the processor's rescale/normalise into the vision tower as buffers that a dummy
                # start randomises and no push carries (measured: image log-probs 0.24 off after a push, text
                # exact; cf. vllm#19788); normalised on the host instead, as the processor does for the trainer
                kw["mm_device_do_normalize"] = False
        self.llm = LLM(**kw)
        self.tokenizer, self.banned = tokenizer, banned_token_ids(tokenizer) if is_vl else []
        # responses are decoded as the HF engine does (format tags kept, the template's prefill in front); the
        # processor's chat template is the one prompts are rendered with, the tokenizer's when there is none
        self.drop = response_drop_ids(tokenizer)
        self.prefill = prefill_of(processor if processor is not None else tokenizer)
        self.weight_source, self.dtype = weight_source, DTYPES[dtype]
        self.weights = "stale" if dummy_weights else "current"
        self.kv_awake = True
        self.pushes = 0  # completed weight pushes
        self.greedy_repeats = False  # batch composition can change vLLM's greedy tokens: every run is generated

    # -- weight state ------------------------------------------------------------------------------------------------
    def mark_stale(self) -> None:
        """The trainer changed its weights: the next generate() pushes them first (unless they were discarded)."""
        if self.weights == "current":
            self.weights = "stale"

    def push_weights(self, named_tensors=None, when_needed: bool = False) -> None:
        """Reload the engine's weights in place from (name, full tensor) pairs, streamed one tensor at a time and by
        reference (in-process), through vLLM's `reload_weights`: it restores each layer to its checkpoint layout,
        loads, and re-runs the kernel-specific processing (CPU oneDNN packing, quantisation), which a bare
        `model.load_weights` after start-up would skip. Then the prefix and multimodal caches built on the old
        weights are dropped. Default source: `weight_source()`. Every rank must iterate the source at the same time
        (FSDP gathers inside it). when_needed=True: nothing happens (the source is never iterated) while the
        weights are "current"."""
        if when_needed and self.weights == "current":
            return
        if named_tensors is None:
            if self.weight_source is None:
                raise RuntimeError("no weight_source: pass the tensors to push_weights")
            named_tensors = self.weight_source()
        if self.sleep_mode and self.weights == "discarded":
            self.llm.wake_up(tags=["weights"])
        stream = ((name, tensor.detach().to(self.dtype)) for name, tensor in named_tensors)
        if injected("vllm_push") or (injected("vllm_push_stale") and self.pushes > 0):  # a push that silently fails
            # (the tests' broken-on-purpose cases: every push, or every push after the first): gathered, not loaded
            for _ in stream:
                pass
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream, "is_checkpoint_format": True})
        self.llm.collective_rpc(_refresh_lm_heads)
        self.llm.reset_prefix_cache()
        # the workers' reload drops their image-encoder outputs, but the scheduler still counts them as cached: the
        # next request on an image seen before the push failed with "Encoder cache miss" (vLLM 0.32)
        reset_encoder = getattr(self.llm, "reset_encoder_cache", None) or \
            getattr(self.llm.llm_engine, "reset_encoder_cache", None)
        if reset_encoder is not None:
            reset_encoder()
        self.weights = "current"
        self.pushes += 1

    def release(self) -> None:
        """Free accelerator memory for the update: sleep(level=2) discards weights and KV cache (GPU sleep mode).
        Without sleep mode (CPU) this keeps everything resident."""
        if self.sleep_mode:
            self.llm.sleep(level=2)
            self.weights, self.kv_awake = "discarded", False

    def _ready(self) -> None:
        if self.weights != "current":
            self.push_weights()
        if not self.kv_awake:
            self.llm.wake_up(tags=["kv_cache"])
            self.kv_awake = True

    # -- generation --------------------------------------------------------------------------------------------------
    def shard(self, items: list) -> list:
        """This rank's tensor-parallel group's contiguous block of `items` (generate.block): the same on each of
        the group's ranks, as generate(per_rank=False) needs."""
        return block(items, self.dp_size, self.dp_rank)

    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=4096, seeds=None, logprobs=False,
                 per_rank=False):
        """[[Sample] * n] per prompt. per_rank=False: the group's ranks pass the same prompts. per_rank=True: each
        rank passes its own; with tp > 1 the group generates all of them (gather_group) and each rank gets its own.
        """
        seeds = seeds if seeds is not None else list(range(len(prompts)))
        if per_rank and self.tp > 1:
            everyone, all_seeds, start = gather_group(prompts, seeds, self.group)
            return self.generate(everyone, n, temperature, top_p, max_new_tokens, all_seeds,
                                 logprobs)[start : start + len(prompts)]
        from vllm import SamplingParams

        self._ready()
        # token ids, not text: given text, vLLM tokenizes with the tokenizer's special tokens, and a tokenizer that
        # adds its own BOS under a template that writes one gets a second (vllm#27486; measured: 140 ids vs 139).
        # The ids are the trainer's and the HF engine's (add_special_tokens=False); vLLM expands the image pads.
        reqs = [{"prompt_token_ids": self.tokenizer(p.text, add_special_tokens=False)["input_ids"],
                 **({"multi_modal_data": {"image": p.images}} if p.images else {})} for p in prompts]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 seed=None if temperature == 0 else s % 2**31, detokenize=False,
                                 logit_bias={t: -100.0 for t in self.banned} or None, logprobs=0 if logprobs else None)
                  for s in seeds]
        results, self.last_prompt_ids = [], []
        for p, req_out in zip(prompts, self.llm.generate(reqs, params, use_tqdm=False)):
            self.last_prompt_ids.append(list(req_out.prompt_token_ids))  # what the model saw (image pads expanded)
            samples, pre = [], response_prefill(p, self.prefill)
            for o in req_out.outputs:
                lps = [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)] if logprobs and o.logprobs else None
                ids = list(o.token_ids)  # decoded as the HF engine does: one decode path for both engines
                samples.append(Sample(ids, decode_response(self.tokenizer, ids, self.drop, pre),
                                      "length" if o.finish_reason == "length" else "stop", lps))
            results.append(samples)
        self.llm.reset_mm_cache()  # the multimodal encoder cache is never evicted otherwise
        return results

    def shutdown(self) -> None:
        """End the engine and vLLM's process groups *before* ours: vLLM otherwise tears its groups down at
        interpreter exit, after dist.cleanup(), and fails with `Invalid process group specified`."""
        from vllm.distributed.parallel_state import destroy_model_parallel

        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        gc.collect()
        destroy_model_parallel()
        from vllm.distributed import parallel_state

        if parallel_state._WORLD is not None:  # vLLM's world group wraps ours; ours is destroyed by dist.cleanup()
            parallel_state._WORLD.destroy()
            parallel_state._WORLD = None
