"""The reverse-process sampler of LLaDA / iLLaDA: blocks, low-confidence remasking, CFG, variable length.

Generation starts from an all-masked response and runs `steps` forward passes. Each step predicts every
masked position of the current block and reveals (transfers) a fixed number of them, keeping the rest
masked (LLaDA §2.4, Appendix A.3):

- ``remasking="low_confidence"`` (Algorithm 5): reveal the positions whose predicted token has the
  highest probability; ``"random"`` (Algorithm 4): reveal uniformly random positions. As in LLaDA's
  released code, exactly k positions are revealed per step (Algorithm 4 remasks each position with
  probability s/t, which has the same expectation).
- The schedule is the linear one of Algorithm 5: a block of n masks decoded in S steps reveals
  n // S tokens per step, and the first n % S steps one more (identical to Algorithm 5's
  floor(n(1-s)) bookkeeping whenever S divides n; otherwise the extra tokens come first, as in LLaDA's
  released code).
- Blocks (``block_length < gen_length``) are decoded left to right, each with steps / n_blocks steps;
  positions beyond the current block are never revealed (semi-autoregressive remasking, LLaDA B.4).
- ``temperature > 0`` samples with the Gumbel-max trick in float64 (low-precision Gumbel noise degrades
  quality); ``temperature == 0`` is greedy and deterministic. The confidence is the untempered
  probability of the proposed token. The mask token itself is never proposed.
- ``cfg_scale > 0``: unsupervised classifier-free guidance (LLaDA Eq. 16), the unconditional branch (prompt
  replaced by masks) in the same batched forward.
- ``logits_eos_inf`` forbids EOS; ``confidence_eos_inf`` ranks EOS proposals last so they are revealed only
  when nothing else is left (LLaDA B.4 sets the EOS confidence to zero for the same purpose).
- ``variable_length`` (iLLaDA §2.3): the sequence holds only the prompt, the decoded blocks and ONE block of
  masks; after each block generation stops if it contains EOS, a stop token or a stop string, otherwise a
  new block is appended, up to ``max_new_tokens`` (never exceeded: the last block is shortened).
- Stop-thinking boost (iLLaDA Appendix A): ``think_end_token_id`` gets a logit bias
  ``think_boost_max * clip((generated - think_boost_start) / think_boost_ramp, 0, 1)`` where `generated`
  is the number of response tokens before the current block, until that token has been generated. The
  paper gives no schedule; this linear ramp is ours.

Fast decoding (Fast-dLLM, Wu et al. 2025; both approximate, off by default so that the sampler is LLaDA's
exact algorithm): ``cache="prefix"|"dual"`` computes each block's first step as a full forward and reuses
its keys/values of the prompt and finished blocks (and of the masked suffix, ``dual``) for the block's other
steps (`block_cache.py`); ``parallel="threshold"`` reveals, at each step, every masked token of the block whose
confidence exceeds ``threshold`` and at least the schedule's k, so a block may finish in fewer steps
(`reveal_above_threshold`); ``parallel="factor"`` is Fast-dLLM's factor rule, a threshold that rises with the
number of tokens revealed together. ``cuda_graph=true`` replays each block's cached step as a CUDA graph.

Batches: prompts of different lengths are packed into one flat sequence with `cu_seqlens` (no padding),
so every prompt's result equals its one-by-one generation. A prompt whose completed blocks already contain
its end (EOS / stop) leaves the batch; tokens after the end are dropped, so this changes no output.

Results: the generated ids before the first EOS (or stop token); for a stop string, the ids up to the
token that completes it (strip the text yourself).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .block_cache import BlockForward, check_cacheable
from .packed_inference import (
    cu_seqlens_from_lengths,
    inference_context,
    model_device,
    model_special_ids,
    segment_positions,
)
from .sampler_config import (  # noqa: F401  (re-exported: the sampler's public API)
    CACHE_MODES,
    PARALLEL_MODES,
    REMASKING,
    SamplerConfig,
    sampler_config,
    think_boost,
    transfer_schedule,
)

# --------------------------------------------------------------------------------------------------
# One sampling step on a batch of blocks: pure tensor functions.


def propose_tokens(scores: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """argmax (greedy) or Gumbel-max sample of softmax(scores / temperature), noise in float64."""
    if temperature == 0:
        return scores.argmax(-1)
    u = torch.rand(scores.shape, dtype=torch.float64, device=scores.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    return (scores.double() / temperature + gumbel).argmax(-1)


def proposal_confidence(
    scores: torch.Tensor, proposed: torch.Tensor, remasking: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Ranking score per position: p(proposed) for low_confidence, uniform noise for random."""
    if remasking == "random":
        return torch.rand(proposed.shape, device=scores.device, generator=generator, dtype=scores.dtype)
    return (scores.gather(-1, proposed[..., None]).squeeze(-1) - torch.logsumexp(scores, -1)).exp()


def reveal_step(
    block: torch.Tensor, proposed: torch.Tensor, confidence: torch.Tensor, k: int, mask_token_id: int,
    last: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reveal the k masked positions of each row with the highest confidence; the others stay masked.

    `last` (bool, like block) marks proposals to rank below every other masked position (EOS under
    `confidence_eos_inf`). Every row of a block holds the same number of masks (blocks start fully
    masked and advance in lockstep), so one `topk` with the same k serves the whole batch.
    """
    rank = confidence.clone()
    if last is not None:
        rank = torch.where(last, rank - 2.0, rank)  # confidences lie in [0, 1]: -2 puts them below all
    rank = rank.masked_fill(block != mask_token_id, float("-inf"))
    chosen = rank.topk(k, dim=-1).indices
    return block.scatter(-1, chosen, proposed.gather(-1, chosen))


def reveal_above_threshold(
    block: torch.Tensor, proposed: torch.Tensor, confidence: torch.Tensor, k: int, threshold: float,
    mask_token_id: int, last: torch.Tensor | None = None, factor: float | None = None,
) -> torch.Tensor:
    """Confidence-aware parallel decoding (Fast-dLLM): reveal every masked position whose confidence exceeds
    `threshold`, and at least the k most confident ones (fewer only when fewer masks are left in the row).

    `factor` (Fast-dLLM's factor rule, in place of the threshold): with the row's masked confidences sorted,
    c_1 >= c_2 >= ..., reveal the longest prefix whose every n-th token has (n + 1)(1 - c_n) <= factor, i.e. a
    threshold 1 - factor / (n + 1) that rises with the number of tokens revealed together (their Theorem 1:
    greedy parallel decoding of n tokens agrees with sequential decoding when (n + 1) eps < 1, eps the largest
    1 - c); the first token always goes. Unlike the released code, a prefix that fails only at the row's last
    token does not reveal that token too.
    Rows may hold different numbers of masks here (they reveal different counts). `last` proposals (EOS under
    `confidence_eos_inf`) never pass and are ranked below every other masked position.
    """
    masked = block == mask_token_id
    rank = confidence.clone()
    if last is not None:
        rank = torch.where(last, rank - 2.0, rank)
    rank = rank.masked_fill(~masked, float("-inf"))
    ranked, order = rank.sort(dim=-1, descending=True, stable=True)
    if factor is None:
        passing = (ranked > threshold).sum(-1)
    else:
        n = torch.arange(1, block.shape[-1] + 1, device=block.device)
        ok = (n + 1) * (1 - ranked) <= factor
        ok[:, 0] = True
        passing = ok.long().cumprod(-1).sum(-1)  # the longest passing prefix
    count = torch.minimum(passing.clamp_min(k), masked.sum(-1))
    take = torch.arange(block.shape[-1], device=block.device) < count[:, None]
    chosen = torch.zeros_like(masked).scatter(-1, order, take)
    return torch.where(chosen, proposed, block)


# --------------------------------------------------------------------------------------------------
# The batched driver.


@dataclass
class GenerationOutput:
    token_ids: list[int]  # generated ids, ended as described in the module docstring
    finish_reason: str  # "eos" | "stop_token" | "stop_string" | "length"
    n_forward: int = 0  # forward passes this prompt took part in


def _as_prompt_list(prompt_ids) -> tuple[list[torch.Tensor], bool]:
    """(list of 1-D LongTensors, single?) from a tensor, a list of ints or a list of those."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.ndim == 1:
            return [prompt_ids.long()], True
        if prompt_ids.ndim == 2:
            return [row.long() for row in prompt_ids], False
        raise ValueError(f"prompt_ids must be 1-D (one prompt) or 2-D, got shape {tuple(prompt_ids.shape)}")
    if isinstance(prompt_ids, Sequence) and not isinstance(prompt_ids, str):
        if len(prompt_ids) == 0 or all(isinstance(t, numbers.Integral) for t in prompt_ids):
            return [torch.tensor(list(prompt_ids), dtype=torch.long)], True
        return [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompt_ids], False
    raise TypeError(f"prompt_ids must be a tensor, a list of ints or a list of those, got {type(prompt_ids).__name__}")


def _check_prompts(prompts: list[torch.Tensor], mask_id: int, budget: int, max_seq_len: int | None) -> None:
    if not prompts:
        raise ValueError("no prompts given (empty batch)")
    for i, p in enumerate(prompts):
        if p.numel() == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        if bool((p == mask_id).any()):
            pos = int((p == mask_id).nonzero()[0])
            raise ValueError(f"prompt {i} contains the mask token id {mask_id} at position {pos}")
        if max_seq_len is not None and p.numel() + budget > max_seq_len:
            raise ValueError(
                f"prompt {i} has {p.numel()} tokens; with {budget} generated tokens that is "
                f"{p.numel() + budget} > model.max_seq_len={max_seq_len}"
            )


def _stop_string_cut(ids: list[int], stop_strings: list[str], decode: Callable) -> int | None:
    """Length of the shortest prefix of `ids` whose decoding contains a stop string (None: none)."""
    if not any(s in decode(ids) for s in stop_strings):
        return None
    lo, hi = 1, len(ids)  # containment is monotone in the prefix length: binary search
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(ids[:mid]) for s in stop_strings):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _finish(ids: list[int], end_ids: dict[int, str], stop_strings, decode) -> tuple[list[int], str | None]:
    """Cut a response at its first end token or stop string; (ids, reason or None if it did not end)."""
    for i, t in enumerate(ids):
        if t in end_ids:
            ids, reason = ids[:i], end_ids[t]
            break
    else:
        reason = None
    if stop_strings and decode is not None:
        cut = _stop_string_cut(ids, stop_strings, decode)
        if cut is not None:
            return ids[:cut], "stop_string"
    return ids, reason


def generate_batch(
    model,
    prompts: list[torch.Tensor],
    config: SamplerConfig,
    *,
    generator: torch.Generator | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> list[GenerationOutput]:
    """Generate for every prompt at once (see the module docstring); one batched forward per step."""
    special = model_special_ids(model)
    mask_id = config.mask_token_id if config.mask_token_id is not None else special["mask_token_id"]
    eos_id = config.eos_token_id if config.eos_token_id is not None else special["eos_token_id"]
    if mask_id is None:
        raise ValueError("mask_token_id is unknown: the model has no config; pass mask_token_id=...")
    if config.stop_strings and decode is None:
        raise ValueError("stop_strings need a `decode` callable or a `tokenizer`")
    _check_prompts(prompts, mask_id, config.budget, special["max_seq_len"])
    check_cacheable(model, config.cache)
    device = model_device(model)
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)

    end_ids = {t: "stop_token" for t in config.stop_token_ids}
    if eos_id is not None:
        end_ids[eos_id] = "eos"
    end_tensor = torch.tensor(sorted(end_ids), dtype=torch.long, device=device)

    B, budget = len(prompts), config.budget
    prompt_lens = torch.tensor([p.numel() for p in prompts])
    prompt_starts = cu_seqlens_from_lengths(prompt_lens)[:-1].long()
    n_prompt_tokens = int(prompt_lens.sum())
    # Source of every pack: all prompt tokens, then each prompt's response canvas (budget slots).
    source = torch.cat([torch.cat(prompts).to(device), torch.full((B * budget,), mask_id, device=device)])
    active = list(range(B))  # host-side: prompts still generating
    think_done = [False] * B
    n_forward = [0] * B
    plan = config.block_plan()

    with inference_context(device, config.precision, model):
        for block_index, (start, length, schedule) in enumerate(plan):
            if not active:
                break
            visible = start + length if config.variable_length else budget
            act = torch.tensor(active)
            seq_lens = prompt_lens[act] + visible
            cu = cu_seqlens_from_lengths(seq_lens)
            # Each packed sequence: its prompt, then `visible` slots of its canvas.
            seq, local = segment_positions(seq_lens)
            is_prompt = local < prompt_lens[act][seq]
            src = torch.where(is_prompt, prompt_starts[act][seq] + local,
                              n_prompt_tokens + act[seq] * budget + local - prompt_lens[act][seq])
            block_pos = (cu[:-1].long() + prompt_lens[act])[:, None] + start + torch.arange(length)
            src, is_prompt, block_pos = src.to(device), is_prompt.to(device), block_pos.to(device)
            x = source[src]
            bias = _think_bias(config, active, think_done, start, device)
            forward = BlockForward(model, seq_lens, prompt_lens[act], start, length, is_prompt, mask_id,
                                   config.cfg_scale, config.cache, device, config.cuda_graph)

            for k in schedule:
                fwd = forward(x)
                scores = fwd.scores(block_pos)  # [A, length, V]
                scores[..., mask_id] = float("-inf")  # the mask predictor predicts clean tokens only
                if config.logits_eos_inf and eos_id is not None:
                    scores[..., eos_id] = float("-inf")
                if bias is not None:
                    scores[..., config.think_end_token_id] += bias
                proposed = propose_tokens(scores, config.temperature, generator)
                confidence = proposal_confidence(scores, proposed, config.remasking, generator)
                last = (proposed == eos_id) if config.confidence_eos_inf and eos_id is not None else None
                if config.parallel == "off":
                    block = reveal_step(x[block_pos], proposed, confidence, k, mask_id, last)
                else:
                    block = reveal_above_threshold(x[block_pos], proposed, confidence, k, config.threshold,
                                                   mask_id, last, config.factor if config.parallel == "factor" else None)
                x[block_pos] = block
                if config.parallel != "off" and not bool((block == mask_id).any()):  # host sync per step
                    break
            for b in active:
                n_forward[b] += forward.calls

            # Write the decoded block back to the canvases, then decide who stops (one sync per block).
            canvas_pos = n_prompt_tokens + act.to(device)[:, None] * budget + start + torch.arange(length, device=device)
            source[canvas_pos] = x[block_pos]
            if block_index == len(plan) - 1:
                break
            active = _still_active(source, active, start + length, end_tensor, n_prompt_tokens, budget,
                                   config, decode, think_done)

    return _collect(source, n_prompt_tokens, B, budget, end_ids, mask_id, config, decode, n_forward)


def _think_bias(config: SamplerConfig, active, think_done, generated: int, device) -> torch.Tensor | None:
    if config.think_end_token_id is None or config.think_boost_max == 0:
        return None
    value = think_boost(config, generated)
    if value == 0:
        return None
    return torch.tensor([[0.0 if think_done[b] else value] for b in active], device=device)


def _still_active(source, active, decoded, end_tensor, n_prompt_tokens, budget, config, decode, think_done):
    """Prompts whose decoded response (first `decoded` tokens) has not ended yet; updates think_done."""
    act = torch.tensor(active, device=source.device)
    canvas = source[n_prompt_tokens:].view(-1, budget)[act, :decoded]
    ended = torch.isin(canvas, end_tensor).any(1)
    think = (canvas == config.think_end_token_id).any(1) if config.think_end_token_id is not None else None
    ended_host = ended.tolist()
    if think is not None:
        for b, flag in zip(active, think.tolist()):
            think_done[b] = think_done[b] or flag
    if config.stop_strings:
        rows = canvas.tolist()
        ended_host = [e or any(s in decode(r) for s in config.stop_strings) for e, r in zip(ended_host, rows)]
    return [b for b, e in zip(active, ended_host) if not e]


def _collect(source, n_prompt_tokens, B, budget, end_ids, mask_id, config, decode, n_forward):
    canvases = source[n_prompt_tokens:].view(B, budget).tolist()
    outputs = []
    for b, ids in enumerate(canvases):
        ids, reason = _finish(ids, end_ids, config.stop_strings, decode)
        if mask_id in ids:  # cannot happen: every slot before the end is decoded
            raise RuntimeError("internal error: a mask token survived generation")
        outputs.append(GenerationOutput(ids, reason or "length", n_forward[b]))
    return outputs


def generate(model, prompt_ids, *, generator: torch.Generator | None = None, decode=None, tokenizer=None, **options):
    """Generate continuations of one prompt or a batch of prompts of different lengths.

    `prompt_ids`: a 1-D LongTensor or a list of ints (one prompt -> one list of ids), or a list of those /
    a 2-D tensor (a batch -> a list of lists). Options: see `SamplerConfig` (unknown -> TypeError).
    `decode` (ids -> str) or `tokenizer` (with `.decode`) is needed for `stop_strings`.
    """
    config = sampler_config(**options)
    prompts, single = _as_prompt_list(prompt_ids)
    if decode is None and tokenizer is not None:
        decode = tokenizer.decode
    outputs = generate_batch(model, prompts, config, generator=generator, decode=decode)
    ids = [o.token_ids for o in outputs]
    return ids[0] if single else ids


@dataclass
class ChatTurn:
    reply_ids: list[int]  # the assistant reply, without its end token
    history_ids: list[int]  # the conversation with the reply and `turn_end_id` appended: the next prompt prefix
    finish_reason: str


def chat_turn(model, conversation_ids, *, turn_end_id: int | None = None, generator=None, decode=None,
              tokenizer=None, **options) -> ChatTurn:
    """One assistant turn: generate a reply to the token ids of a templated conversation (which must end
    with the assistant header), with variable-length generation by default, and return the reply plus the
    conversation extended by it (and `turn_end_id`, default EOS) for the next turn."""
    options.setdefault("variable_length", True)
    config = sampler_config(**options)
    prompts, single = _as_prompt_list(conversation_ids)
    if not single:
        raise ValueError("chat_turn takes one conversation (a 1-D tensor or a list of ints)")
    if decode is None and tokenizer is not None:
        decode = tokenizer.decode
    out = generate_batch(model, prompts, config, generator=generator, decode=decode)[0]
    end = turn_end_id if turn_end_id is not None else (
        config.eos_token_id if config.eos_token_id is not None else model_special_ids(model)["eos_token_id"])
    history = prompts[0].tolist() + out.token_ids + ([end] if end is not None else [])
    return ChatTurn(out.token_ids, history, out.finish_reason)
