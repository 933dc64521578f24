"""Greedy decoding through a model's KV caches, for every caller (the main job, passkey evaluation, the serving and
conversion checks). Both functions drive the decoder through its public interface only, ``model(tokens, mask=...,
input_pos=...)`` with its caches set up, so any Torchtune decoder works (MLA caches the latent, GQA caches K/V) and
cached decoding runs through whatever kernel backend the attention modules resolved.

- :func:`greedy_generate`: a batch of prompts (left-padded with ``pad_id``), prompt + new tokens in one cache,
  logits returned; Torchtune's own ``generate`` with ``top_k=1`` (an argmax).
- :func:`chunked_prefill_greedy`: one long prompt into caches the caller set up once for many prompts. Torchtune's
  ``generate`` prefills the whole prompt in one forward pass, so activations and the attention scores of that pass
  grow with the prompt (``[b, s, n_h, s]`` scores for MLA); here the prompt goes through the decoder
  ``prefill_chunk`` tokens at a time, each chunk attending to everything cached before it. The cache is then the
  only thing that grows with the context; decoding runs one token at a time against it.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right
from torchtune.generation import generate
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import local_kv_cache

from mla_components.modules import MultiHeadLatentAttention
from mla_components.modules.kv_cache import causal_cache_mask

__all__ = ["causal_cache_mask", "chunked_prefill_greedy", "greedy_generate"]


@torch.inference_mode()
def greedy_generate(
    model: TransformerDecoder,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    stop_tokens: list[int] | None = None,
    cache_dtype: torch.dtype | None = None,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with a KV cache sized to prompt + new tokens.

    Args:
        model: any Torchtune decoder (MLA caches only the latent; GQA caches K/V).
        prompt: token ids ``[s]`` or ``[b, s]``.
        max_new_tokens: tokens to generate.
        stop_tokens: ids that end a sequence.
        cache_dtype: cache dtype (default: the model's parameter dtype).

    Returns:
        ``(tokens [b, s + n], logits [b, n, vocab])`` as Torchtune's ``generate`` returns them.
    """
    prompt = prompt.view(1, -1) if prompt.ndim == 1 else prompt
    param = next(model.parameters())
    with local_kv_cache(
        model,
        batch_size=prompt.shape[0],
        device=param.device,
        dtype=cache_dtype or param.dtype,
        decoder_max_seq_len=prompt.shape[1] + max_new_tokens,
    ):
        # top_k=1 makes Torchtune's sampler an argmax
        return generate(
            model,
            prompt,
            max_generated_tokens=max_new_tokens,
            pad_id=pad_id,
            top_k=1,
            stop_tokens=stop_tokens,
        )


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
        prefill_chunk: prompt tokens per prefill forward pass; bounds the activations, the ``[chunk, n_h,
            cache_len]`` attention scores and the ``[chunk, vocab]`` logits of prefill.
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
    # MLA layers take prefill chunks' causal mask as SDPA's lower-right CausalBias (the fused kernels, no [chunk,
    # cache_len] boolean mask); other attention modules (Torchtune's GQA) need the boolean mask over the cache.
    takes_causal_bias = all(
        isinstance(getattr(layer, "attn", None), MultiHeadLatentAttention) for layer in model.layers
    )

    def forward(tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Logits ``[1, vocab]`` of the last of ``tokens [1, s]`` (at positions ``start ..``), cached."""
        length = tokens.shape[1]
        positions = torch.arange(start, start + length, device=device).unsqueeze(0)
        if takes_causal_bias and length > 1:
            mask = causal_lower_right(length, start + length)
        else:
            mask = causal_cache_mask(start, length, cache_len, device)
        return model(tokens, mask=mask, input_pos=positions)[:, -1]

    for start in range(0, prompt_len, prefill_chunk):
        logits = forward(prompt[:, start : start + prefill_chunk], start)

    generated: list[int] = []
    position = prompt_len
    while True:
        token = int(logits[0].argmax())
        if token in stop:
            break
        generated.append(token)
        if len(generated) == max_new_tokens:
            break
        logits = forward(torch.tensor([[token]], device=device), position)
        position += 1
    return generated
