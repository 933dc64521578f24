"""Chunked prefill into a model's KV cache, then cached greedy decoding: long prompts without long activations.

Torchtune's ``generate`` prefills the whole prompt in one forward pass, so activations and the attention scores of
that pass grow with the prompt (``[b, s, n_h, s]`` scores for MLA's absorbed path). Here the prompt goes through the
decoder ``prefill_chunk`` tokens at a time, each chunk attending to everything cached before it, and only the last
position is unembedded. The cache itself (latent for MLA, K/V for GQA) is the only thing that grows with the
context. Decoding then runs one token at a time against the cache, through whatever kernel backend the attention
module is configured with.
"""

from __future__ import annotations

import torch
from torchtune.modules import TransformerDecoder


def _hidden_states(
    model: TransformerDecoder, tokens: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor
) -> torch.Tensor:
    """The decoder's forward up to (excluding) the final norm and unembedding.

    ``TransformerDecoder.forward`` unembeds every position (``[b, s, vocab]`` fp32 logits, 1 GiB for a 2k chunk
    of a 128k-vocab model); prefill needs the logits of the last position only.

    Args:
        tokens: ``[b, s]`` ids.
        mask: ``[b, s, cache_len]`` boolean, True = attend.
        input_pos: ``[b, s]`` positions.

    Returns:
        ``[b, s, d]`` hidden states.
    """
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, mask=mask, input_pos=input_pos)
    return h


def causal_cache_mask(start: int, length: int, cache_len: int, device: torch.device) -> torch.Tensor:
    """``[1, length, cache_len]`` boolean mask for queries at positions ``start .. start + length - 1``: each sees the
    cached positions up to and including its own (the same mask Torchtune's ``generate`` slices from its causal
    mask over the cache)."""
    keys = torch.arange(cache_len, device=device)
    queries = torch.arange(start, start + length, device=device)
    return (keys[None, :] <= queries[:, None]).unsqueeze(0)


@torch.inference_mode()
def chunked_prefill_greedy(
    model: TransformerDecoder,
    prompt: list[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    prefill_chunk: int = 512,
    stop_tokens: list[int] | None = None,
) -> list[int]:
    """Greedy continuation of one prompt through a KV cache that the caller has set up.

    The caches must be set up (``model.setup_caches`` or ``torchtune.modules.common_utils.local_kv_cache``) with
    batch size 1 and room for ``len(prompt) + max_new_tokens`` tokens; they are reset here first, so one
    allocation serves many prompts of up to that length.

    Args:
        model: a Torchtune decoder with caches set up (MLA caches the latent, GQA caches K/V).
        prompt: ``[s]`` token ids.
        max_new_tokens: the most tokens to generate.
        prefill_chunk: prompt tokens per prefill forward pass; bounds the activations and the ``[chunk, n_h,
            cache_len]`` attention scores of prefill.
        stop_tokens: ids that end generation (the stop token itself is not returned).

    Returns:
        The generated ids (at most ``max_new_tokens``), without the prompt.

    Raises:
        ValueError: if the caches are not set up, are too short for the request, or an argument is out of range.
    """
    if not model.caches_are_enabled():
        raise ValueError("set up the model's KV caches first (model.setup_caches or local_kv_cache)")
    if prefill_chunk < 1 or max_new_tokens < 1:
        raise ValueError(f"prefill_chunk ({prefill_chunk}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    device = model.tok_embeddings.weight.device
    prompt = torch.as_tensor(prompt, dtype=torch.long, device=device).view(1, -1)
    prompt_len = prompt.shape[1]
    cache_len = model.decoder_max_cache_seq_len
    if prompt_len + max_new_tokens > cache_len:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceed the KV cache ({cache_len}); "
            "set up the caches with a larger decoder_max_seq_len"
        )
    model.reset_caches()
    stop = set(stop_tokens or [])

    hidden = None
    for start in range(0, prompt_len, prefill_chunk):
        chunk = prompt[:, start : start + prefill_chunk]
        positions = torch.arange(start, start + chunk.shape[1], device=device).unsqueeze(0)
        mask = causal_cache_mask(start, chunk.shape[1], cache_len, device)
        hidden = _hidden_states(model, chunk, mask, positions)

    generated: list[int] = []
    position = prompt_len
    logits = model.unembed(hidden[:, -1:])  # [1, 1, vocab]
    while True:
        token = int(logits[0, -1].argmax())
        if token in stop:
            break
        generated.append(token)
        if len(generated) == max_new_tokens:
            break
        mask = causal_cache_mask(position, 1, cache_len, device)
        step = torch.tensor([[token]], device=device)
        logits = model.unembed(_hidden_states(model, step, mask, torch.tensor([[position]], device=device)))
        position += 1
    return generated
