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
  only thing that grows with the context; decoding runs one token at a time against it
  (:func:`cached_greedy_decode`).

On CUDA both replay each decode step from a CUDA graph by default (:class:`CudaGraphStep`): a step of a 30-layer model
is several hundred small kernels, and launching them one by one from Python costs more than the step's memory
traffic at batch 1. Prefill runs eagerly (its shapes change from chunk to chunk).
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right
from torchtune.generation import generate, sample
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import local_kv_cache

from mla_components.compat.torchtune import kv_cache_without_host_check
from mla_components.modules import MultiHeadLatentAttention
from mla_components.modules.kv_cache import causal_cache_mask

__all__ = ["CudaGraphStep", "cached_greedy_decode", "causal_cache_mask", "chunked_prefill_greedy", "greedy_generate"]


class CudaGraphStep:
    """One cached decode step, ``model(x, input_pos=input_pos, mask=mask)[:, -1]`` with ``x [b, 1]``, ``input_pos``
    ``[b, 1]`` (or ``[b]``) and a boolean ``mask [b, 1, cache_len]`` -> logits ``[b, vocab]``, replayed from a
    CUDA graph.

    The first call with a given set of input shapes runs eagerly (it also compiles the Triton kernels and warms up
    cuBLAS) and then captures the step for the next calls, which copy their inputs into the graph's static tensors and
    replay it. Capturing records kernels without running them, so the caches advance exactly once per call. The graph
    holds the caches' addresses: one instance serves one cache allocation (``reset_caches`` zeroes them in place, so
    that is fine; a new ``setup_caches`` needs a new instance). Callers check that the cache has room on the host
    first: the caches' own overflow assertions are host reads of a device tensor, which capture forbids, so they are
    left out of the captured step.

    Off CUDA (or when disabled) it simply calls the model.

    Args:
        model (TransformerDecoder): a decoder with caches set up.
        enabled (bool | None): capture on CUDA (None: when the model's weights are on CUDA).
    """

    def __init__(self, model: TransformerDecoder, enabled: bool | None = None):
        self.model = model
        on_cuda = model.tok_embeddings.weight.device.type == "cuda"
        self.enabled = on_cuda if enabled is None else enabled and on_cuda
        self._graph: torch.cuda.CUDAGraph | None = None
        self._shapes: tuple | None = None
        self._inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = ()
        self._logits: torch.Tensor | None = None

    def _forward(self, x: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(x, input_pos=input_pos, mask=mask)[:, -1]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self._forward(x, input_pos, mask)
        shapes = (x.shape, input_pos.shape, mask.shape, x.dtype, input_pos.dtype)
        if shapes != self._shapes:
            return self._run_and_capture(x, input_pos, mask, shapes)
        for static, value in zip(self._inputs, (x, input_pos, mask), strict=True):
            static.copy_(value, non_blocking=True)
        self._graph.replay()
        return self._logits.clone()  # the next replay overwrites the static output

    def _run_and_capture(self, x, input_pos, mask, shapes) -> torch.Tensor:
        # the eager step on a side stream, as torch.cuda.graph's documentation asks of warm-up before a capture
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            logits = self._forward(x, input_pos, mask)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        self._inputs = (x.clone(), input_pos.clone(), mask.clone())
        graph = torch.cuda.CUDAGraph()
        with kv_cache_without_host_check(), torch.cuda.graph(graph):
            self._logits = self._forward(*self._inputs)
        self._graph, self._shapes = graph, shapes
        return logits

    def next_token(
        self,
        model: TransformerDecoder,
        input_pos: torch.Tensor,
        x: torch.Tensor,
        q: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Torchtune's ``generate_next_token`` (its ``custom_generate_next_token`` hook) through this step;
        sampling runs eagerly after the replay, so the random draw stays Torchtune's."""
        if model is not self.model or mask is None:
            raise ValueError("CudaGraphStep.next_token drives the model it was built for, with a mask over the cache")
        logits = self(x, input_pos, mask)
        return sample(logits, temperature=temperature, top_k=top_k, q=q), logits.unsqueeze(1)


@torch.inference_mode()
def greedy_generate(
    model: TransformerDecoder,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    stop_tokens: list[int] | None = None,
    cache_dtype: torch.dtype | None = None,
    pad_id: int = 0,
    cuda_graph: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with a KV cache sized to prompt + new tokens.

    Args:
        model: any Torchtune decoder (MLA caches only the latent; GQA caches K/V).
        prompt: token ids ``[s]`` or ``[b, s]``.
        max_new_tokens: tokens to generate.
        stop_tokens: ids that end a sequence.
        cache_dtype: cache dtype (default: the model's parameter dtype).
        cuda_graph: replay decode steps from a CUDA graph (:class:`CudaGraphStep`; None: on CUDA).

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
        step = CudaGraphStep(model, cuda_graph)
        # top_k=1 makes Torchtune's sampler an argmax
        return generate(
            model,
            prompt,
            max_generated_tokens=max_new_tokens,
            pad_id=pad_id,
            top_k=1,
            stop_tokens=stop_tokens,
            custom_generate_next_token=step.next_token if step.enabled else None,
        )


@torch.inference_mode()
def chunked_prefill_greedy(
    model: TransformerDecoder,
    prompt: list[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    prefill_chunk: int = 512,
    stop_tokens: list[int] | None = None,
    cuda_graph: bool | None = None,
    step: CudaGraphStep | None = None,
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
        cuda_graph: replay decode steps from a CUDA graph (:class:`CudaGraphStep`; None: on CUDA).
        step: the decode step to run (a :class:`CudaGraphStep` of this model and cache), so that one capture
            serves many prompts; overrides ``cuda_graph``.

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

    for start in range(0, prompt_len, prefill_chunk):
        length = min(prefill_chunk, prompt_len - start)
        positions = torch.arange(start, start + length, device=device).unsqueeze(0)
        if takes_causal_bias and length > 1:
            mask = causal_lower_right(length, start + length)
        else:
            mask = causal_cache_mask(start, length, cache_len, device)
        logits = model(prompt[:, start : start + length], mask=mask, input_pos=positions)[:, -1]

    token = int(logits[0].argmax())
    if token in stop:
        return []
    return [token] + cached_greedy_decode(
        model, token, prompt_len, max_new_tokens - 1, stop_tokens=stop_tokens, cuda_graph=cuda_graph, step=step
    )


@torch.inference_mode()
def cached_greedy_decode(
    model: TransformerDecoder,
    token: int,
    position: int,
    max_new_tokens: int,
    *,
    stop_tokens: list[int] | None = None,
    cuda_graph: bool | None = None,
    step: CudaGraphStep | None = None,
) -> list[int]:
    """Greedy decoding of one sequence from a filled cache: ``token`` goes in at ``position`` (the caches hold
    positions ``0 .. position - 1``), then each generated token at the next position.

    Args:
        model: a Torchtune decoder with caches set up for batch size 1.
        token: the first input token (the last one generated).
        position: its position, i.e. how many positions the caches hold.
        max_new_tokens: the most tokens to generate.
        stop_tokens: ids that end generation (the stop token itself is not returned).
        cuda_graph: replay the steps from a CUDA graph (None: on CUDA); ignored when ``step`` is given.
        step: the step to run (a :class:`CudaGraphStep` of this model), to reuse one capture across calls.

    Returns:
        The generated ids (at most ``max_new_tokens``).

    Raises:
        ValueError: if the caches cannot hold ``position + max_new_tokens`` tokens.
    """
    cache_len = model.decoder_max_cache_seq_len
    if position + max_new_tokens > cache_len:
        raise ValueError(
            f"position ({position}) + max_new_tokens ({max_new_tokens}) exceed the KV cache ({cache_len}); "
            "set up the caches with a larger decoder_max_seq_len"
        )
    step = step or CudaGraphStep(model, cuda_graph)
    device = model.tok_embeddings.weight.device
    keys = torch.arange(cache_len, device=device)
    stop = set(stop_tokens or [])
    x = torch.tensor([[token]], device=device)
    input_pos = torch.tensor([[position]], device=device)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = step(x, input_pos, (keys <= input_pos).view(1, 1, cache_len))
        x = logits.argmax(dim=-1, keepdim=True)  # stays on the device; one host read per token, for the stop test
        token = int(x)
        if token in stop:
            break
        generated.append(token)
        input_pos = input_pos + 1
    return generated
