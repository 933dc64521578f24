"""Triton ops of the MLA model (decode kernel, RMSNorm, interleaved RoPE), their autograd Functions, the FP8 cache
format they read, and fp64/PyTorch references for the tests. Imports nothing from ``mla_components``: the modules
that use these ops, and the choice between them and PyTorch, live in ``mla_components.modules``."""
