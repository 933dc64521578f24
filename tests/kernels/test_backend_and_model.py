"""Backend resolution, and the same checkpoint generating the same tokens with the torch and triton backends."""

import os
import subprocess
import sys

import pytest
import torch

from mla_components.decoding import greedy_generate
from mla_components.models import mla_tiny
from mla_components.modules import backend
from mla_components.modules.backend import resolve_backend
from tests._requirements import unavailable


def test_resolve_backend_rules(monkeypatch):
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("torch", "cuda") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"
    assert resolve_backend("auto", "cpu") == "torch", "the interpreter is for tests; auto never picks it"


def test_resolve_backend_errors_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        resolve_backend("cuda", "cpu")
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install"):
        resolve_backend("triton", "cuda")
    assert resolve_backend("auto", "cuda") == "torch"


def test_the_decode_backend_is_resolved_once_per_cache_setup_not_per_step(monkeypatch):
    from mla_components.modules import attention

    calls = []
    real = attention.resolve_backend
    monkeypatch.setattr(attention, "resolve_backend", lambda *a: calls.append(a) or real(*a))
    model = _tiny("auto", "cpu")
    greedy_generate(model, torch.randint(1, 512, (9,), generator=torch.Generator().manual_seed(0)), 6)
    assert len(calls) == len(model.layers), "one resolution per attention module, at setup_caches"
    assert {layer.attn.decode_backend for layer in model.layers} == {"torch"}  # auto on CPU


def _tiny(kernel_backend, device):
    torch.manual_seed(0)
    model = mla_tiny(max_seq_len=256, kernel_backend=kernel_backend)
    with torch.no_grad():
        for p in model.parameters():  # a random model with peaked logits, so argmax is decisive
            if p.ndim > 1:
                p.normal_(0, 0.08)
    return model.to(device).eval()


def test_mla_tiny_greedy_generation_same_tokens_with_torch_and_triton(device, monkeypatch):
    if not backend.triton_available():
        unavailable('triton is not installed (pip install -e ".[triton]"; the interpreter runs it on CPU)')
    from mla_kernels import mla_decode as mla_decode_module

    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real = mla_decode_module.mla_decode
    monkeypatch.setattr(mla_decode_module, "mla_decode", lambda *a, **k: calls.append(1) or real(*a, **k))

    prompts = torch.randint(1, 512, (2, 13), generator=torch.Generator().manual_seed(3)).to(device)
    prompts[1, :4] = 0  # left padding: the decode masks are not plain prefixes
    ref_model, tri_model = _tiny("torch", device), _tiny("triton", device)
    tri_model.load_state_dict(ref_model.state_dict())
    want, want_logits = greedy_generate(ref_model, prompts, max_new_tokens=6, pad_id=0)
    assert calls == [], "the torch backend must not call the kernel"
    # eager decode steps, so that each one calls the kernel from Python (a CUDA graph replays without calling it)
    got, got_logits = greedy_generate(tri_model, prompts, max_new_tokens=6, pad_id=0, cuda_graph=False)
    layers = len(tri_model.layers)
    assert len(calls) == 5 * layers, "every decode step of every layer goes through the kernel (prefill does not)"
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    if device.type == "cuda":  # the default on CUDA: the same steps replayed from a graph
        graphed, graphed_logits = greedy_generate(tri_model, prompts, max_new_tokens=6, pad_id=0)
        assert torch.equal(graphed, want)
        torch.testing.assert_close(graphed_logits, want_logits, atol=1e-4, rtol=1e-4)


def test_triton_backend_trains_with_the_triton_norm_and_rope_and_the_same_numerics(device):
    """``kernel_backend="triton"`` builds every RMSNorm and the decoupled RoPE from the Triton kernels; one training
    step (forward, loss, backward) gives the torch backend's loss and gradients, from the same state dict."""
    from mla_components.models import mla
    from mla_components.modules.triton_layers import TritonDecoupledRotaryEmbedding, TritonRMSNorm
    from tests.model.conftest import YARN, randomize_, small_config

    if not backend.triton_available():
        unavailable('triton is not installed (pip install -e ".[triton]"; the interpreter runs it on CPU)')
    reference = randomize_(mla(small_config(kernel_backend="torch", rope_scaling=YARN)), seed=5).to(device)
    triton_model = mla(small_config(kernel_backend="triton", rope_scaling=YARN)).to(device)
    triton_model.load_state_dict(reference.state_dict())
    norms = [m for m in triton_model.modules() if isinstance(m, TritonRMSNorm)]
    assert len(norms) == 2 * 2 + 2 * 2 + 1  # per layer: sa/mlp norm, q_a/kv_a norm; the final norm
    assert isinstance(triton_model.layers[0].attn.pos_embeddings, TritonDecoupledRotaryEmbedding)

    tokens = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0)).to(device)
    losses, grads = [], []
    for model in (reference, triton_model):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


_TRITON_PATH = """
import torch
from mla_components.decoding import greedy_generate
from mla_components.models import mla_tiny

torch.manual_seed(0)
triton_model = mla_tiny(max_seq_len=64, kernel_backend="triton").eval()
torch_model = mla_tiny(max_seq_len=64, kernel_backend="torch").eval()
torch_model.load_state_dict(triton_model.state_dict())
prompt = torch.randint(1, 256, (13,), generator=torch.Generator().manual_seed(1))
tokens, logits = greedy_generate(triton_model, prompt, 4)
ref_tokens, ref_logits = greedy_generate(torch_model, prompt, 4)
assert torch.equal(tokens, ref_tokens), (tokens, ref_tokens)
torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
print("triton path OK")
"""


def test_triton_backend_runs_under_the_interpreter_outside_pytest(tmp_path):
    """A user's script with ``TRITON_INTERPRET=1`` and ``kernel_backend="triton"`` (RMSNorm, RoPE and the decode
    kernel): the interpreter fix for Triton 3.6 + NumPy >= 2.4 comes from the package, not from this conftest."""
    if not backend.triton_available():
        unavailable('triton is not installed (pip install -e ".[triton]"; the interpreter runs it on CPU)')
    if torch.cuda.is_available():
        pytest.skip("the interpreter path is the CPU path")
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_PATH],
        cwd=tmp_path,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "triton path OK" in proc.stdout, proc.stderr[-3000:]
