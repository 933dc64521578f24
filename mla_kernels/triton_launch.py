"""Launching a compiled Triton kernel without ``JITFunction.run``'s per-call work. Targets Triton 3.6.

Every ``kernel[grid](...)`` call binds and specialises each argument (dtype and 16-byte alignment of pointers,
value classes of integers), builds a cache key from them and the options, looks the compiled kernel up, and
then lets the launcher call ``data_ptr()`` and ``cuPointerGetAttribute`` on every tensor. For the decode kernels'
~50 parameters that was 40-70 µs of host time per launch on an H200 host (``docs/results/kernels.md``), paid on
every eager decode step.

:class:`CompiledLauncher` compiles once through Triton (``JITFunction.warmup``) per *plan* — a caller-supplied
key that fixes the pointers' dtypes, the integer arguments and the constexprs — and per alignment pattern of the
pointers, then calls the compiled kernel's launcher directly with raw device addresses. Everything Triton
specialises on is either fixed by the plan or part of the key (the alignment bits), so the kernel launched is
the one ``kernel[grid](...)`` would pick.

This depends on Triton internals (``CompiledKernel.run``'s argument order, the launcher accepting integer
addresses) and is used only on the Triton release it was written against (:data:`TRITON_RELEASE`), on NVIDIA
GPUs, outside ``torch.compile`` tracing, Triton's debug and instrumentation modes, and while no launch or pre-run
hook is installed (profilers such as Proton rely on them); everywhere else — the interpreter included — it
launches through ``kernel[grid](...)``, as it does everywhere with ``MLA_KERNELS_TRITON_LAUNCH=0`` in the environment
(read when the kernels' module is imported). The one per-call check of ``JITFunction.run`` it leaves out is that the
globals a kernel reads have not changed since it was compiled: these kernels read none.

:func:`compile_for_target` uses the same internals to compile a kernel for a GPU this machine does not have, and
:func:`compile_report` reads what the compiler decided (registers, spills, shared memory, pipelined loads).
"""

import inspect
import os

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver

TRITON_RELEASE = "3.6."  # the launcher protocol below is Triton 3.6's (triton/compiler/compiler.py, nvidia/driver.py)
MAX_KERNELS = 4096  # compiled kernels remembered per launcher (plans x alignment patterns); then forgotten


DISABLE_ENV = "MLA_KERNELS_TRITON_LAUNCH"  # set to 0 to always launch through kernel[grid](...)


def _compiled_launch_supported() -> bool:
    # NVIDIA only: ROCm builds also report "cuda" tensors, but Triton's AMD backend specialises on more than
    # alignment (buffer ops for tensors within 2 GB) and has its own launcher
    enabled = os.environ.get(DISABLE_ENV, "1") != "0"
    return enabled and triton.__version__.startswith(TRITON_RELEASE) and torch.version.hip is None


def _hooked(hook) -> bool:
    # Triton 3.6 keeps launch hooks in a HookChain; a user may also assign a plain function (or None)
    return bool(getattr(hook, "calls", hook))


def current_device() -> int:
    """The CUDA device Triton itself would launch on (the current one, not the tensors')."""
    return driver.active.get_current_device()


def current_stream(device_index: int) -> int:
    """The raw CUDA stream Triton itself would launch on."""
    return driver.active.get_current_stream(device_index)


class CompiledLauncher:
    """Launches one ``@triton.jit`` kernel whose parameters are laid out as pointers, then runtime scalars, then
    constexprs.

    Args:
        fn: the jitted kernel.
    """

    def __init__(self, fn: triton.runtime.JITFunction) -> None:
        # the Python function's signature: under TRITON_INTERPRET, ``fn`` is an interpreter wrapper without ``params``
        params = list(inspect.signature(fn.fn).parameters.values())
        is_constexpr = [p.annotation is tl.constexpr or p.annotation == "tl.constexpr" for p in params]
        constexprs = [p.name for p, const in zip(params, is_constexpr, strict=True) if const]
        if any(is_constexpr[: len(params) - len(constexprs)]):
            raise TypeError(f"{fn.fn.__name__}: constexpr parameters must come after all runtime parameters")
        self.fn = fn
        self.constexpr_names = tuple(constexprs)
        # under TRITON_INTERPRET ``fn`` is the interpreter's wrapper (CUDA tensors included): Triton's own launch
        self.compiled_launch = isinstance(fn, triton.runtime.JITFunction) and _compiled_launch_supported()
        self._kernels: dict = {}
        self.last_kernel = None  # the CompiledKernel of the latest launch (registers, spills; GPU only)

    def constexpr_values(self, **values) -> tuple:
        """The constexpr arguments in the kernel's parameter order (once per plan, not per launch)."""
        if set(values) != set(self.constexpr_names):
            missing, unknown = set(self.constexpr_names) - set(values), set(values) - set(self.constexpr_names)
            raise TypeError(f"{self.fn.fn.__name__}: constexprs missing {sorted(missing)}, unknown {sorted(unknown)}")
        return tuple(values[name] for name in self.constexpr_names)

    def __call__(
        self,
        plan,
        grid: tuple[int, int, int],
        pointers: tuple[torch.Tensor, ...],
        scalars: tuple,
        constexprs: tuple,
        options: dict,
    ) -> None:
        """Launch on ``grid``.

        ``plan`` is a hashable that must determine everything Triton specialises on except the pointers'
        alignment: the pointers' dtypes and device, every integer in ``scalars``, the ``constexprs`` (from
        :meth:`constexpr_values`) and Triton's launch ``options`` (``num_warps``, ``num_stages``). Floats are
        not specialised and may change between calls under one plan.
        """
        first = pointers[0]
        if not self._launches_compiled(first):
            self._launch_through_triton(grid, pointers, scalars, constexprs, options)
            return
        addresses = [t.data_ptr() for t in pointers]
        device = current_device()
        key = (plan, device, tuple([a % 16 == 0 for a in addresses]))
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._compile(pointers, scalars, constexprs, options)
            if kernel is None:  # a jit_cache_hook took over compilation: Triton's own launch decides
                self._launch_through_triton(grid, pointers, scalars, constexprs, options)
                return
            if len(self._kernels) >= MAX_KERNELS:
                self._kernels.clear()
            self._kernels[key] = kernel
        self.last_kernel = kernel
        kernel.run(
            grid[0],
            grid[1],
            grid[2],
            current_stream(device),
            kernel.function,
            kernel.packed_metadata,
            None,  # launch metadata: only read by launch hooks, which take the path above
            None,
            None,
            *addresses,
            *scalars,
            *constexprs,
        )

    def _launches_compiled(self, tensor: torch.Tensor) -> bool:
        return (
            self.compiled_launch
            and tensor.is_cuda
            and not torch.compiler.is_compiling()  # Dynamo traces Triton's own launch, not a raw launcher call
            and not knobs.runtime.debug
            and not knobs.compilation.instrumentation_mode  # an option of Triton's compile key, not of the plan's
            and not _hooked(knobs.runtime.launch_enter_hook)  # hooks (profilers) need Triton's launch metadata
            and not _hooked(knobs.runtime.launch_exit_hook)
            and not self.fn.pre_run_hooks
        )

    def _launch_through_triton(self, grid, pointers, scalars, constexprs, options) -> None:
        kwargs = dict(zip(self.constexpr_names, constexprs, strict=True))
        self.last_kernel = self.fn[grid](*pointers, *scalars, **kwargs, **options)

    def _compile(self, pointers, scalars, constexprs, options):
        """Triton's own compilation (and its on-disk cache) for these arguments, without launching."""
        kwargs = dict(zip(self.constexpr_names, constexprs, strict=True))
        kernel = self.fn.warmup(*pointers, *scalars, **kwargs, **options, grid=(1,))
        if kernel is None:
            return None
        if hasattr(kernel, "result"):  # Triton's asynchronous compile mode returns a future
            kernel = kernel.result()
        kernel.run  # noqa: B018 -- loads the binary now (raises OutOfResources here, not at a later launch)
        return kernel


def compile_for_target(
    fn: triton.runtime.JITFunction, args: tuple, kwargs: dict, capability: int = 90
) -> "triton.compiler.CompiledKernel":
    """Compile ``fn`` for an NVIDIA GPU of compute ``capability`` (90: H100/H200) without one: the arguments are
    specialised as ``fn[grid](*args, **kwargs)`` would on that GPU (tensors may live on the CPU: only their dtype and
    the alignment of their addresses are read), then Triton's own pipeline runs down to the cubin (its bundled
    ``ptxas``). What the compiler decides (registers, shared memory, which loads are pipelined) is the GPU's; no
    timing is. Triton 3.6's binder and ``_pack_args``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if not triton.__version__.startswith(TRITON_RELEASE):
        raise RuntimeError(f"compile_for_target uses Triton {TRITON_RELEASE}x internals; this is {triton.__version__}")
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError("compile_for_target needs the jitted kernel: unset TRITON_INTERPRET")
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**kwargs, "debug": False, "instrumentation_mode": ""}
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def compile_report(kernel: "triton.compiler.CompiledKernel") -> dict:
    """The compiler's view of a kernel from :func:`compile_for_target`: registers and local-memory (spill) bytes per
    thread from the cubin (``cuobjdump -res-usage``), shared memory, and per element type the loads in the
    ``cp.async`` shared-memory pipeline; MMA instructions by kind (``wgmma``: Hopper's 64-row warpgroup MMA)."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage[-500:]}")
    pipelined: dict[str, int] = {}
    for line in kernel.asm["ttgir"].splitlines():
        copy = re.search(r"ttg\.async_copy_global_to_local .*-> <[0-9x]+x(\w+),", line)
        if copy:
            pipelined[copy.group(1)] = pipelined.get(copy.group(1), 0) + 1
    ptx = kernel.asm["ptx"]
    return {
        "registers": int(found.group(1)),
        "stack_bytes": int(found.group(2)),
        "local_bytes": int(found.group(3)),
        "shared_bytes": kernel.metadata.shared,
        "async_copies": pipelined,
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
    }


__all__ = [
    "DISABLE_ENV",
    "TRITON_RELEASE",
    "CompiledLauncher",
    "compile_for_target",
    "compile_report",
    "current_device",
    "current_stream",
]
