"""``mla_kernels.triton_launch.CompiledLauncher``: what it hands Triton's compiled launcher, and when it compiles.

Without a GPU there is no compiled launcher to call, so these tests put a stand-in where Triton's ``CompiledKernel``
would be and force the compiled path for CPU tensors; the kernel tests (``test_mla_decode.py``) run every
``mla_decode`` launch through the real one on a GPU.
"""

import pytest
import torch

from tests._requirements import require_module

require_module("triton", 'pip install -e ".[triton]"')

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import mla_kernels.triton_launch as launch_module  # noqa: E402
from mla_kernels.triton_launch import CompiledLauncher  # noqa: E402


@triton.jit
def _scale(x_ptr, out_ptr, factor, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=ok) * factor, mask=ok)


@triton.jit
def _constexpr_first(BLOCK: tl.constexpr, x_ptr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], dtype=tl.float32))


class CompiledStandIn:
    function = 1234
    packed_metadata = (4, 1, 0)

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


@pytest.fixture
def forced(monkeypatch):
    """A launcher of ``_scale`` on the compiled path for CPU tensors, compiling to stand-ins (listed in order)."""
    launcher = CompiledLauncher(_scale)
    compiled = []
    monkeypatch.setattr(launcher, "_launches_compiled", lambda tensor: True)
    monkeypatch.setattr(launcher, "_compile", lambda *args: compiled.append(CompiledStandIn()) or compiled[-1])
    monkeypatch.setattr(launch_module, "current_device", lambda: 0)
    monkeypatch.setattr(launch_module, "current_stream", lambda device_index: 77 + device_index)
    return launcher, compiled


def test_constexprs_are_named_and_ordered_like_the_kernel():
    launcher = CompiledLauncher(_scale)
    assert launcher.constexpr_values(EVEN=True, BLOCK=64) == (64, True)
    with pytest.raises(TypeError, match=r"missing \['EVEN'\], unknown \['EVNE'\]"):
        launcher.constexpr_values(BLOCK=64, EVNE=True)
    with pytest.raises(TypeError, match="constexpr parameters must come after"):
        CompiledLauncher(_constexpr_first)


@pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="CPU tensors run only in Triton's interpreter")
def test_cpu_tensors_launch_through_triton_itself():
    x = torch.arange(100, dtype=torch.float32)
    out = torch.empty_like(x)
    launcher = CompiledLauncher(_scale)
    launcher("plan", (2, 1, 1), (x, out), (0.5, 100), (64, False), dict(num_warps=4))
    torch.testing.assert_close(out, x * 0.5)
    assert launcher._kernels == {}


def test_interpreter_hooks_and_instrumentation_take_tritons_own_launch(monkeypatch):
    """The compiled path needs a jitted kernel (not the interpreter's wrapper, which also runs CUDA tensors) and
    none of what Triton's own launch does per call for hooks, debug or instrumentation."""
    launcher = CompiledLauncher(_scale)
    if triton.knobs.runtime.interpret:
        assert not launcher.compiled_launch
    monkeypatch.setattr(launcher, "compiled_launch", True)
    cuda_tensor = torch.empty(0, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert launcher._launches_compiled(cuda_tensor)
    for knob, name, value in [
        (triton.knobs.runtime, "launch_enter_hook", lambda metadata: None),  # a plain function, not a HookChain
        (triton.knobs.runtime, "debug", True),
        (triton.knobs.compilation, "instrumentation_mode", "consan"),
    ]:
        with monkeypatch.context() as patch:
            patch.setattr(knob, name, value)
            assert not launcher._launches_compiled(cuda_tensor), name
    with monkeypatch.context() as patch:
        patch.setattr(launcher.fn, "pre_run_hooks", [lambda *args, **kwargs: None])
        assert not launcher._launches_compiled(cuda_tensor)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", None)
    assert launcher._launches_compiled(cuda_tensor)


def test_the_environment_turns_the_compiled_path_off(monkeypatch):
    monkeypatch.setattr(launch_module.triton, "__version__", "3.6.0")
    monkeypatch.setattr(launch_module.torch.version, "hip", None)
    monkeypatch.setenv(launch_module.DISABLE_ENV, "1")
    assert launch_module._compiled_launch_supported()
    monkeypatch.setenv(launch_module.DISABLE_ENV, "0")
    assert not launch_module._compiled_launch_supported()
    monkeypatch.delenv(launch_module.DISABLE_ENV)
    monkeypatch.setattr(launch_module.triton, "__version__", "3.7.0")  # another release: its own launch
    assert not launch_module._compiled_launch_supported()


def test_compiled_path_passes_addresses_scalars_and_constexprs_in_parameter_order(forced):
    launcher, compiled = forced
    x, out = torch.zeros(64), torch.zeros(64)
    for factor in (0.5, 2.0):  # floats are not specialised: one kernel for both
        launcher("plan", (3, 1, 1), (x, out), (factor, 64), (32, True), dict(num_warps=4))
    assert len(compiled) == 1 and launcher.last_kernel is compiled[0]
    first, second = compiled[0].launches
    assert first == (3, 1, 1, 77, 1234, (4, 1, 0), None, None, None, x.data_ptr(), out.data_ptr(), 0.5, 64, 32, True)
    assert second[11] == 2.0


def test_another_plan_device_or_pointer_alignment_compiles_again(forced, monkeypatch):
    launcher, compiled = forced
    x, out = torch.zeros(65), torch.zeros(64)
    aligned, unaligned = x[:64], x[1:]
    assert aligned.data_ptr() % 16 == 0 and unaligned.data_ptr() % 16 == 4
    launcher("plan", (1, 1, 1), (aligned, out), (1.0, 64), (64, True), {})
    launcher("plan", (1, 1, 1), (unaligned, out), (1.0, 64), (64, True), {})
    launcher("plan", (1, 1, 1), (aligned, out), (1.0, 64), (64, True), {})
    launcher("other plan", (1, 1, 1), (aligned, out), (1.0, 64), (64, True), {})
    monkeypatch.setattr(launch_module, "current_device", lambda: 1)  # e.g. torch.cuda.set_device(1)
    launcher("plan", (1, 1, 1), (aligned, out), (1.0, 64), (64, True), {})
    assert [len(c.launches) for c in compiled] == [2, 1, 1, 1]
    assert compiled[1].launches[0][9] == unaligned.data_ptr()
    assert compiled[3].launches[0][3] == 78  # device 1's stream
