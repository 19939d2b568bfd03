"""The epilogues both linear kernels (the tiled one in linear.py, the batch-1 GEMV in gemv.py) run after
their products: scales, bias, GELU, residual or the KV-cache store, before the one rounding
(``linear_epilogue``); and, for a greedy decode step's lm_head, each row's argmax over every
program's columns (``argmax_epilogue``)."""

import triton
import triton.language as tl

from .activations import gelu_tanh, gelu_tanh_grad


@triton.jit
def linear_epilogue(acc, rm, rn, M, N, s_ptr, b_ptr, r_ptr, y_ptr, stride_rm, stride_ym,
                    kc_ptr, vc_ptr, lens_ptr, stride_cb, stride_ch, stride_ct, head_dim, INT8_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                    KV_CACHE: tl.constexpr):
    """int8 weights' column scales, bias, activation, residual in fp32 (ACTIVATION 2: the residual
    times the GELU's derivative instead, for the backward), then one rounding and masked
    stores of the tile: into y, or with KV_CACHE, columns [0, C) (the query) into y and [C, 3C)
    (key, value) into the caches. Returns the rounded tile."""
    if INT8_WEIGHT:
        acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(acc.dtype)[None, :]
    if ACTIVATION == 1:
        acc = gelu_tanh(acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    rows = rm[:, None].to(tl.int64)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows * stride_rm + rn[None, :], mask=mask, other=0.0).to(acc.dtype)
        if ACTIVATION == 2:  # the backward's recompute: "residual" is the GELU output's gradient
            acc = r * gelu_tanh_grad(acc)
        else:
            acc += r
    out = acc.to(y_ptr.dtype.element_ty)
    if KV_CACHE:
        c = N // 3
        part = rn // c  # 0 query, 1 key, 2 value
        col = rn - part * c
        pos = tl.load(lens_ptr + rm, mask=rm < M, other=1) - 1  # the new token's slot in each row
        at = rows * stride_cb + (col // head_dim)[None, :] * stride_ch + pos[:, None].to(tl.int64) * stride_ct \
            + (col % head_dim)[None, :]
        tl.store(y_ptr + rows * stride_ym + rn[None, :], out, mask=mask & (part == 0)[None, :])
        tl.store(kc_ptr + at, out, mask=mask & (part == 1)[None, :])
        tl.store(vc_ptr + at, out, mask=mask & (part == 2)[None, :])
    else:
        tl.store(y_ptr + rows * stride_ym + rn[None, :], out, mask=mask)
    return out


# Above every column index: what a column not holding its row's maximum offers to the minimum.
NO_INDEX = tl.constexpr(2147483647)


@triton.jit
def argmax_epilogue(out, rm, rn, M, N, row0, pid_n, n_tiles, part_ptr, count_ptr, tok_ptr, BLOCK_M: tl.constexpr,
                    REDUCE: tl.constexpr):
    """Greedy tokens from a linear's rounded output tiles: ``tok[r]`` = the first column holding the
    maximum of row r of the whole output (its lowest index on ties), or -1 where the row holds a NaN
    or only -inf, as the sampler's greedy path decides (``gpt2kernels.sampling``).

    Each program stores its tile's per-row maximum (NaN if the tile holds one) and that maximum's
    first column into ``part_ptr`` (fp32 (2, M, n_tiles): values, then indices as int32 bits) at
    column ``pid_n``, then counts its arrival at ``count_ptr`` (int32, zero, shared by the programs
    of rows ``rm``, which start at ``row0``); the last to arrive reduces the ``n_tiles`` partials in
    column order, ``REDUCE`` at a time, writes ``tok`` (int64) and re-arms the counter. Integer
    counters only: the same tokens whatever order the programs finish in.
    """
    valid = (rm[:, None] < M) & (rn[None, :] < N)
    v = out.to(tl.float32)  # the rounded logits, as the sampler would read them (fp16 -> fp32 is exact)
    tile_nan = tl.max(tl.where(valid & (v != v), 1, 0), axis=1)
    v = tl.where(valid & (v == v), v, float("-inf"))
    best = tl.max(v, axis=1)
    first = tl.min(tl.where(v == best[:, None], rn[None, :], NO_INDEX), axis=1)  # the lowest id on ties
    best = tl.where(tile_nan > 0, float("nan"), best)
    row_ok = rm < M
    at = rm.to(tl.int64) * n_tiles + pid_n
    tl.store(part_ptr + at, best, mask=row_ok)
    tl.store(part_ptr + M * n_tiles + at, first.to(tl.float32, bitcast=True), mask=row_ok)
    tl.debug_barrier()  # every thread's partial is written before the release below
    if tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == n_tiles - 1:
        rm = row0 + tl.arange(0, BLOCK_M)
        row_ok = rm < M
        rt = tl.arange(0, REDUCE)
        run_v = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        run_at = tl.zeros((BLOCK_M,), tl.int32)  # the winning partial's position
        bad = tl.zeros((BLOCK_M,), tl.int32)
        values = part_ptr + rm[:, None].to(tl.int64) * n_tiles
        # In column order, a later chunk winning only when strictly greater and the first position
        # winning within one: the partials' columns grow with their position, so that is the lowest id.
        for t0 in range(0, n_tiles, REDUCE):
            tt = t0 + rt
            pv = tl.load(values + tt[None, :], mask=row_ok[:, None] & (tt < n_tiles)[None, :], other=float("-inf"),
                         cache_modifier=".cg")
            bad |= tl.max(tl.where(pv != pv, 1, 0), axis=1)
            pv = tl.where(pv == pv, pv, float("-inf"))
            chunk_v = tl.max(pv, axis=1)
            chunk_at = tl.min(tl.where(pv == chunk_v[:, None], rt[None, :], REDUCE), axis=1)
            take = chunk_v > run_v
            run_at = tl.where(take, t0 + chunk_at, run_at)
            run_v = tl.where(take, chunk_v, run_v)
        first = tl.load(part_ptr + M * n_tiles + rm.to(tl.int64) * n_tiles + run_at, mask=row_ok, other=0.0,
                        cache_modifier=".cg").to(tl.int32, bitcast=True)
        tok = tl.where((bad > 0) | (run_v == float("-inf")), -1, first)
        tl.store(tok_ptr + rm, tok.to(tl.int64), mask=row_ok)
        tl.atomic_xchg(count_ptr, 0)
