"""The tile loops shared by the kernels that stream a weight matrix (int8_linear, lm_head, geglu_int8, qkv_int8).

`dot_tile` computes one [BLOCK_M, BLOCK_N] fp32 tile of a · bᵀ for a [M, K] activations and b [N, K]
weights, both row-major. With CODES, b holds int8 codes: they are exact in bf16/fp16 (|q| <= 127) and
go through fp32 on the way, because Triton's interpreter mis-converts int -> bf16. The caller applies
its scale and epilogue to the tile. `dot_tile_heads` is the same loop over activations that are
attention heads in place (see its docstring); `dot_tile_halves` computes two column tiles from one
pass over the activations (a head's two RoPE halves, for qkv_int8).
"""

from ._dispatch import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _accumulate(a, b, acc, CODES: tl.constexpr, FP32: tl.constexpr):
        """acc + a · b for one K block: int8 codes converted through fp32 (exact; the interpreter
        mis-converts int -> bf16), fp32 dots in IEEE precision. Every tile loop below uses this, so
        their tiles are the same arithmetic."""
        if CODES:
            b = b.to(tl.float32).to(a.dtype)
        if FP32:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def dot_tile(
        a_ptr, b_ptr, rows, cols, row_ok, col_ok, K, stride_a, stride_b,
        CODES: tl.constexpr, EVEN_K: tl.constexpr, FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_a + offs_k[None, :]
        b_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_b + offs_k[:, None]  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0)
            else:
                k_ok = offs_k < K - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0)
            acc = _accumulate(a, b, acc, CODES, FP32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        return acc

    @triton.jit
    def dot_tile_heads(
        a_ptr, b_ptr, a_rows, cols, row_ok, col_ok, K, stride_b, HEAD, HEADS2, stride_h1, stride_h2,
        CODES: tl.constexpr, FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """`dot_tile` for activations that are heads (.., H1, H2, HEAD) with unit stride within a head:
        column k of a row is at a_rows[row] + h1 · stride_h1 + h2 · stride_h2 + k % HEAD, where
        k // HEAD = h1 · HEADS2 + h2. HEAD % BLOCK_K == 0, so each K block lies in one head; the blocks
        and their order are dot_tile's, so the tile is the same as dot_tile's over the heads copied flat."""
        offs_k = tl.arange(0, BLOCK_K)
        b_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_b + offs_k[:, None]  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            head = k0 // HEAD
            col = (head // HEADS2).to(tl.int64) * stride_h1 + (head % HEADS2).to(tl.int64) * stride_h2 + k0 % HEAD
            a = tl.load(a_ptr + a_rows[:, None] + col + offs_k[None, :], mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0)
            acc = _accumulate(a, b, acc, CODES, FP32)
            b_ptrs += BLOCK_K
        return acc

    @triton.jit
    def dot_tile_halves(
        a_ptr, b_ptr, rows, cols, row_ok, col_ok, K, HALF, stride_a, stride_b,
        CODES: tl.constexpr, EVEN_K: tl.constexpr, FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """`dot_tile` for two column tiles at once, `cols` and `cols + HALF` (the two halves of an
        attention head, which RoPE pairs), reading each A block once: each tile is dot_tile's (the
        same K blocks in the same order)."""
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_a + offs_k[None, :]
        b1_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_b + offs_k[:, None]  # [BK, BN]
        b2_ptrs = b1_ptrs + HALF * stride_b
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b1 = tl.load(b1_ptrs, mask=col_ok[None, :], other=0)
                b2 = tl.load(b2_ptrs, mask=col_ok[None, :], other=0)
            else:
                k_ok = offs_k < K - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b1 = tl.load(b1_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0)
                b2 = tl.load(b2_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0)
            acc1 = _accumulate(a, b1, acc1, CODES, FP32)
            acc2 = _accumulate(a, b2, acc2, CODES, FP32)
            a_ptrs += BLOCK_K
            b1_ptrs += BLOCK_K
            b2_ptrs += BLOCK_K
        return acc1, acc2
