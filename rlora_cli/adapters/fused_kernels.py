"""The Triton kernels of the fused adapter path and their tile choices (fused.py launches them).

    gemm_lowrank   out = a·bᵀ (+ bias) + Σ_t s_t·z_t·c_tᵀ, the low-rank terms in the epilogue of the
                   same output tile (written once); term 0 optionally under the input-dropout mask
    rank_forward   one pass over x: H = drop(x)·Aᵀ, L = x·W_rᵀ, H0 = x·A0ᵀ, then per-head masks,
                   gates, the softmax router and alpha → Z (plus H and the router's P for backward)
    rank_backward  one pass over dy: dZ = dy·[B | B0], then the mask, gate and softmax backward
                   → G = [dH | dL | dH0] (plus per-tile sums of the scalar gates' gradient)
    weight_grads   per token chunk, x tiles loaded once: Gᵀ·[drop(x) | x] → partial [dA; dW_r]

Rank-space columns: head i, component k is column j = i·r + k of E = n·r; with one shared A,
column j reads A's row j mod r. A dropout mask is never stored: element (row, col) of a
[rows, cols] mask is kept when tl.rand(seed, row·cols + col) ≥ p, in every kernel that needs it,
so the backward regenerates what the forward drew. fp32 accumulates everywhere; operands are
cast to the compute dtype DT on load (what autocast does to fp32 adapters, without a copy).

Imported only where triton is installed (fused.py guards it); TRITON_INTERPRET=1 runs every kernel
on the CPU (tests/adapters/test_fused*.py); `Tiles` says which tiles run where."""

import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# triton.jit picks the interpreter when the module is imported, so this file decides it the same way.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ------------------------------------------------------------------------------------ shared pieces
@triton.jit
def _keep(seed, rows, cols, ncols, p):
    """The dropout keep mask of elements (rows[:, None], cols[None, :]) of a [*, ncols] tensor."""
    return tl.rand(seed, rows[:, None] * ncols + cols[None, :]) >= p


@triton.jit
def _spread(prob, je, jh, R: tl.constexpr, E: tl.constexpr):
    """[BM, heads] → [BM, columns]: each column gets its head's value (a 0/1 matrix product, exact)."""
    sel = ((jh[:, None] == je[None, :] // R) & (je[None, :] < E)).to(tl.float32)
    return tl.dot(prob, sel, input_precision="ieee")


@triton.jit
def _fold(v, je, jo, R: tl.constexpr, E: tl.constexpr, BY_HEAD: tl.constexpr):
    """[BM, columns] → [BM, heads] (BY_HEAD: the sum of each head's r columns) or [BM, r] (each
    component summed over the heads: a shared A's gradient)."""
    group = je[:, None] // R if BY_HEAD else je[:, None] % R
    return tl.dot(v, ((group == jo[None, :]) & (je[:, None] < E)).to(tl.float32), input_precision="ieee")


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's first output row and column; grouped along M so neighbours share b tiles in L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


# ------------------------------------------------------------------------------------ gemm_lowrank

@triton.jit
def _add_lowrank(acc, z_ptr, c_ptr, rm, rn, M, N, R, s_zm, s_zr, s_cn, s_cr, scale, seed_ptr, p, keep_scale,
                 DIRECT: tl.constexpr, DROP: tl.constexpr, BLOCK_R: tl.constexpr, DT: tl.constexpr,
                 PREC: tl.constexpr):
    """acc + scale·[keep ⊙] z·cᵀ on this tile; DIRECT (scale 1, no mask) accumulates into acc itself."""
    rr = tl.arange(0, BLOCK_R)
    if DIRECT:
        part = acc
    else:
        part = tl.zeros_like(acc)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        z = tl.load(z_ptr + rm[:, None] * s_zm + r[None, :] * s_zr, mask=(rm[:, None] < M) & (r[None, :] < R),
                    other=0.0)
        c = tl.load(c_ptr + r[:, None] * s_cr + rn[None, :] * s_cn, mask=(r[:, None] < R) & (rn[None, :] < N),
                    other=0.0)
        part = tl.dot(z.to(DT), c.to(DT), part, input_precision=PREC)
    if not DIRECT:
        if DROP:
            part = tl.where(_keep(tl.load(seed_ptr), rm, rn, N, p), part * keep_scale, 0.0)
        part = acc + part * scale
    return part


@triton.jit
def _mainloop(a_ptr, b_ptr, off_m, off_n, M, N, K, s_am, s_ak, s_bn, s_bk, DT: tl.constexpr,
              PREC: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """a·bᵀ on one tile from pointers (any strides, any alignment)."""
    rk = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge re-read valid ones (never stored), so the loop needs no M/N masks.
    am = tl.max_contiguous(tl.multiple_of((off_m + tl.arange(0, BLOCK_M)) % M, BLOCK_M), BLOCK_M)
    bn = tl.max_contiguous(tl.multiple_of((off_n + tl.arange(0, BLOCK_N)) % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + am[:, None] * s_am + rk[None, :] * s_ak
    b_ptrs = b_ptr + rk[:, None] * s_bk + bn[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = rk < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(DT), b.to(DT), acc, input_precision=PREC)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    return acc


@triton.jit
def _mainloop_tma(a_desc, b_desc, off_m, off_n, K, B_T: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """a·bᵀ on one tile from tensor descriptors: Hopper's copy engine brings the tiles, zero-padded
    at the edges. B_T: b_desc describes bᵀ [K, N] (b = Wᵀ is a view of the row-major W)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, k * BLOCK_K])
        if B_T:
            b = b_desc.load([k * BLOCK_K, off_n])
        else:
            b = b_desc.load([off_n, k * BLOCK_K]).T
        acc = tl.dot(a.to(DT), b.to(DT), acc, input_precision=PREC)
    return acc


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, bias_ptr, out_ptr, seed_ptr, z0_ptr, c0_ptr, z1_ptr, c1_ptr, z2_ptr, c2_ptr,
                 M, N, K, R0, R1, R2, s_am, s_ak, s_bn, s_bk, s_om, s_on,
                 s_z0m, s_z0r, s_c0n, s_c0r, s_z1m, s_z1r, s_c1n, s_c1r, s_z2m, s_z2r, s_c2n, s_c2r,
                 scale0, scale1, scale2, p_drop, keep_scale,
                 HAS_BIAS: tl.constexpr, TERMS: tl.constexpr, DIRECT0: tl.constexpr, DIRECT1: tl.constexpr,
                 DIRECT2: tl.constexpr, DROP0: tl.constexpr, BR0: tl.constexpr, BR1: tl.constexpr,
                 BR2: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EVEN_K: tl.constexpr,
                 TMA: tl.constexpr, B_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """a_ptr and b_ptr are tensor descriptors when TMA, plain pointers otherwise."""
    off_m, off_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if TMA:
        acc = _mainloop_tma(a_ptr, b_ptr, off_m, off_n, K, B_T, DT, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = _mainloop(a_ptr, b_ptr, off_m, off_n, M, N, K, s_am, s_ak, s_bn, s_bk, DT, PREC, EVEN_K,
                        BLOCK_M, BLOCK_N, BLOCK_K)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    if TERMS >= 1:
        acc = _add_lowrank(acc, z0_ptr, c0_ptr, rm, rn, M, N, R0, s_z0m, s_z0r, s_c0n, s_c0r, scale0,
                           seed_ptr, p_drop, keep_scale, DIRECT0, DROP0, BR0, DT, PREC)
    if TERMS >= 2:
        acc = _add_lowrank(acc, z1_ptr, c1_ptr, rm, rn, M, N, R1, s_z1m, s_z1r, s_c1n, s_c1r, scale1,
                           seed_ptr, p_drop, keep_scale, DIRECT1, False, BR1, DT, PREC)
    if TERMS >= 3:
        acc = _add_lowrank(acc, z2_ptr, c2_ptr, rm, rn, M, N, R2, s_z2m, s_z2r, s_c2n, s_c2r, scale2,
                           seed_ptr, p_drop, keep_scale, DIRECT2, False, BR2, DT, PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


# ------------------------------------------------------------------------------------ rank space

@triton.jit
def _rank_fwd_kernel(x_ptr, a_ptr, w_ptr, a0_ptr, gate_ptr, seed_ptr, z_ptr, h_ptr, p_ptr, T, D,
                     s_xm, s_xk, s_am, s_ak, s_wm, s_wk, s_a0m, s_a0k, alpha, comp_scale, p_in, keep_in,
                     p_head, keep_head, N_HEADS: tl.constexpr, R: tl.constexpr, SHARED: tl.constexpr,
                     GATE: tl.constexpr, COMP: tl.constexpr, DROP_IN: tl.constexpr, DROP_HEAD: tl.constexpr,
                     BE: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    E = N_HEADS * R
    RA = R if SHARED else E
    ZW = E + R if COMP else E
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows, row_ok = rm % T, rm[:, None] < T
    je, jh, jr, rk = tl.arange(0, BE), tl.arange(0, BH), tl.arange(0, BR), tl.arange(0, BLOCK_K)
    src = je % R if SHARED else je  # a shared A feeds every head: column j reads row j mod r
    acc_h = tl.zeros((BLOCK_M, BE), tl.float32)
    acc_l = tl.zeros((BLOCK_M, BH), tl.float32)
    acc_0 = tl.zeros((BLOCK_M, BR), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < D
        x = tl.load(x_ptr + rows[:, None] * s_xm + kk[None, :] * s_xk, mask=k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + src[None, :] * s_am + kk[:, None] * s_ak, mask=(je[None, :] < E) & k_ok[:, None],
                    other=0.0)
        xd = x
        if DROP_IN:  # A reads the dropped-out x; the router and A0 read the clean x
            xd = tl.where(_keep(tl.load(seed_ptr), rows, kk, D, p_in), x.to(tl.float32) * keep_in, 0.0)
        acc_h = tl.dot(xd.to(DT), a.to(DT), acc_h, input_precision=PREC)
        if GATE == 2:
            w = tl.load(w_ptr + jh[None, :] * s_wm + kk[:, None] * s_wk,
                        mask=(jh[None, :] < N_HEADS) & k_ok[:, None], other=0.0)
            acc_l = tl.dot(x.to(DT), w.to(DT), acc_l, input_precision=PREC)
        if COMP:
            a0 = tl.load(a0_ptr + jr[None, :] * s_a0m + kk[:, None] * s_a0k,
                         mask=(jr[None, :] < R) & k_ok[:, None], other=0.0)
            acc_0 = tl.dot(x.to(DT), a0.to(DT), acc_0, input_precision=PREC)
    # Epilogue. H is kept as the compute dtype holds it, so forward and backward see the same values.
    h = acc_h.to(DT).to(tl.float32)
    tl.store(h_ptr + rm[:, None] * RA + je[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_ok & (je[None, :] < RA))
    if DROP_HEAD:  # one independent mask per head and component
        h = tl.where(_keep(tl.load(seed_ptr + 1), rows, je, E, p_head), h * keep_head, 0.0)
    if GATE == 1:
        h = h * tl.load(gate_ptr + je // R, mask=je < E, other=0.0).to(tl.float32)[None, :]
    if GATE == 2:  # softmax over heads in fp32, of the logits as the compute dtype holds them
        logits = tl.where(jh[None, :] < N_HEADS, acc_l.to(DT).to(tl.float32), float("-inf"))
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        prob = e / tl.sum(e, axis=1)[:, None]
        tl.store(p_ptr + rm[:, None] * N_HEADS + jh[None, :], prob, mask=row_ok & (jh[None, :] < N_HEADS))
        h = h * _spread(prob, je, jh, R, E)
    tl.store(z_ptr + rm[:, None] * ZW + je[None, :], (h * alpha).to(z_ptr.dtype.element_ty),
             mask=row_ok & (je[None, :] < E))
    if COMP:
        h0 = acc_0.to(DT).to(tl.float32) * comp_scale
        tl.store(z_ptr + rm[:, None] * ZW + E + jr[None, :], h0.to(z_ptr.dtype.element_ty),
                 mask=row_ok & (jr[None, :] < R))


@triton.jit
def _rank_bwd_kernel(dy_ptr, b_ptr, b0_ptr, h_ptr, p_ptr, gate_ptr, seed_ptr, g_ptr, dgate_ptr, T, DO,
                     s_dym, s_dyk, s_bk, s_bj, s_b0k, s_b0j, alpha, comp_scale, p_head, keep_head,
                     N_HEADS: tl.constexpr, R: tl.constexpr, SHARED: tl.constexpr, GATE: tl.constexpr,
                     COMP: tl.constexpr, DROP_HEAD: tl.constexpr, GATE_GRAD: tl.constexpr, BE: tl.constexpr,
                     BH: tl.constexpr, BR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                     SUM_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    E = N_HEADS * R
    RA = R if SHARED else E
    GW = RA + N_HEADS if GATE == 2 else RA  # G = [dH | dL (router) | dH0 (compensation)]
    GWID = GW + R if COMP else GW
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows, row_ok = rm % T, rm[:, None] < T
    je, jh, jr, rk = tl.arange(0, BE), tl.arange(0, BH), tl.arange(0, BR), tl.arange(0, BLOCK_K)
    src = je % R if SHARED else je
    acc = tl.zeros((BLOCK_M, BE), tl.float32)
    acc_0 = tl.zeros((BLOCK_M, BR), tl.float32)
    for k0 in range(0, DO, BLOCK_K):  # dZ = dy·[B | B0]: dy is read once, here
        kk = k0 + rk
        k_ok = kk < DO
        dy = tl.load(dy_ptr + rows[:, None] * s_dym + kk[None, :] * s_dyk, mask=k_ok[None, :], other=0.0)
        dy = dy.to(DT)
        b = tl.load(b_ptr + kk[:, None] * s_bk + je[None, :] * s_bj, mask=k_ok[:, None] & (je[None, :] < E),
                    other=0.0)
        acc = tl.dot(dy, b.to(DT), acc, input_precision=PREC)
        if COMP:
            b0 = tl.load(b0_ptr + kk[:, None] * s_b0k + jr[None, :] * s_b0j,
                         mask=k_ok[:, None] & (jr[None, :] < R), other=0.0)
            acc_0 = tl.dot(dy, b0.to(DT), acc_0, input_precision=PREC)
    dz = tl.where(row_ok, acc, 0.0) * alpha  # rows past T add nothing to the gates' sums
    h = tl.load(h_ptr + rows[:, None] * RA + src[None, :], mask=je[None, :] < E, other=0.0).to(tl.float32)
    if DROP_HEAD:
        keep = _keep(tl.load(seed_ptr + 1), rows, je, E, p_head)
        h = tl.where(keep, h * keep_head, 0.0)
    if GATE == 1:
        if GATE_GRAD:  # rows of SUM_ROWS tokens: this tile's sum in its first row, zeros in the rest,
            # so every tile size overwrites the whole buffer (the autotuner runs several)
            first = pid * (BLOCK_M // SUM_ROWS)
            tl.store(dgate_ptr + first * BH + jh, tl.sum(_fold(dz * h, je, jh, R, E, True), axis=0))
            for i in tl.static_range(1, BLOCK_M // SUM_ROWS):
                tl.store(dgate_ptr + (first + i) * BH + jh, tl.zeros((BH,), tl.float32),
                         mask=first + i < tl.cdiv(T, SUM_ROWS))
        dz = dz * tl.load(gate_ptr + je // R, mask=je < E, other=0.0).to(tl.float32)[None, :]
    if GATE == 2:
        prob = tl.load(p_ptr + rows[:, None] * N_HEADS + jh[None, :], mask=jh[None, :] < N_HEADS, other=0.0)
        d_w = _fold(dz * h, je, jh, R, E, True)
        d_logits = prob * (d_w - tl.sum(prob * d_w, axis=1)[:, None])  # softmax backward
        tl.store(g_ptr + rm[:, None] * GWID + RA + jh[None, :], d_logits.to(g_ptr.dtype.element_ty),
                 mask=row_ok & (jh[None, :] < N_HEADS))
        dz = dz * _spread(prob, je, jh, R, E)
    if DROP_HEAD:
        dz = tl.where(keep, dz * keep_head, 0.0)
    if SHARED and N_HEADS > 1:
        dh = _fold(dz, je, jr, R, E, False)  # a shared A: each component summed over the heads
        tl.store(g_ptr + rm[:, None] * GWID + jr[None, :], dh.to(g_ptr.dtype.element_ty),
                 mask=row_ok & (jr[None, :] < R))
    else:
        tl.store(g_ptr + rm[:, None] * GWID + je[None, :], dz.to(g_ptr.dtype.element_ty),
                 mask=row_ok & (je[None, :] < E))
    if COMP:
        d0 = acc_0 * comp_scale
        tl.store(g_ptr + rm[:, None] * GWID + GW + jr[None, :], d0.to(g_ptr.dtype.element_ty),
                 mask=row_ok & (jr[None, :] < R))


@triton.jit
def _weight_grad_kernel(g_ptr, x_ptr, seed_ptr, part_ptr, T, D, SPLIT, s_gm, s_xm, s_xk, p_in, keep_in,
                        RA: tl.constexpr, NL: tl.constexpr, DROP_IN: tl.constexpr, BRA: tl.constexpr,
                        BNL: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn[None, :] < D
    chunk = tl.cdiv(tl.cdiv(T, SPLIT), BLOCK_T) * BLOCK_T
    t_lo = tl.program_id(1) * chunk
    t_hi = tl.minimum(t_lo + chunk, T)
    ja, jl, rt0 = tl.arange(0, BRA), tl.arange(0, BNL), tl.arange(0, BLOCK_T)
    acc_a = tl.zeros((BRA, BLOCK_N), tl.float32)
    acc_l = tl.zeros((BNL, BLOCK_N), tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        rt = t0 + rt0
        t_ok = rt < t_hi
        x = tl.load(x_ptr + rt[:, None] * s_xm + rn[None, :] * s_xk, mask=t_ok[:, None] & n_ok, other=0.0)
        ga = tl.load(g_ptr + rt[None, :] * s_gm + ja[:, None], mask=t_ok[None, :] & (ja[:, None] < RA),
                     other=0.0)
        xd = x
        if DROP_IN:
            xd = tl.where(_keep(tl.load(seed_ptr), rt, rn, D, p_in), x.to(tl.float32) * keep_in, 0.0)
        acc_a = tl.dot(ga.to(DT), xd.to(DT), acc_a, input_precision=PREC)
        if NL > 0:
            gl = tl.load(g_ptr + rt[None, :] * s_gm + RA + jl[:, None],
                         mask=t_ok[None, :] & (jl[:, None] < NL), other=0.0)
            acc_l = tl.dot(gl.to(DT), x.to(DT), acc_l, input_precision=PREC)
    out = part_ptr + tl.program_id(1) * (RA + NL) * D + rn[None, :]
    tl.store(out + ja[:, None] * D, acc_a, mask=(ja[:, None] < RA) & n_ok)
    if NL > 0:
        tl.store(out + (RA + jl[:, None]) * D, acc_l, mask=(jl[:, None] < NL) & n_ok)


@triton.jit
def _mask_kernel(seed_ptr, out_ptr, rows, cols, p, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(tl.load(seed_ptr), r, c, cols, p)
    tl.store(out_ptr + r[:, None] * cols + c[None, :], keep.to(tl.float32),
             mask=(r[:, None] < rows) & (c[None, :] < cols))


# ------------------------------------------------------------------------------------ tile choices

class Tiles(NamedTuple):
    """A kernel and its tiles: `configs` (Hopper's) autotuned per shape over `key` as `tuned`, the first
    `fixed` (RLORA_FUSED_AUTOTUNE=0: no tuning runs), `small` the interpreter's; tests force each one."""

    plain: Any
    tuned: Any
    configs: tuple
    key: tuple
    small: dict

    @property
    def fixed(self) -> dict:  # the first config's launch meta: tiles, warps, stages
        return self.configs[0].all_kwargs()

    def pick(self) -> tuple[Any, dict]:
        """(kernel, launch meta) for this process: read at call time, so tests can switch it."""
        if INTERPRETED:
            return self.plain, self.small
        if os.environ.get("RLORA_FUSED_AUTOTUNE", "1") == "0":
            return self.plain, self.fixed
        return self.tuned, {}


def _tiles(kernel, configs: list[tuple[dict, int, int]], key: list[str], small: dict, hook=None) -> Tiles:
    """The first of `configs` is the fixed one; `hook` runs before each config's launch."""
    cfgs = tuple(triton.Config(m, num_warps=w, num_stages=s, pre_hook=hook) for m, w, s in configs)
    tuned = kernel if INTERPRETED else triton.autotune(list(cfgs), key=key)(kernel)
    return Tiles(kernel, tuned, cfgs, tuple(key), small)


def tma_blocks(args: dict) -> None:
    """A tensor descriptor carries its tile shape: set it to the tiles of the config about to run."""
    if args["TMA"]:
        bm, bn, bk = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
        args["a_ptr"].block_shape = [bm, bk]
        args["b_ptr"].block_shape = [bk, bn] if args["B_T"] else [bn, bk]


# Hopper tiles: 128×128 and 128×256 outputs, K steps of 64, 4 or 8 warps, 3 or 4 stages in flight
# (128×256 with 4 warps would hold 256 fp32 accumulators per thread: left out).
GEMM = _tiles(triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_gemm_kernel),
              [({"BLOCK_M": 128, "BLOCK_N": n, "BLOCK_K": 64, "GROUP_M": 8}, w, s)
               for n, w in ((128, 8), (128, 4), (256, 8)) for s in (3, 4)],
              ["M", "N", "K", "s_bk", "TERMS", "DROP0", "HAS_BIAS", "TMA", "B_T"],
              {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, hook=tma_blocks)
# The rank-space kernels stream x or dy once: memory-bound, so enough rows in flight is what counts.
_ROWS = [({"BLOCK_M": m, "BLOCK_K": k}, w, s)
         for m, k, w, s in ((64, 128, 4, 3), (32, 128, 4, 3), (128, 64, 8, 3))]
SUM_ROWS = 32  # rows of tokens per gate-sum row: the smallest BLOCK_M of _ROWS and of the interpreter
RANK_FWD = _tiles(_rank_fwd_kernel, _ROWS, ["T", "D", "N_HEADS", "R", "GATE"], {"BLOCK_M": 32, "BLOCK_K": 32})
# The backward keeps one 32-row tile: on the H200 (Triton 3.6) its 64- and 128-row tiles gave a
# wrong compensation gradient at d_out 8192, once an illegal memory access (RESULTS.md). The
# interpreter's 64 rows are larger than SUM_ROWS, so the tests see the zero-filled sum rows.
RANK_BWD = _tiles(_rank_bwd_kernel, [({"BLOCK_M": 32, "BLOCK_K": 128}, 4, 3)],
                  ["T", "DO", "N_HEADS", "R", "GATE"], {"BLOCK_M": 64, "BLOCK_K": 32})
WEIGHT_GRAD = _tiles(_weight_grad_kernel, [({"BLOCK_T": t, "BLOCK_N": 128}, 4, 3) for t in (64, 128)],
                     ["T", "D", "RA", "NL"], {"BLOCK_T": 32, "BLOCK_N": 32})
MASK = _mask_kernel


def descriptor(t: torch.Tensor) -> TensorDescriptor:
    """A host-side tensor descriptor of a 2-D tensor; its tile shape is set at launch (tma_blocks)."""
    return TensorDescriptor.from_tensor(t, [1, 1])
