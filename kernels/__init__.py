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
- int8_linear: weight-only int8 (per-row scale) linear for dense projections
- int8_soft:   the self-conditioning soft embedding, probs @ int8 codes, each code read once
- sample:      the sampler's draw argmax(exp(proc - lse) / q); fused, with torch's CUDA Exp(1) draws
               made in the kernel (cuda_rng: curand's Philox as torch's exponential_ runs it) and the
               next step's self-conditioning input written on the way
- rmsnorm:     RMSNorm alone, with the residual add, or with the q/k RoPE, one kernel each
- router:      the router's norm, and its softmax/top-k/renormalise/per-expert scale
- fused_norms, fused_router: module swaps that put those kernels under the model on CUDA (the
               Engine applies them; the model file is not edited)
"""

from .int8_linear import int8_linear, int8_linear_ref
from .lm_head import HeadOut, lm_head, lm_head_ref
from .moe_int4 import moe_int4, moe_int4_ref

__all__ = ["moe_int4", "moe_int4_ref", "lm_head", "lm_head_ref", "HeadOut", "int8_linear", "int8_linear_ref"]
