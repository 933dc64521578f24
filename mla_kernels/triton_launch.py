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


__all__ = ["DISABLE_ENV", "TRITON_RELEASE", "CompiledLauncher", "current_device", "current_stream"]
