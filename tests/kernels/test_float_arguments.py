"""The kernels' float arguments under torch.compile, checked on CPU by lowering each kernel to Triton IR."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests._requirements import require_module

require_module("triton", 'pip install -e ".[triton]"')

# Lowers a kernel to Triton IR for an H100/H200 target without a GPU (the AST-to-TTIR step needs no driver), with its
# float arguments typed fp64, as torch.compile's Inductor types Python floats. Uncast, an fp64 argument turns the
# arithmetic it touches into fp64: slower, other numerics than the eager launch's fp32, and for stage 1's scale a
# kernel that does not build (the accumulating tl.dot refuses an fp64 accumulator). Prints the TTIR.
_LOWER = textwrap.dedent(
    """
    import importlib, inspect, json, sys
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    module, name, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    kernel = getattr(importlib.import_module(module), name)
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in spec["constexprs"] else spec["types"].get(n, "*bf16" if n.endswith("_ptr")
                 else "i32") for n in names}
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": 4, "num_stages": 3})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in spec["constexprs"].items()})
    print(source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context))
    """
)
_STAGE1 = dict(queries_per_seq=1, D_C=512, D_R=64, BLOCK_C=512, BLOCK_R=64, BLOCK_H=16, BLOCK_N=32, MIN_SPLIT=64,
               PAGE_SIZE=1, PAGED=False, HAS_MASK=False, DIRECT=False, IEEE=False, NUM_STAGES=3, FP8=False, GROUP=128,
               NUM_GROUPS=4, FP8_F16=False, FP8_RELOAD=False, KPE_STRIDE_UNIT=8)  # fmt: skip
_INDEX = {"seq_lens_ptr": "*i32", "block_table_ptr": "*i32", "key_mask_ptr": "*i32"}
_FLOAT_ARGUMENT_KERNELS = {
    "decode stage 1, bf16 cache": (
        "mla_kernels.mla_decode", "_mla_decode_stage1", "qk_scale", _STAGE1,
        {**_INDEX, "out_ptr": "*fp32", "lse_ptr": "*fp32", "ckv_scale_ptr": "*fp32"},
    ),
    "decode stage 1, fp8 cache": (
        "mla_kernels.mla_decode", "_mla_decode_stage1", "qk_scale", {**_STAGE1, "FP8": True},
        {**_INDEX, "out_ptr": "*fp32", "lse_ptr": "*fp32", "ckv_scale_ptr": "*fp32", "ckv_ptr": "*fp8e4nv"},
    ),
    "rms_norm forward": ("mla_kernels.rms_norm", "_rms_norm_fwd", "eps", {"BLOCK": 1024}, {"rstd_ptr": "*fp32"}),
    "rope": ("mla_kernels.rope", "_rope_interleaved", "sin_sign", {"HALF": 32, "BLOCK_H": 16, "BLOCK_P": 32}, {}),
}  # fmt: skip


@pytest.mark.parametrize("kernel", sorted(_FLOAT_ARGUMENT_KERNELS))
def test_kernels_compute_in_fp32_when_handed_an_fp64_argument(kernel):
    """torch.compile hands a kernel's float argument over as fp64; each kernel casts it to fp32 once, so it builds
    and computes as in an eager launch (GPU run of stage 1:
    test_mla_decode.py::test_decode_under_torch_compile_on_gpu)."""
    module, name, argument, constexprs, types = _FLOAT_ARGUMENT_KERNELS[kernel]
    spec = json.dumps({"constexprs": constexprs, "types": {**types, argument: "fp64"}})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # jitted kernels, not the interpreter's
    done = subprocess.run(
        [sys.executable, "-c", _LOWER, module, name, spec], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    body = [line for line in done.stdout.splitlines() if "f64" in line and "tt.func" not in line]
    assert len(body) == 1 and f"arith.truncf %{argument} : f64 to f32" in body[0], "\n".join(body[:5])
