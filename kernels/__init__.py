"""dg's compute kernels. Each module holds a Triton kernel, its launcher, a plain-PyTorch reference
with the same signature (`<name>_ref`, which defines correctness and runs anywhere) and a dispatcher
(`<name>`) that picks Triton on CUDA and the reference otherwise. `DG_KERNELS=ref|triton` overrides
the choice for A/B runs; `DG_KERNELS=triton` on CPU tensors needs `TRITON_INTERPRET=1` (the tests'
way of checking the kernels without a GPU). `DG_AUTOTUNE=off` skips autotuning (default tiles). Both
switches are read through `dgcli.settings`. Autotuned choices are kept in `$DG_HOME/tuning/` (see
`_tuning`). `python -m kernels.aot` compiles every kernel for sm_89, sm_90 and sm_120 without a GPU
and reports shared memory, registers, spills and the main loop's instructions; each module declares
what to compile in its `AOT` list.

- moe_int4:    routed experts on packed 4-bit weights (group 64), the bulk of every step's bytes; and
               moe_align, the (token, slot) pairs sorted and padded per expert, in one kernel
- lm_head:     LM head + softcap + temperature + argmax/entropy/logsumexp, one pass over the vocabulary
- int8_linear: weight-only int8 (per-row scale) linear for dense projections (and o_proj over
               attention's output heads read in place)
- geglu_int8:  an int8 GeGLU MLP's gate and up projections, gelu_tanh and product in one kernel
- qkv_int8:    attention's q/k/v projections, their norms and the q/k RoPE in one kernel, head-major
- int8_soft:   the self-conditioning soft embedding, probs @ int8 codes, each code read once
- sample:      the sampler's draw argmax(exp(proc - lse) / q); fused, with torch's CUDA Exp(1) draws
               made in the kernel (cuda_rng: curand's Philox as torch's exponential_ runs it) and the
               next step's self-conditioning input written on the way
- rmsnorm:     RMSNorm alone, with the residual add, or with the q/k RoPE, one kernel each
- router:      the router's norm, and its softmax/top-k/renormalise/per-expert scale
- mix:         a layer's glue around its MLPs, one kernel each way: residual add + the dense, experts'
               and router's inputs; slot sum + the three norms + residual add + scalar + the next norm
- fused_norms, fused_router, fused_mix, fused_mlp, fused_attention: module swaps that put those
               kernels under the model on CUDA; `install_fused` applies them all (the Engine does on
               CUDA, the step model on meta; the model file is not edited)
"""

from .int8_linear import int8_linear, int8_linear_ref
from .lm_head import HeadOut, lm_head, lm_head_ref
from .moe_int4 import moe_int4, moe_int4_ref



def install_fused(model) -> None:
    """Swap every module that has a fused kernel (norms, routers, layers' glue, int8 MLPs, attention's
    q/k/v with norms and RoPE, o_proj over attention's heads) for its kernel-backed subclass; each swap
    falls back to the plain method where its kernel does not apply."""
    from . import fused_attention, fused_mix, fused_mlp, fused_norms, fused_router

    fused_norms.install(model)
    fused_router.install(model)
    fused_mix.install(model)
    fused_mlp.install(model)
    fused_attention.install(model)


__all__ = ["install_fused", "moe_int4", "moe_int4_ref", "lm_head", "lm_head_ref", "HeadOut", "int8_linear", "int8_linear_ref"]
