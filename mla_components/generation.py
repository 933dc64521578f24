"""Cached generation through Torchtune's own ``generate`` (one implementation for demo, eval and serving checks)."""

import torch
from torchtune.generation import generate
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import local_kv_cache


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
