"""Sampling with each row split over many programs: the small-batch sampler (batch 1 on a GPU).

One thread block per row (the CUDA sampler, ``csrc/sampling_cuda.cu``) leaves a GPU idle at batch 1
and walks 50,257 logits several times in series. Here every row is cut into slices of ``block``
tokens, one program each, and a fixed sequence of launches finds the row's cut-offs:

1. ``stats``: each slice's maximum, first argmax and NaN flag; the last program of a row to arrive
   takes the row's greedy path (writing the token) or starts the search below.
2. ``rounds`` x ``round``: each slice counts its tokens, and sums their weights ``exp(s - top)``
   (float64), at or above 64 thresholds ("edges") on the scaled logit ``s``; the last program
   narrows two brackets, one holding the top-k boundary value (the k-th largest ``s``) and one the
   top-p boundary (the value of the last token kept), and places the next round's edges inside them.
   A bracket holding a single value is solved by arithmetic (ties share one weight); a bracket
   whose tokens fit ``cap`` is gathered in the next round and solved exactly by sorting them.
   The last round solves any row still open in one program (the same steps over every slice), so
   every input gets its exact answer, however its values are spread.
3. ``draw``: each slice sums the weight it keeps; the last program picks the slice holding the
   row's uniform, walks it and writes the token.

A row's answer is ``(s*, t)``: a token is kept when ``s > s*``, or ``s == s*`` and it is among the
first ``t`` such tokens in vocabulary order, and its weight reaches ``min_p`` (the order of
``gpt2kernels.sampling``: temperature, top-k, top-p, min-p). The draw is the same inverse CDF in
vocabulary order with the same Philox uniform, so this draws the tokens ``sample_ref`` and the
compiled samplers draw, up to float64 rounding at a boundary.

Precision: ``s`` and every comparison are float32, as in the reference; weights and every sum of
them are float64, because the top-p boundary and the draw compare sums of ~50,000 weights with
``p * total`` and ``u * total``: float32 sums would move a boundary token in about one row in a
few hundred (the cumulative error, ~1e-7 of the mass, against a boundary token's ~2e-5 of it).

Counters are integers and partials are reduced in a fixed order: the same tokens whatever order
the programs finish in. Unchecked, like ``sample_next_``: the parameters must be valid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._ops import arrival_counters, kernel_op

# Row fields: int64 (ROW_I of them per row) ...
I_STATE = tl.constexpr(0)  # DONE, SEARCH or SOLVED
I_ROUND = tl.constexpr(1)
I_KSOLVED = tl.constexpr(2)
I_PSOLVED = tl.constexpr(3)
I_GATHER = tl.constexpr(4)  # NO_GATHER, or which gather: G_LO <= s < G_HI (+inf for GATHER_TOP)
I_FILL = tl.constexpr(5)  # tokens gathered so far (atomic)
I_KCA = tl.constexpr(6)  # counts at the brackets' edges: top-k [a, b), top-p [a, b)
I_KCB = tl.constexpr(7)
I_PCA = tl.constexpr(8)
I_PCB = tl.constexpr(9)
I_TIES = tl.constexpr(10)  # t: how many tokens equal to s* are kept, in vocabulary order
I_GBASE = tl.constexpr(11)  # tokens above a gathered range
ROW_I = tl.constexpr(16)
# ... and float64 (ROW_F per row); the s values are float32 numbers, exact in float64.
F_TOP = tl.constexpr(0)
F_TOTAL = tl.constexpr(1)  # the weight of the whole row
F_KA = tl.constexpr(2)  # top-k bracket [KA, KB) in s, the weights at and above each edge
F_KB = tl.constexpr(3)
F_KMA = tl.constexpr(4)
F_KMB = tl.constexpr(5)
F_PA = tl.constexpr(6)
F_PB = tl.constexpr(7)
F_PMA = tl.constexpr(8)
F_PMB = tl.constexpr(9)
F_KTH = tl.constexpr(10)
F_TOTAL_K = tl.constexpr(11)  # the weight of the top-k survivors
F_SSTAR = tl.constexpr(12)
F_GLO = tl.constexpr(13)
F_GHI = tl.constexpr(14)
F_GBASE = tl.constexpr(15)  # the weight above a gathered range
ROW_F = tl.constexpr(16)

DONE = tl.constexpr(0)
SEARCH = tl.constexpr(1)
SOLVED = tl.constexpr(2)
NO_GATHER = tl.constexpr(0)
GATHER_TOP = tl.constexpr(1)
GATHER_K = tl.constexpr(2)
GATHER_P = tl.constexpr(3)
ALL = tl.constexpr(9223372036854775807)
EDGES = tl.constexpr(64)  # thresholds per round: 32 per bracket while both are open
EXTREMES = tl.constexpr(6)  # per slice: min, finite min and max of s in each bracket
LADDER = tl.constexpr(0.125)  # round 0's edges: top - 0.125 * (i + 1), i < 63, then -inf
# Rounds the one-program finish may take. Two rounds at most narrow an open bracket to one of its 32
# sub-ranges or split off its largest value (see _place_edges); near 0, where float32 values are
# densest, that removes ~5 of the format's ~280 binades (denormals included) a step, so ~120 rounds
# settle any input, and ordinary rows settle in the first 2-3 multi-program rounds.
FALLBACK_ROUNDS = tl.constexpr(1024)
NO_TOKEN = tl.constexpr(-1)


@triton.jit
def _scaled(x_ptr, row, offs, V, stride_r, stride_c, temp):
    """float32 scaled logits x / temperature of tokens ``offs`` (-inf past the vocabulary), and the mask."""
    ok = offs < V
    x = tl.load(x_ptr + row * stride_r + offs.to(tl.int64) * stride_c, mask=ok, other=float("-inf"))
    return x.to(tl.float32) / temp, ok


@triton.jit
def _order_key(s, ids):
    """int64 keys ordering tokens as the samplers rank them: larger ``s`` first, then lower id."""
    b = s.to(tl.int32, bitcast=True)
    k = b ^ ((b >> 31) & 0x7FFFFFFF)  # a signed int32 that orders like the float
    return (k.to(tl.int64) << 32) | (4294967295 - ids.to(tl.int64))


@triton.jit
def _philox_uniform(seed, offset):
    """The row's uniform in [0, 1), float64: Philox4x32-10 keyed by ``seed`` at counter (offset, 0),
    53 bits, bit for bit ``csrc/philox.h`` and ``sampling.uniforms``."""
    c0 = (offset & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    a = tl.full(c0.shape, 0xD2511F53, tl.uint32)
    b = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(a, c0)
        lo0 = a * c0
        hi1 = tl.umulhi(b, c2)
        lo1 = b * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    bits = ((c0 >> 5).to(tl.uint64) << 26) | (c1 >> 6).to(tl.uint64)
    return bits.to(tl.float64) * (1.0 / 9007199254740992.0)


@triton.jit
def _last_arrival(count_ptr, n):
    """True in the last of ``n`` programs to call this (after all of them stored their partials)."""
    tl.debug_barrier()  # every thread's partials are written before the release below
    return tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == n - 1


@triton.jit
def _stats_kernel(x_ptr, stride_r, stride_c, V, P, temp_ptr, k_ptr, p_ptr, off_ptr, out_ptr,
                  rowi, rowf, edges_ptr, part_f, part_i, count_ptr, ADVANCE: tl.constexpr,
                  BLOCK: tl.constexpr, PCH: tl.constexpr):
    sl = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = sl * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(x_ptr + row * stride_r + offs.to(tl.int64) * stride_c, mask=ok, other=float("-inf")).to(tl.float32)
    nan = tl.max(tl.where(x != x, 1, 0))
    x = tl.where(x == x, x, float("-inf"))
    best = tl.max(x)
    first = tl.min(tl.where(x == best, offs, 2147483647))
    best = tl.where(nan > 0, float("nan"), best)
    tl.store(part_f + row * P + sl, best)
    tl.store(part_i + row * P + sl, first)
    if _last_arrival(count_ptr + row, P):
        run_v = float("-inf")
        run_i = 0
        bad = 0
        for p0 in range(0, P, PCH):
            pp = p0 + tl.arange(0, PCH)
            pv = tl.load(part_f + row * P + pp, mask=pp < P, other=float("-inf"), cache_modifier=".cg")
            pi = tl.load(part_i + row * P + pp, mask=pp < P, other=2147483647, cache_modifier=".cg")
            bad |= tl.max(tl.where(pv != pv, 1, 0))
            pv = tl.where(pv == pv, pv, float("-inf"))
            cv = tl.max(pv)
            ci = tl.min(tl.where(pv == cv, pi, 2147483647))  # slices ascend: the lowest id on ties
            take = cv > run_v
            run_i = tl.where(take, ci, run_i)
            run_v = tl.where(take, cv, run_v)
        bad = (bad > 0) | (run_v == float("-inf"))
        temp = tl.load(temp_ptr + row)
        k = tl.load(k_ptr + row)
        top = run_v / tl.where(temp == 0, 1.0, temp)  # max(x) / T is max(x / T): division is monotone
        greedy = bad | (temp == 0) | (k == 1) | (tl.abs(top) == float("inf"))
        if greedy:
            tl.store(out_ptr + row, tl.where(bad, NO_TOKEN, run_i).to(tl.int64))
            if ADVANCE:
                tl.store(off_ptr + row, tl.load(off_ptr + row) + 1)
            tl.store(rowi + row * ROW_I + I_STATE, DONE)
        else:
            p = tl.load(p_ptr + row)
            filters = ((k > 0) & (k < V)) | (p < 1.0)
            ri = rowi + row * ROW_I
            rf = rowf + row * ROW_F
            tl.store(ri + I_STATE, tl.where(filters, SEARCH, SOLVED))
            tl.store(ri + I_ROUND, 0)
            tl.store(ri + I_KSOLVED, 0)
            tl.store(ri + I_PSOLVED, 0)
            tl.store(ri + I_GATHER, NO_GATHER)
            tl.store(ri + I_FILL, 0)
            tl.store(ri + I_TIES, ALL)
            tl.store(rf + F_TOP, top.to(tl.float64))
            tl.store(rf + F_SSTAR, float("-inf"))  # no filter: every token is kept (before min-p)
            # Both brackets start as [-inf, +inf): every token is at or above -inf, none above +inf.
            tl.store(ri + I_KCA, V.to(tl.int64))
            tl.store(ri + I_KCB, 0)
            tl.store(ri + I_PCA, V.to(tl.int64))
            tl.store(ri + I_PCB, 0)
            tl.store(rf + F_KA, float("-inf"))
            tl.store(rf + F_KB, float("inf"))
            tl.store(rf + F_PA, float("-inf"))
            tl.store(rf + F_PB, float("inf"))
            tl.store(rf + F_KMB, 0.0)
            tl.store(rf + F_PMB, 0.0)
            tl.store(rf + F_KTH, float("-inf"))
            i = tl.arange(0, EDGES)
            edges = tl.where(i < EDGES - 1, top - LADDER * (i + 1).to(tl.float32), float("-inf"))
            tl.store(edges_ptr + row * EDGES + i, edges)
        tl.atomic_xchg(count_ptr + row, 0)


@triton.jit
def _extremes(s, inside, mn, mnf, mx):
    """The running smallest, smallest finite and largest ``s`` among the tokens ``inside`` a bracket."""
    mn = tl.minimum(mn, tl.min(tl.where(inside, s, float("inf"))))
    mnf = tl.minimum(mnf, tl.min(tl.where(inside & (s > float("-inf")), s, float("inf"))))
    mx = tl.maximum(mx, tl.max(tl.where(inside, s, float("-inf"))))
    return mn, mnf, mx


@triton.jit
def _reduce_extremes(ext, live, mn, mnf, mx):
    """``_extremes`` across slices: their stored (min, finite min, max) at ``ext`` (one per slice)."""
    mn = tl.minimum(mn, tl.min(tl.load(ext + 0, mask=live, other=float("inf"), cache_modifier=".cg")))
    mnf = tl.minimum(mnf, tl.min(tl.load(ext + 1, mask=live, other=float("inf"), cache_modifier=".cg")))
    mx = tl.maximum(mx, tl.max(tl.load(ext + 2, mask=live, other=float("-inf"), cache_modifier=".cg")))
    return mn, mnf, mx


@triton.jit
def _round_slice(x_ptr, stride_r, stride_c, V, row, sl, temp, top, rowi, rowf, edges_ptr, part_cnt, part_mass,
                 part_ext, buf_ptr, P, BLOCK: tl.constexpr, CH: tl.constexpr, CAP: tl.constexpr):
    """One slice's share of a round: counts and weights of its tokens at or above each edge, the
    extremes of its tokens inside each bracket, and (in a gather round) its gathered tokens."""
    ri = rowi + row * ROW_I
    rf = rowf + row * ROW_F
    e = tl.load(edges_ptr + row * EDGES + tl.arange(0, EDGES))
    gather = tl.load(ri + I_GATHER)
    g_lo = tl.load(rf + F_GLO).to(tl.float32)
    g_hi = tl.load(rf + F_GHI).to(tl.float32)
    ka = tl.load(rf + F_KA).to(tl.float32)
    kb = tl.load(rf + F_KB).to(tl.float32)
    pa = tl.load(rf + F_PA).to(tl.float32)
    pb = tl.load(rf + F_PB).to(tl.float32)
    top64 = top.to(tl.float64)
    cnt = tl.zeros([EDGES], tl.int32)
    mass = tl.zeros([EDGES], tl.float64)
    k_mn = float("inf")
    k_mnf = float("inf")
    k_mx = float("-inf")
    p_mn = float("inf")
    p_mnf = float("inf")
    p_mx = float("-inf")
    for c0 in range(0, BLOCK, CH):
        offs = sl * BLOCK + c0 + tl.arange(0, CH)
        s, ok = _scaled(x_ptr, row, offs, V, stride_r, stride_c, temp)
        w = tl.exp(s.to(tl.float64) - top64)
        above = ok[:, None] & (s[:, None] >= e[None, :])
        cnt += tl.sum(above.to(tl.int32), axis=0)
        mass += tl.sum(tl.where(above, w[:, None], 0.0), axis=0)
        k_mn, k_mnf, k_mx = _extremes(s, ok & (s >= ka) & (s < kb), k_mn, k_mnf, k_mx)
        p_mn, p_mnf, p_mx = _extremes(s, ok & (s >= pa) & (s < pb), p_mn, p_mnf, p_mx)
        if gather != NO_GATHER:
            g = ok & (s >= g_lo) & (s < g_hi)  # a top gather's g_hi is +inf
            base = tl.atomic_add(ri + I_FILL, tl.sum(g.to(tl.int32)).to(tl.int64))
            pos = base + tl.cumsum(g.to(tl.int64), 0) - 1
            tl.store(buf_ptr + row * CAP + pos, _order_key(s, offs), mask=g & (pos < CAP))
    at = (row * P + sl) * EDGES + tl.arange(0, EDGES)
    tl.store(part_cnt + at, cnt)
    tl.store(part_mass + at, mass)
    ext = part_ext + (row * P + sl) * EXTREMES
    tl.store(ext + 0, k_mn)
    tl.store(ext + 1, k_mnf)
    tl.store(ext + 2, k_mx)
    tl.store(ext + 3, p_mn)
    tl.store(ext + 4, p_mnf)
    tl.store(ext + 5, p_mx)


@triton.jit
def _pick(v, i, at):
    """v[at] of a 1-D tensor, as a scalar (0 where ``at`` is out of range)."""
    return tl.sum(tl.where(i == at, v, tl.zeros_like(v)))


@triton.jit
def _narrow(e, g, goal_a, goal_b, a, b, ca, cb, ma, mb, gc, gm, i):
    """Narrow a bracket [a, b) with this round's edges ``e``, whose cumulative measure is ``g``
    (a count or a weight, non-increasing in the edge): the new ``a`` is the largest edge with
    g >= goal_a, the new ``b`` the smallest with g < goal_b. Returns a, b and the counts and weights
    at and above them (``gc``, ``gm`` at the edges)."""
    up = (g >= goal_a) & (e > a)
    best_a = tl.max(tl.where(up, e, float("-inf")))
    ia = tl.min(tl.where(up & (e == best_a), i, EDGES))
    down = (g < goal_b) & (e < b)
    best_b = tl.min(tl.where(down, e, float("inf")))
    ib = tl.min(tl.where(down & (e == best_b), i, EDGES))
    a2 = tl.where(ia < EDGES, best_a, a)
    ca2 = tl.where(ia < EDGES, _pick(gc, i, ia), ca)
    ma2 = tl.where(ia < EDGES, _pick(gm, i, ia), ma)
    b2 = tl.where(ib < EDGES, best_b, b)
    cb2 = tl.where(ib < EDGES, _pick(gc, i, ib), cb)
    mb2 = tl.where(ib < EDGES, _pick(gm, i, ib), mb)
    return a2, b2, ca2, cb2, ma2, mb2


@triton.jit
def _place_edges(a, b, mn, mnf, mx, i, first: tl.constexpr, n: tl.constexpr):
    """Edges ``first .. first + n - 1`` of the next round, spread evenly over the bracket's values:
    from its smallest finite value (or ``a``) to its largest (or just below ``b``), the last edge on
    the largest itself. That edge alone splits a bracket holding two values; evenly spread ones cut
    its span ~n-fold a round, so an open bracket's 2^32 possible values are down to one within a few
    rounds, while its extremes are those the round just measured (they may lag by one round)."""
    lo = tl.maximum(a, mnf)
    lo = tl.where(lo == float("-inf"), mx, lo)  # only -inf below the largest: the largest splits it
    hi = tl.minimum(mx, b)
    j = (i - first + 1).to(tl.float32)
    e = lo + (hi - lo) * (j / n)
    return tl.where(i == first + n - 1, hi, e)


@triton.jit
def _solve_gathered(buf_ptr, row, n, k, p, total, kth, base_c, base_m, top, solve_k, solve_p, CAP: tl.constexpr):
    """Sort the ``n`` gathered tokens (every token of the range, ``base_c`` tokens of weight
    ``base_m`` above it) and read the top-k boundary (``solve_k``) and the top-p one (``solve_p``).
    Returns kth, the top-k survivors' weight, s* and t."""
    i = tl.arange(0, CAP)
    q = tl.load(buf_ptr + row * CAP + i, mask=i < n, other=-9223372036854775808, cache_modifier=".cg")
    q = tl.sort(q, descending=True)
    valid = i < n
    hi = (q >> 32).to(tl.int32)
    s = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    w = tl.where(valid, tl.exp(s.to(tl.float64) - top.to(tl.float64)), 0.0)
    if solve_k:
        kth = tl.max(tl.where(i == k - 1 - base_c, s, float("-inf")))
        total = base_m + tl.sum(tl.where(valid & (s >= kth), w, 0.0))
    sstar = kth
    ties = ALL
    if solve_p:
        before = base_m + tl.cumsum(w, 0) - w
        keep = valid & (s >= kth) & ((before < p * total) | (base_c + i == 0))
        last = tl.maximum(tl.max(tl.where(keep, i, -1)), 0)
        sstar = tl.max(tl.where(i == last, s, float("-inf")))
        ties = tl.sum((valid & (s == sstar) & (i <= last)).to(tl.int64))
    return kth, total, sstar, ties


@triton.jit
def _plan(row, V, P, k, p, rowi, rowf, edges_ptr, part_cnt, part_mass, part_ext, buf_ptr,
          PCH: tl.constexpr, CAP: tl.constexpr):
    """The last program's part of a round: reduce the slices' partials in slice order, solve what the
    round settles, and set up the next round (edges, or a gather)."""
    ri = rowi + row * ROW_I
    rf = rowf + row * ROW_F
    i = tl.arange(0, EDGES)
    gc = tl.zeros([EDGES], tl.int64)
    gm = tl.zeros([EDGES], tl.float64)
    k_mn = float("inf")
    k_mnf = float("inf")
    k_mx = float("-inf")
    p_mn = float("inf")
    p_mnf = float("inf")
    p_mx = float("-inf")
    for p0 in range(0, P, PCH):
        pp = p0 + tl.arange(0, PCH)
        live = pp < P
        at = (row * P + pp[:, None]) * EDGES + i[None, :]
        gc += tl.sum(tl.load(part_cnt + at, mask=live[:, None], other=0, cache_modifier=".cg").to(tl.int64), axis=0)
        gm += tl.sum(tl.load(part_mass + at, mask=live[:, None], other=0.0, cache_modifier=".cg"), axis=0)
        ext = part_ext + (row * P + pp) * EXTREMES
        k_mn, k_mnf, k_mx = _reduce_extremes(ext, live, k_mn, k_mnf, k_mx)
        p_mn, p_mnf, p_mx = _reduce_extremes(ext + 3, live, p_mn, p_mnf, p_mx)
    e = tl.load(edges_ptr + row * EDGES + i)
    top = tl.load(rf + F_TOP).to(tl.float32)
    round_ = tl.load(ri + I_ROUND)
    total = tl.load(rf + F_TOTAL)
    if round_ == 0:
        total = _pick(gm, i, EDGES - 1)  # round 0's last edge is -inf: the whole row
        tl.store(rf + F_TOTAL, total)
        tl.store(rf + F_KMA, total)
        tl.store(rf + F_PMA, total)
    use_k = (k > 0) & (k < V)
    use_p = p < 1.0
    k_solved = tl.load(ri + I_KSOLVED) != 0
    p_solved = tl.load(ri + I_PSOLVED) != 0
    kth = tl.load(rf + F_KTH).to(tl.float32)
    total_k = tl.load(rf + F_TOTAL_K)
    sstar = tl.load(rf + F_SSTAR).to(tl.float32)
    ties = tl.load(ri + I_TIES)

    # 1. The tokens gathered this round, sorted.
    gather = tl.load(ri + I_GATHER)
    if gather != NO_GATHER:
        solve_k = use_k & ~k_solved & (gather != GATHER_P)
        solve_p = use_p & ~p_solved & (gather != GATHER_K) & (~use_k | k_solved | solve_k)
        base_c = tl.where(gather == GATHER_TOP, 0, tl.load(ri + I_GBASE))
        base_m = tl.where(gather == GATHER_TOP, 0.0, tl.load(rf + F_GBASE))
        total_in = tl.where(use_k & k_solved, total_k, total)
        n = tl.load(ri + I_FILL, cache_modifier=".cg")  # the slices' atomics: read past L1
        kth, total_in, s_p, t_p = _solve_gathered(buf_ptr, row, n, k, p, total_in, kth, base_c,
                                                  base_m, top, solve_k, solve_p, CAP)
        if solve_k:
            total_k = total_in
            k_solved = True
        if solve_p:
            sstar = s_p
            ties = t_p
            p_solved = True
        tl.store(ri + I_GATHER, NO_GATHER)
        tl.store(ri + I_FILL, 0)

    # 2. The top-k bracket: count >= k at its lower edge, < k at its upper one.
    ka = tl.load(rf + F_KA).to(tl.float32)
    kb = tl.load(rf + F_KB).to(tl.float32)
    kca = tl.load(ri + I_KCA)
    kcb = tl.load(ri + I_KCB)
    kma = tl.load(rf + F_KMA)
    kmb = tl.load(rf + F_KMB)
    if use_k & ~k_solved:
        ka, kb, kca, kcb, kma, kmb = _narrow(e, gc, k, k, ka, kb, kca, kcb, kma, kmb, gc, gm, i)
        if k_mn == k_mx:  # the bracket held one value: it is the k-th largest (ties at it are kept)
            kth = k_mx
            total_k = kma
            k_solved = True
    # 3. The top-p bracket: the weight at and above its lower edge reaches p * total_k, above its
    # upper edge it does not; while top-k is open, total_k is only known to lie in [kmb, kma].
    pa = tl.load(rf + F_PA).to(tl.float32)
    pb = tl.load(rf + F_PB).to(tl.float32)
    pca = tl.load(ri + I_PCA)
    pcb = tl.load(ri + I_PCB)
    pma = tl.load(rf + F_PMA)
    pmb = tl.load(rf + F_PMB)
    total_known = ~use_k | k_solved
    mass = tl.where(use_k, total_k, total)
    if use_p & ~p_solved:
        goal_a = p * tl.where(total_known, mass, kma)
        goal_b = p * tl.where(total_known, mass, kmb)
        pa, pb, pca, pcb, pma, pmb = _narrow(e, gm, goal_a, goal_b, pa, pb, pca, pcb, pma, pmb, gc, gm, i)
        if total_known & (p_mn == p_mx):  # one value: keep its first t ties while the weight before < p
            w = tl.exp(p_mx.to(tl.float64) - top.to(tl.float64))
            n_ties = pca - pcb
            room = p * mass - pmb
            want = tl.where(w > 0, tl.minimum(tl.ceil(tl.maximum(room, 0.0) / w), 4e18), 4e18)
            t = tl.minimum(want.to(tl.int64), n_ties)
            ties = tl.maximum(t, 1)  # the bracket holds the last kept token (and rank 0 is always kept)
            sstar = p_mx
            p_solved = True

    tl.store(rf + F_KA, ka)
    tl.store(rf + F_KB, kb)
    tl.store(ri + I_KCA, kca)
    tl.store(ri + I_KCB, kcb)
    tl.store(rf + F_KMA, kma)
    tl.store(rf + F_KMB, kmb)
    tl.store(rf + F_PA, pa)
    tl.store(rf + F_PB, pb)
    tl.store(ri + I_PCA, pca)
    tl.store(ri + I_PCB, pcb)
    tl.store(rf + F_PMA, pma)
    tl.store(rf + F_PMB, pmb)
    tl.store(rf + F_KTH, kth)
    tl.store(rf + F_TOTAL_K, total_k)
    tl.store(ri + I_KSOLVED, k_solved.to(tl.int64))
    tl.store(ri + I_PSOLVED, p_solved.to(tl.int64))
    tl.store(ri + I_ROUND, round_ + 1)

    # 4. Solved, or the next round: a gather where the tokens fit, edges in the open brackets.
    k_open = use_k & ~k_solved
    p_open = use_p & ~p_solved
    if ~k_open & ~p_open:
        sstar = tl.where(use_p, sstar, tl.where(use_k, kth, float("-inf")))
        ties = tl.where(use_p, ties, ALL)
        tl.store(rf + F_SSTAR, sstar)
        tl.store(ri + I_TIES, ties)
        tl.store(ri + I_STATE, SOLVED)
    else:
        # Every token from the top down to the bracket where they fit (both boundaries at once), else
        # the bracket's own tokens where they fit; top-p's only once top-k is solved (its total known).
        top_fit = tl.where(k_open, kca <= CAP, total_known & (pca <= CAP))
        range_fit = tl.where(k_open, kca - kcb <= CAP, total_known & (pca - pcb <= CAP))
        range_kind = tl.where(k_open, GATHER_K, GATHER_P)
        next_gather = tl.where(top_fit, GATHER_TOP, tl.where(range_fit, range_kind, NO_GATHER))
        g_lo = tl.where(k_open, ka, pa)
        g_hi = tl.where(top_fit, float("inf"), tl.where(k_open, kb, pb))
        g_c = tl.where(k_open, kcb, pcb)
        g_m = tl.where(k_open, kmb, pmb)
        tl.store(ri + I_GATHER, next_gather)
        tl.store(rf + F_GLO, g_lo)
        tl.store(rf + F_GHI, g_hi)
        tl.store(ri + I_GBASE, g_c)
        tl.store(rf + F_GBASE, g_m)
        half: tl.constexpr = EDGES // 2
        both = k_open & p_open
        ek = _place_edges(ka, kb, k_mn, k_mnf, k_mx, i, 0, EDGES)
        ep = _place_edges(pa, pb, p_mn, p_mnf, p_mx, i, 0, EDGES)
        ek2 = _place_edges(ka, kb, k_mn, k_mnf, k_mx, i, 0, half)
        ep2 = _place_edges(pa, pb, p_mn, p_mnf, p_mx, i, half, half)
        edges = tl.where(both, tl.where(i < half, ek2, ep2), tl.where(k_open, ek, ep))
        tl.store(edges_ptr + row * EDGES + i, edges)


@triton.jit
def _round_kernel(x_ptr, stride_r, stride_c, V, P, temp_ptr, k_ptr, p_ptr, rowi, rowf, edges_ptr, part_cnt,
                  part_mass, part_ext, buf_ptr, count_ptr, LAST: tl.constexpr, BLOCK: tl.constexpr,
                  CH: tl.constexpr, PCH: tl.constexpr, CAP: tl.constexpr):
    sl = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    if tl.load(rowi + row * ROW_I + I_STATE) == SEARCH:
        temp = tl.load(temp_ptr + row)
        top = tl.load(rowf + row * ROW_F + F_TOP).to(tl.float32)
        _round_slice(x_ptr, stride_r, stride_c, V, row, sl, temp, top, rowi, rowf, edges_ptr, part_cnt, part_mass,
                     part_ext, buf_ptr, P, BLOCK, CH, CAP)
        if _last_arrival(count_ptr + row, P):
            k = tl.load(k_ptr + row)
            p = tl.load(p_ptr + row)
            _plan(row, V, P, k, p, rowi, rowf, edges_ptr, part_cnt, part_mass, part_ext, buf_ptr, PCH, CAP)
            if LAST:  # a row still open finishes here, in this one program
                for _ in range(FALLBACK_ROUNDS):
                    # Within one program too, what some threads stored (the plan's fields, the slices'
                    # partials) must be written before other threads read it: a barrier between steps.
                    tl.debug_barrier()
                    if tl.load(rowi + row * ROW_I + I_STATE, cache_modifier=".cg") == SEARCH:
                        for s2 in range(0, P):
                            _round_slice(x_ptr, stride_r, stride_c, V, row, s2, temp, top, rowi, rowf, edges_ptr,
                                         part_cnt, part_mass, part_ext, buf_ptr, P, BLOCK, CH, CAP)
                        tl.debug_barrier()
                        _plan(row, V, P, k, p, rowi, rowf, edges_ptr, part_cnt, part_mass, part_ext, buf_ptr, PCH,
                              CAP)
            tl.atomic_xchg(count_ptr + row, 0)


@triton.jit
def _draw_kernel(x_ptr, stride_r, stride_c, V, P, temp_ptr, minp_ptr, seed_ptr, off_ptr, out_ptr, rowi, rowf,
                 part_f, part_i, count_ptr, ADVANCE: tl.constexpr, BLOCK: tl.constexpr, PCH: tl.constexpr):
    sl = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    ri = rowi + row * ROW_I
    rf = rowf + row * ROW_F
    state = tl.load(ri + I_STATE)
    if state != DONE:
        temp = tl.load(temp_ptr + row)
        min_p = tl.load(minp_ptr + row)
        top = tl.load(rf + F_TOP).to(tl.float32)
        sstar = tl.load(rf + F_SSTAR).to(tl.float32)
        ties = tl.load(ri + I_TIES)
        offs = sl * BLOCK + tl.arange(0, BLOCK)
        s, ok = _scaled(x_ptr, row, offs, V, stride_r, stride_c, temp)
        w = tl.exp(s.to(tl.float64) - top.to(tl.float64))
        strict = ok & (s > sstar) & (w >= min_p)
        tie = ok & (s == sstar)
        tl.store(part_f + row * P + sl, tl.sum(tl.where(strict, w, 0.0)))
        tl.store(part_i + row * P + sl, tl.sum(tie.to(tl.int64)))
        if _last_arrival(count_ptr + row, P):
            w_tie = tl.exp(sstar.to(tl.float64) - top.to(tl.float64))
            w_tie = tl.where(w_tie >= min_p, w_tie, 0.0)
            # Two passes over the slices' partials, in slice order: the kept weight, then where u lands.
            zero_f = tl.zeros_like(w_tie)  # float64 and int64 loop-carried sums
            zero_i = tl.zeros_like(ties)
            total = zero_f
            seen = zero_i
            for p0 in range(0, P, PCH):
                pp = p0 + tl.arange(0, PCH)
                mf = tl.load(part_f + row * P + pp, mask=pp < P, other=0.0, cache_modifier=".cg")
                mi = tl.load(part_i + row * P + pp, mask=pp < P, other=0, cache_modifier=".cg")
                before = seen + tl.cumsum(mi, 0) - mi
                total += tl.sum(mf + w_tie * tl.minimum(tl.maximum(ties - before, 0), mi).to(tl.float64))
                seen += tl.sum(mi)
            seed = tl.load(seed_ptr + row)
            offset = tl.load(off_ptr + row)
            target = _philox_uniform(seed, offset) * total
            cum = zero_f
            seen = zero_i
            pick = -1
            pick_cum = zero_f
            pick_seen = zero_i
            last = -1
            last_cum = zero_f
            last_seen = zero_i
            for p0 in range(0, P, PCH):
                pp = p0 + tl.arange(0, PCH)
                mf = tl.load(part_f + row * P + pp, mask=pp < P, other=0.0, cache_modifier=".cg")
                mi = tl.load(part_i + row * P + pp, mask=pp < P, other=0, cache_modifier=".cg")
                before = seen + tl.cumsum(mi, 0) - mi
                kept = mf + w_tie * tl.minimum(tl.maximum(ties - before, 0), mi).to(tl.float64)
                run = cum + tl.cumsum(kept, 0)
                hit = tl.min(tl.where((run > target) & (pp < P), pp, 2147483647))
                if (pick < 0) & (hit < 2147483647):
                    pick = hit
                    pick_cum = _pick(run - kept, pp, hit)
                    pick_seen = _pick(before, pp, hit)
                lp = tl.max(tl.where((kept > 0) & (pp < P), pp, -1))
                if lp >= 0:
                    last = lp
                    last_cum = _pick(run - kept, pp, lp)
                    last_seen = _pick(before, pp, lp)
                cum += tl.sum(kept)
                seen += tl.sum(mi)
            # Some slice keeps weight (the top token's is 1, and every filter keeps it or a tie of it),
            # so ``last`` is a slice.
            if pick < 0:  # rounding left u * total at the very end: the last slice with weight
                pick = last
                pick_cum = last_cum
                pick_seen = last_seen
            offs = pick * BLOCK + tl.arange(0, BLOCK)
            s, ok = _scaled(x_ptr, row, offs, V, stride_r, stride_c, temp)
            w = tl.exp(s.to(tl.float64) - top.to(tl.float64))
            tie = ok & (s == sstar)
            rank = pick_seen + tl.cumsum(tie.to(tl.int64), 0) - tie.to(tl.int64)
            kept = ok & (w >= min_p) & ((s > sstar) | (tie & (rank < ties)))
            kw = tl.where(kept, w, 0.0)
            run = pick_cum + tl.cumsum(kw, 0)
            first = tl.min(tl.where(kept & (run > target), offs, 2147483647))
            last_pos = tl.max(tl.where(kept & (w > 0), offs, -1))
            token = tl.where(first < 2147483647, first, last_pos)
            tl.store(out_ptr + row, token.to(tl.int64))
            if ADVANCE:
                tl.store(off_ptr + row, offset + 1)
            tl.atomic_xchg(count_ptr + row, 0)


BLOCK = 1024  # tokens per program: gpt2's 50,257 make 50 programs a row (untimed: sweep on a GPU)
# Multi-program rounds before a row still open finishes in one program: round 0's thresholds, then
# the gather that settles most rows (a 0.125-wide bracket of GPT-2's logits rarely holds 1,024
# tokens); a flat row's bracket needs a third (bench_sampling --sweep times 2 against 3).
ROUNDS = 2
CAP = 1024  # tokens one program sorts to settle a bracket
INTERPRETER_CAP = 64
PARTIAL_CHUNK = 64  # slices' partials one program reduces at a time
# A round holds a (64 tokens x 64 edges) float64 tile and sorts CAP keys: at 4 warps that took
# 240-255 registers and spilled on sm_80 (AOT report); 8 warps halve each thread's share.
ROUND_WARPS = 8
_SCRATCH: dict = {}


def _scratch(device: torch.device, rows: int, slices: int, cap: int) -> dict[str, torch.Tensor]:
    """The launches' work buffers, kept per device and shape (like ``arrival_counters``): allocated by
    the first call, which a CUDA graph's warm-up makes before its capture."""
    key = (device, rows, slices, cap)
    buf = _SCRATCH.get(key)
    if buf is None:
        f64, i64 = dict(dtype=torch.float64, device=device), dict(dtype=torch.int64, device=device)
        buf = _SCRATCH[key] = {
            "rowi": torch.zeros(rows, int(ROW_I), **i64), "rowf": torch.zeros(rows, int(ROW_F), **f64),
            "edges": torch.zeros(rows, int(EDGES), dtype=torch.float32, device=device),
            "part_cnt": torch.zeros(rows, slices, int(EDGES), dtype=torch.int32, device=device),
            "part_mass": torch.zeros(rows, slices, int(EDGES), **f64),
            "part_ext": torch.zeros(rows, slices, int(EXTREMES), dtype=torch.float32, device=device),
            "part_f": torch.zeros(rows, slices, **f64), "part_i": torch.zeros(rows, slices, **i64),
            "part_max": torch.zeros(rows, slices, dtype=torch.float32, device=device),
            "part_arg": torch.zeros(rows, slices, dtype=torch.int32, device=device),
            "buf": torch.zeros(rows, cap, **i64),
        }
    return buf


def split_launch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, out: torch.Tensor, advance: bool,
                 block: int = BLOCK, cap: int | None = None, rounds: int = ROUNDS, chunk: int | None = None) -> None:
    """Launch the split sampler: ``out[r]`` = row r's token drawn at ``offset[r]`` (then
    ``offset[r] += 1`` with ``advance``). The parameters as ``sample_next_`` takes them.

    ``block`` (tokens per program), ``cap`` (tokens one program sorts, a power of two) and ``rounds``
    (>= 1) change the speed, never the tokens. ``cap`` defaults to ``CAP`` on a GPU and 64 in the
    interpreter (whose sort of 1,024 keys takes about a second); ``chunk`` (tokens a program takes
    per step of its edge count) to 64 on a GPU (registers) and the whole block in the interpreter.
    """
    rows, vocab = logits.shape
    if rows == 0:
        return
    slices = triton.cdiv(vocab, block)
    interpreted = logits.device.type == "cpu"
    chunk = chunk or (block if interpreted else min(64, block))
    cap = cap or (INTERPRETER_CAP if interpreted else CAP)
    s = _scratch(logits.device, rows, slices, cap)
    counters = arrival_counters(logits.device, rows)
    grid = (slices, rows)
    x = (logits, logits.stride(0), logits.stride(1), vocab, slices)
    _stats_kernel[grid](*x, temperature, top_k, top_p, offset, out, s["rowi"], s["rowf"], s["edges"],
                        s["part_max"], s["part_arg"], counters, ADVANCE=advance, BLOCK=block, PCH=PARTIAL_CHUNK)
    for r in range(rounds):
        _round_kernel[grid](*x, temperature, top_k, top_p, s["rowi"], s["rowf"], s["edges"], s["part_cnt"],
                            s["part_mass"], s["part_ext"], s["buf"], counters, LAST=r == rounds - 1, BLOCK=block,
                            CH=chunk, PCH=PARTIAL_CHUNK, CAP=cap, num_warps=ROUND_WARPS)
    _draw_kernel[grid](*x, temperature, min_p, seed, offset, out, s["rowi"], s["rowf"], s["part_f"], s["part_i"],
                       counters, ADVANCE=advance, BLOCK=block, PCH=PARTIAL_CHUNK)


def split_launches(rounds: int = ROUNDS) -> int:
    """Kernels one split draw launches: stats, ``rounds`` rounds, the draw."""
    return rounds + 2


_SM_COUNTS: dict = {}


def split_max_rows(device: torch.device) -> int:
    """The batch sizes below which ``sample`` splits rows over programs on ``device``: its SM count
    (the one-block-per-row CUDA sampler fills the GPU from there on; where between them is faster
    is for the GPU's ``bench_sampling`` to say). Read once per device: a plain dict, which
    torch.compile reads as a constant (``torch.compiler.assume_constant_result`` would import
    torch._dynamo with this module, 1.3 s of every process's start)."""
    count = _SM_COUNTS.get(device)
    if count is None:
        count = _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


@kernel_op("sample_split", inference_only="sampling draws tokens, not gradients")
def sample_split(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``sample_unchecked`` on the split sampler: int64 (B,), row r's token drawn at ``offset[r]``.
    logits (B, V) fp32/fp16/bf16 on a GPU (or on CPU in the interpreter); the per-row parameters as
    ``sample_unchecked`` takes them (temperature fp32, top_k int64, top_p and min_p fp64, seed and
    offset int64, each (B,) and contiguous, already valid)."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    split_launch(logits, temperature, top_k, top_p, min_p, seed, offset, out, advance=False)
    return out


@sample_split.op.register_fake
def _(logits, temperature, top_k, top_p, min_p, seed, offset):
    return logits.new_empty((logits.shape[0],), dtype=torch.long)


@kernel_op("sample_split_", mutates_args=("offset", "out"), inference_only="sampling draws tokens, not gradients")
def sample_split_(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, out: torch.Tensor) -> None:
    """``sample_next_`` on the split sampler: ``out[r]`` = row r's token drawn at ``offset[r]``, then
    ``offset[r] += 1``; the parameters as ``sample_split`` takes them, ``offset`` and ``out``
    contiguous int64 (B,)."""
    split_launch(logits, temperature, top_k, top_p, min_p, seed, offset, out, advance=True)


@sample_split_.op.register_fake
def _(logits, temperature, top_k, top_p, min_p, seed, offset, out):
    return None


def aot_launches() -> None:
    """The launches a GPU run makes (for ``gpt2kernels.aot``): gpt2's vocabulary in each logits dtype,
    at batch 1 and 64 (the vocabulary's 50,257 tokens are not a multiple of 16, 50,304 is)."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, vocab in ((1, 50257), (64, 50304)):
            rowf = dict(device="cpu")
            split_launch(torch.empty(rows, vocab, dtype=dtype, **rowf), torch.empty(rows, **rowf),
                         torch.empty(rows, dtype=torch.int64, **rowf), torch.empty(rows, dtype=torch.float64, **rowf),
                         torch.empty(rows, dtype=torch.float64, **rowf), torch.empty(rows, dtype=torch.int64, **rowf),
                         torch.empty(rows, dtype=torch.int64, **rowf), torch.empty(rows, dtype=torch.int64, **rowf),
                         advance=True, cap=CAP, chunk=64)
