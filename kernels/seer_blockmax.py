"""Attention forward that also returns the block-max map of the attention probabilities (SeerAttention target).

For causal self-attention with softmax probabilities ``P = softmax(Q K^T * scale)``, the block-max map is
``M[b, h, i, j] = max(P[b, h, rows of query block i, cols of key block j])`` (zero above the block diagonal). It is
the ground truth that SeerAttention's gates are distilled towards. The dense ``P`` is never built and ``Q K^T`` is
computed once: each program runs a FlashAttention forward over the causal key blocks of its query block and, per
key block, stores the row maxima ``r[i, kb] = max_j s[i, j]`` (log2 space, masked) that the online softmax computes
anyway into a float32 scratch. After the loop it knows each row's log-sum-exp and reduces its own scratch (just
written, so mostly in L2) to ``max_i exp2(r[i, kb] - lse_i)``, which equals the max of the normalised probabilities
over the tile because ``exp2`` is monotone.

Example:
    >>> from hf_effllm.kernels.seer_blockmax import blockmax_attention
    >>> out, block_max = blockmax_attention(q, k, v)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math

import torch
from hf_effllm.kernels.cuda_rt import smem_limit
from hf_effllm.kernels.seer_attention import (
    HAS_TRITON,
    _check_triton_inputs,
    _chunk_rows,
    _heads_per_program,
    check_attention_inputs,
)

from hf_effllm.errors import HfEffllmError

_SCRATCH_BYTES = 2 << 30  # row-max scratch of one launch; more (batch x heads) than that runs in several launches
_EPILOGUE_ELEMENTS = 4096  # scratch values reduced per epilogue step (KB_CHUNK key blocks x HP*BLOCK rows)
# Main-loop variants, module settings so that the benchmark can sweep them:
# - _FOLD_SCALE: the softmax arithmetic of _seer_block (the scale folded into the exponent's FMA); faster in every
#   launch configuration of the H200 sweeps (sessions 6 and 8), hence the default.
# - _PAIR: key blocks in pairs, one online-softmax step (row max, rescale) per 2 * BLOCK keys. None = on where its
#   shared memory (two K and two V tiles per pipeline stage) fits the GPU, else off. H200, 32k: 17.7-18.2 ms
#   against 21.1 ms unpaired at the same launch config (2 heads per program, 8 warps, 3 stages), 18.3 ms for the
#   best unpaired config. (Loading the pairs through TMA descriptors instead of cp.async measured 2-6% slower.)
# - _FIXED_MAX: no online softmax. Each row's probabilities are taken against one fixed reference, its largest
#   score over key block 0 and its diagonal block (a small first launch, _row_ref_kernel; a max over some of the
#   row's keys, so never above its true max), so the accumulator is never rescaled and the P V products only
#   accumulate (no row max per step, no exp2 of a correction, no acc * alpha). bf16 P and the float32 sums have
#   float32's exponent range, so nothing is lost while the true max stays within _GAP (log2 units) of the
#   reference; a program where some row's does not sets a flag, and a third launch redoes the flagged programs with
#   the online softmax (the others return at once). float16 (normal range down to 2^-14 only) always takes the
#   online softmax. On the embedded model's own Q/K (2k tokens of held-out text) the true max is at most 11.9 above
#   that reference (60.4 with the diagonal block alone): no program flagged at _GAP = 64. The reference is computed
#   apart because taking the diagonal block first in the main program needed more shared memory than 3 pipeline
#   stages of paired tiles leave (H200: out of resources); a Cauchy-Schwarz bound (|q_i| max_j |k_j|) instead of a
#   computed reference was 54 log2 units above the true max at the median row of the embedded model. H200, 32k,
#   the default launch (seer_speed_blockmax_fixedmax.md): 16.97 ms against 18.00 ms with the online softmax in the
#   same sweep, 1.12-1.20x cuDNN's forward time over three rounds (median 1.13x), hence the default.
_FOLD_SCALE = True
_PAIR: bool | None = None
_FIXED_MAX = True
_GAP = 64.0

if HAS_TRITON:
    import triton
    import triton.language as tl
    from hf_effllm.kernels.seer_attention import _online_max, _seer_block, _tile_scores

    @triton.jit
    def _pair_tiles(
        q, K, V, kb, offs_n, offs_d, pad_ptr, stride_ks, stride_vs,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_PAD: tl.constexpr,
    ):  # fmt: skip
        # Key blocks kb and kb + 1 (full, below the diagonal): their unscaled scores (padded keys -inf) and V tiles.
        k1 = kb * BLOCK + offs_n
        k2 = k1 + BLOCK
        dmask = offs_d < HEAD_DIM
        ka = tl.load(K + k1[None, :] * stride_ks + offs_d[:, None], mask=dmask[:, None], other=0.0)
        kc = tl.load(K + k2[None, :] * stride_ks + offs_d[:, None], mask=dmask[:, None], other=0.0)
        va = tl.load(V + k1[:, None] * stride_vs + offs_d[None, :], mask=dmask[None, :], other=0.0)
        vc = tl.load(V + k2[:, None] * stride_vs + offs_d[None, :], mask=dmask[None, :], other=0.0)
        sa = tl.dot(q, ka)
        sc = tl.dot(q, kc)
        if HAS_PAD:
            sa = tl.where(tl.load(pad_ptr + k1)[None, :] != 0, sa, float("-inf"))
            sc = tl.where(tl.load(pad_ptr + k2)[None, :] != 0, sc, float("-inf"))
        return sa, sc, va, vc

    @triton.jit
    def _pair_block(
        q, acc, m_i, l_i, K, V, kb, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_PAD: tl.constexpr, FOLD_SCALE: tl.constexpr,
        TILE_LSE: tl.constexpr,
    ):  # fmt: skip
        # Key blocks kb and kb + 1, both full and below the diagonal, in one online-softmax step: one row max and
        # one accumulator rescale for 2 * BLOCK keys. Returns each tile's row statistic as _seer_block does.
        sa, sc, va, vc = _pair_tiles(
            q, K, V, kb, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, HEAD_DIM, BLOCK, HAS_PAD
        )
        if not FOLD_SCALE:
            sa = sa * qk_scale
            sc = sc * qk_scale
        ra = tl.max(sa, 1)
        rc = tl.max(sc, 1)
        if FOLD_SCALE:
            ra = ra * qk_scale
            rc = rc * qk_scale
        m_new, m_safe, alpha = _online_max(m_i, tl.maximum(ra, rc))
        if FOLD_SCALE:
            pa = tl.math.exp2(sa * qk_scale - m_safe[:, None])
            pc = tl.math.exp2(sc * qk_scale - m_safe[:, None])
        else:
            pa = tl.math.exp2(sa - m_safe[:, None])
            pc = tl.math.exp2(sc - m_safe[:, None])
        psa = tl.sum(pa, 1)
        psc = tl.sum(pc, 1)
        l_i = l_i * alpha + psa + psc
        acc = acc * alpha[:, None]
        acc = tl.dot(pa.to(va.dtype), va, acc)
        acc = tl.dot(pc.to(vc.dtype), vc, acc)
        if TILE_LSE:
            ra = m_safe + tl.math.log2(psa)
            rc = m_safe + tl.math.log2(psc)
        return acc, m_new, l_i, ra, rc

    @triton.jit
    def _fixed_block(
        q, acc, m_t, l_i, m_b, K, V, kb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_PAD: tl.constexpr, DIAG: tl.constexpr,
        TILE_LSE: tl.constexpr,
    ):  # fmt: skip
        # _FIXED_MAX: key block kb against the rows' references m_b (log2 space); m_t: the rows' true running max.
        s, v = _tile_scores(
            q, K, V, kb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
            HEAD_DIM, BLOCK, HAS_PAD, DIAG, False,
        )  # fmt: skip
        r = tl.max(s, 1) * qk_scale
        p = tl.math.exp2(s * qk_scale - m_b[:, None])
        ps = tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc)
        if TILE_LSE:
            r_store = m_b + tl.math.log2(ps)
        else:
            r_store = r
        return acc, tl.maximum(m_t, r), l_i + ps, r_store

    @triton.jit
    def _fixed_pair(
        q, acc, m_t, l_i, m_b, K, V, kb, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_PAD: tl.constexpr, TILE_LSE: tl.constexpr,
    ):  # fmt: skip
        # _FIXED_MAX: key blocks kb and kb + 1 (full, below the diagonal), as _fixed_block does one.
        sa, sc, va, vc = _pair_tiles(
            q, K, V, kb, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, HEAD_DIM, BLOCK, HAS_PAD
        )
        ra = tl.max(sa, 1) * qk_scale
        rc = tl.max(sc, 1) * qk_scale
        pa = tl.math.exp2(sa * qk_scale - m_b[:, None])
        pc = tl.math.exp2(sc * qk_scale - m_b[:, None])
        psa = tl.sum(pa, 1)
        psc = tl.sum(pc, 1)
        acc = tl.dot(pa.to(va.dtype), va, acc)
        acc = tl.dot(pc.to(vc.dtype), vc, acc)
        m_t = tl.maximum(m_t, tl.maximum(ra, rc))
        if TILE_LSE:
            ra = m_b + tl.math.log2(psa)
            rc = m_b + tl.math.log2(psc)
        return acc, m_t, l_i + psa + psc, ra, rc

    @triton.jit
    def _main_loops(
        q, m_b, Kh, Vh, r_ptr, rows, qb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
        HPB: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_PAD: tl.constexpr,
        FOLD_SCALE: tl.constexpr, MASS: tl.constexpr, PAIR: tl.constexpr, FIXED: tl.constexpr,
    ):  # fmt: skip
        # The main loop over key blocks 0..qb, each tile's row statistic stored at r_ptr: with the online softmax
        # (m: the running max), or FIXED against the rows' references m_b (m: the rows' true running max).
        m = tl.full([HPB], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([HPB], dtype=tl.float32)
        acc = tl.zeros([HPB, D_PAD], dtype=tl.float32)
        single0 = 0
        if PAIR:  # pairs of full key blocks below the diagonal, then the odd one left (if any) on its own
            single0 = qb - qb % 2
            for kb in range(0, single0, 2):
                if FIXED:
                    acc, m, l_i, ra, rc = _fixed_pair(
                        q, acc, m, l_i, m_b, Kh, Vh, kb, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, qk_scale,
                        HEAD_DIM, BLOCK, HAS_PAD, MASS,
                    )  # fmt: skip
                else:
                    acc, m, l_i, ra, rc = _pair_block(
                        q, acc, m, l_i, Kh, Vh, kb, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, qk_scale,
                        HEAD_DIM, BLOCK, HAS_PAD, FOLD_SCALE, MASS,
                    )  # fmt: skip
                tl.store(r_ptr + kb * HPB + rows, ra)
                tl.store(r_ptr + (kb + 1) * HPB + rows, rc)
        for kb in range(single0, qb):
            acc, m, l_i, r = _any_block(
                q, acc, m, l_i, m_b, Kh, Vh, kb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
                HEAD_DIM, BLOCK, HAS_PAD, False, FOLD_SCALE, MASS, FIXED,
            )  # fmt: skip
            tl.store(r_ptr + kb * HPB + rows, r)
        acc, m, l_i, r = _any_block(
            q, acc, m, l_i, m_b, Kh, Vh, qb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
            HEAD_DIM, BLOCK, HAS_PAD, True, FOLD_SCALE, MASS, FIXED,
        )  # fmt: skip
        tl.store(r_ptr + qb * HPB + rows, r)
        return acc, m, l_i

    @triton.jit
    def _any_block(
        q, acc, m, l_i, m_b, K, V, kb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_PAD: tl.constexpr, DIAG: tl.constexpr,
        FOLD_SCALE: tl.constexpr, MASS: tl.constexpr, FIXED: tl.constexpr,
    ):  # fmt: skip
        # One key block with the online softmax (_seer_block) or against the fixed references (_fixed_block).
        if FIXED:
            return _fixed_block(
                q, acc, m, l_i, m_b, K, V, kb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
                HEAD_DIM, BLOCK, HAS_PAD, DIAG, MASS,
            )  # fmt: skip
        else:
            return _seer_block(
                q, acc, m, l_i, K, V, kb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
                HEAD_DIM, BLOCK, HAS_PAD, DIAG, FOLD_SCALE, MASS,
            )  # fmt: skip

    @triton.jit
    def _row_ref_kernel(
        Q, K, PAD, REF,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_pb,
        H, S, bh0, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
        HAS_PAD: tl.constexpr, HP: tl.constexpr,
    ):  # fmt: skip
        # _FIXED_MAX's reference of each query row (log2 space): its largest score over key block 0 (attention
        # sinks) and its own diagonal block, -inf where neither holds a key it may see. Two Q K^T tiles per program,
        # about 2 / (number of key blocks) of the main pass's products.
        HPB: tl.constexpr = HP * BLOCK
        nb = tl.cdiv(S, BLOCK)
        qb = tl.program_id(0)
        slot = tl.program_id(1)
        bh = bh0 + slot
        b = (bh // (H // HP)).to(tl.int64)
        h0 = (bh % (H // HP)) * HP
        kvh = h0 // GROUP
        rows = tl.arange(0, HPB)
        offs_m = qb * BLOCK + rows % BLOCK
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < HEAD_DIM
        q = tl.load(
            Q + b * stride_qb + (h0 + rows // BLOCK)[:, None] * stride_qh + offs_m[:, None] * stride_qs
            + offs_d[None, :],
            mask=(offs_m < S)[:, None] & dmask[None, :],
            other=0.0,
        )  # fmt: skip
        Kh = K + b * stride_kb + kvh * stride_kh
        r = tl.full([HPB], float("-inf"), dtype=tl.float32)
        for kb in range(0, 2):
            offs_k = kb * qb * BLOCK + offs_n  # block 0, then the diagonal block
            kmask = offs_k < S
            k = tl.load(
                Kh + offs_k[None, :] * stride_ks + offs_d[:, None], mask=kmask[None, :] & dmask[:, None], other=0.0
            )
            valid = (offs_k[None, :] <= offs_m[:, None]) & kmask[None, :]
            if HAS_PAD:
                valid = valid & (tl.load(PAD + b * stride_pb + offs_k, mask=kmask, other=0)[None, :] != 0)
            r = tl.maximum(r, tl.max(tl.where(valid, tl.dot(q, k), float("-inf")), 1))
        tl.store(REF + (slot * nb + qb) * HPB + rows, r * qk_scale)

    @triton.jit
    def _blockmax_fwd_kernel(
        Q, K, V, Out, BM, PAD, R,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os, stride_mb, stride_mh, stride_mq, stride_pb,
        H, S, bh0, qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
        HAS_PAD: tl.constexpr, HP: tl.constexpr, KB_CHUNK: tl.constexpr, FOLD_SCALE: tl.constexpr,
        MASS: tl.constexpr, PAIR: tl.constexpr, FIXED: tl.constexpr = 0, REF=None, FLAGS=None,
        GAP: tl.constexpr = 64.0,
    ):  # fmt: skip
        # FIXED (_FIXED_MAX): 0 = the online softmax; 1 = each row's reference max from REF (_row_ref_kernel), each
        # program's FLAGS entry set where it was too far from some row's true max; 2 = the online softmax again for
        # the flagged programs only.
        HPB: tl.constexpr = HP * BLOCK
        nb = tl.cdiv(S, BLOCK)
        qb = nb - 1 - tl.program_id(0)  # longest rows first: the short ones fill the tail of the launch
        slot = tl.program_id(1)  # (batch, head group) within this launch: its scratch slab
        if FIXED == 2:  # noqa: SIM102 (a constexpr test: the load exists in this mode only)
            if tl.load(FLAGS + slot * nb + qb) == 0:
                return
        bh = bh0 + slot
        b = (bh // (H // HP)).to(tl.int64)  # 64-bit batch offsets (b * stride_qb can pass 2^31)
        h0 = (bh % (H // HP)) * HP
        kvh = h0 // GROUP
        rows = tl.arange(0, HPB)
        hh = h0 + rows // BLOCK
        offs_m = qb * BLOCK + rows % BLOCK
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < HEAD_DIM
        row_ok = offs_m < S
        q = tl.load(
            Q + b * stride_qb + hh[:, None] * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
            mask=row_ok[:, None] & dmask[None, :],
            other=0.0,
        )
        Kh = K + b * stride_kb + kvh * stride_kh
        Vh = V + b * stride_vb + kvh * stride_vh
        pad_ptr = PAD + b * stride_pb
        # Packed lower triangle: the program of query block qb owns HPB * (qb + 1) floats of its slab.
        r_ptr = R + (slot.to(tl.int64) * (nb * (nb + 1) // 2) + qb * (qb + 1) // 2) * HPB
        if FIXED == 1:
            m_b = tl.load(REF + (slot * nb + qb) * HPB + rows)
            m_b = tl.where(m_b == float("-inf"), 0.0, m_b)  # no key in those blocks: the gap test covers the row
            acc, m_t, l_i = _main_loops(
                q, m_b, Kh, Vh, r_ptr, rows, qb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
                HPB, D_PAD, HEAD_DIM, BLOCK, HAS_PAD, True, MASS, PAIR, True,
            )  # fmt: skip
            m_i = m_b
            # A row whose true max ended far from its reference: its probabilities may have left float32's range.
            far = (m_t > float("-inf")) & (tl.abs(m_t - m_b) > GAP)
            tl.store(FLAGS + slot * nb + qb, tl.max(far.to(tl.int32), 0))
        else:
            acc, m_i, l_i = _main_loops(
                q, 0.0, Kh, Vh, r_ptr, rows, qb, offs_m, offs_n, offs_d, pad_ptr, stride_ks, stride_vs, S, qk_scale,
                HPB, D_PAD, HEAD_DIM, BLOCK, HAS_PAD, FOLD_SCALE, MASS, PAIR, False,
            )  # fmt: skip
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(
            Out + b * stride_ob + hh[:, None] * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & dmask[None, :],
        )
        # log2-space log-sum-exp; rows that saw nothing (padding, beyond S) get +inf so their probabilities are 0.
        lse = tl.where(seen & row_ok, m_i + tl.math.log2(l_safe), float("inf"))
        # The row maxima were stored by other threads of this program: make them visible (bar.sync) first.
        tl.debug_barrier()
        # max_i P[i, tile] = max_i exp2(r[i, kb] - lse_i): exp2 is monotone, so the max commutes with it.
        kk = tl.arange(0, KB_CHUNK)
        bm_ptr = BM + b * stride_mb + (h0 + tl.arange(0, HP))[None, :] * stride_mh + qb * stride_mq
        for kb0 in range(0, qb + 1, KB_CHUNK):
            kbs = kb0 + kk
            kmask = kbs <= qb
            r2 = tl.load(r_ptr + kbs[:, None] * HPB + rows[None, :], mask=kmask[:, None], other=float("-inf"))
            p = tl.math.exp2(r2 - lse[None, :])
            if MASS:  # r2 = the tile's row log-sum-exp: exp2(r2 - lse) is the row's probability mass in the tile
                stat = tl.sum(tl.reshape(p, (KB_CHUNK, HP, BLOCK)), 2)
            else:
                stat = tl.max(tl.reshape(p, (KB_CHUNK, HP, BLOCK)), 2)
            tl.store(bm_ptr + kbs[:, None], stat, mask=kmask[:, None])


def _pair_fits(q: torch.Tensor, rows: int, block: int, d_pad: int, stages: int) -> bool:
    """Whether the paired main loop's shared memory fits this GPU: ``stages`` copies of two K and two V tiles plus
    the query tile (Triton's pipelining; 229,888 bytes at 128 rows, head_dim 128, 3 stages: the H200 has 232,448)."""
    if q.device.type != "cuda":
        return True  # the interpreter has no shared-memory limit
    need = (stages * 4 * block + rows) * d_pad * q.element_size() + 1024
    return need <= smem_limit(q.device)


def _check_stat(stat: str, name: str) -> None:
    if stat not in ("max", "mass"):
        raise HfEffllmError(f"{name}: stat={stat!r} is not supported; use 'max' or 'mass'.")


def blockmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_size: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
    heads_per_program: int | None = None,
    stat: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention output and the block-max (or block-mass) map of its probabilities, in one pass over K/V.

    Cost: the FLOPs of one causal FlashAttention forward (``4 * Hq * S^2 / 2 * D`` per sequence; the previous
    two-pass version recomputed ``Q K^T``: ~1.5x). Extra memory traffic: the row-max scratch, ``S * (nb + 1) / 2``
    float32 per query head, written once and read back once by the same program (just written, so largely from
    L2), plus the ``nb x nb`` float32 map. At 32k tokens (``nb = 512``): 33.6 MB per head each way, 1.07 GB written
    and 1.07 GB read for 32 heads (~0.45 ms at the H200's 4.8 TB/s if none of it stayed in L2, against ~14.7 ms
    for cuDNN's forward), and a 33.6 MB map; the main loop's K/V tile loads are ~34 GB at 4 heads per program
    (mostly L2 hits). The scratch of one launch is capped at 2 GiB: longer inputs (128k tokens: 537 MB per head)
    run a few (batch, head group) slots per launch. For bf16/fp32 the softmax runs against a fixed reference max
    per row (``_FIXED_MAX``: a first small launch computes it from key block 0 and the diagonal block, about
    ``2 / nb`` of the products; a last launch redoes, with the online softmax, the rare programs where a row's true
    max ends more than 64 log2 units above its reference); float16 takes the online softmax.

    Args:
        q: ``(B, Hq, S, D)`` query states, fp16/bf16 (fp32 accepted).
        k: ``(B, Hkv, S, D)`` key states (GQA: ``Hq`` a multiple of ``Hkv``; K/V are not repeated).
        v: ``(B, Hkv, S, D)`` value states.
        scale: softmax scale, default ``D ** -0.5``.
        key_padding: optional bool ``(B, S)``, True for real tokens.
        block_size: tile size of the map (16, 32, 64 or 128).
        num_warps: Triton launch option (default 4 for D <= 64, else 8).
        num_stages: Triton launch option (default 3).
        heads_per_program: query heads of one KV group per program (a power of two; they share K/V loads);
            default 2 on CUDA when the group size is even, else 1.
        stat: ``"max"`` (each tile's largest probability, the paper's target) or ``"mass"`` (the sum of its
            probabilities: per row, the tile's log-sum-exp is stored instead of its row max; same cost).

    Returns:
        ``(out, block_max)``: ``out`` ``(B, Hq, S, D)`` in ``q``'s dtype and ``block_max`` float32
        ``(B, Hq, nb, nb)`` with ``nb = ceil(S / block_size)``, zero above the diagonal, for fully masked tiles
        and for query rows that see no key.

    Example:
        >>> out, bmax = blockmax_attention(q, k, v)  # doctest: +SKIP
        >>> target = bmax / bmax.sum(-1, keepdim=True)  # doctest: +SKIP
    """
    name = "blockmax_attention"
    _check_stat(stat, name)
    b, hq, hkv, s, d = check_attention_inputs(q, k, v, block_size=block_size, key_padding=key_padding, name=name)
    _check_triton_inputs(q, name)
    nb = math.ceil(s / block_size)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    bmax = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    pad = key_padding.contiguous().view(torch.uint8) if key_padding is not None else bmax
    scale = d**-0.5 if scale is None else float(scale)
    d_pad = max(16, triton.next_power_of_2(d))
    hp = _heads_per_program(heads_per_program, hq, hkv, hkv, q.device, name)
    slots = b * hq // hp
    slab = nb * (nb + 1) // 2 * hp * block_size  # floats of scratch per (batch, head group)
    per_launch = max(1, min(slots, _SCRATCH_BYTES // (4 * slab)))
    scratch = torch.empty(per_launch * slab, dtype=torch.float32, device=q.device)
    kb_chunk = max(1, _EPILOGUE_ELEMENTS // (hp * block_size))
    warps, stages = num_warps or (4 if d_pad <= 64 else 8), num_stages or 3
    pair = _pair_fits(q, hp * block_size, block_size, d_pad, stages) if _PAIR is None else bool(_PAIR)
    # (not for float16: its normal range ends at 2^-14)
    fixed = bool(_FIXED_MAX) and q.dtype != torch.float16
    flags = torch.empty(per_launch * nb, dtype=torch.int32, device=q.device) if fixed else None
    ref = torch.empty(per_launch * nb * hp * block_size, dtype=torch.float32, device=q.device) if fixed else None
    for bh0, mode in itertools.product(range(0, slots, per_launch), (1, 2) if fixed else (0,)):
        grid = (nb, min(per_launch, slots - bh0))
        if mode == 1:
            _row_ref_kernel[grid](
                q, k, pad, ref,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                pad.stride(0) if key_padding is not None else 0, hq, s, bh0, scale * 1.4426950408889634,
                GROUP=hq // hkv, HEAD_DIM=d, D_PAD=d_pad, BLOCK=block_size, HAS_PAD=key_padding is not None, HP=hp,
                num_warps=warps, num_stages=1,
            )  # fmt: skip
        _blockmax_fwd_kernel[grid](
            q, k, v, out, bmax, pad, scratch,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            bmax.stride(0), bmax.stride(1), bmax.stride(2), pad.stride(0) if key_padding is not None else 0,
            hq, s, bh0, scale * 1.4426950408889634,
            GROUP=hq // hkv, HEAD_DIM=d, D_PAD=d_pad, BLOCK=block_size, HAS_PAD=key_padding is not None, HP=hp,
            KB_CHUNK=kb_chunk, FOLD_SCALE=bool(_FOLD_SCALE), MASS=stat == "mass", PAIR=pair, FIXED=mode, REF=ref,
            FLAGS=flags, GAP=float(_GAP), num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return out, bmax


def blockmax_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    block_size: int = 64,
    stat: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch version of :func:`blockmax_attention` (same arguments and results).

    Float32, a chunk of query blocks at a time (memory ``O(chunk x S)`` rather than ``O(S^2)`` per head).
    """
    name = "blockmax_attention_reference"
    _check_stat(stat, name)
    b, hq, hkv, s, d = check_attention_inputs(q, k, v, block_size=block_size, key_padding=key_padding, name=name)
    g = hq // hkv
    nb = math.ceil(s / block_size)
    scale = d**-0.5 if scale is None else float(scale)
    out = torch.empty(b, hq, s, d, dtype=q.dtype, device=q.device)
    bmax = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    qg = q.reshape(b, hkv, g, s, d)
    rows = _chunk_rows(b, hq, s, block_size)
    pos = torch.arange(s, device=q.device)
    for start in range(0, s, rows):
        end = min(s, start + rows)
        sc = torch.matmul(qg[:, :, :, start:end].float(), k[:, :, None, :end].float().transpose(-1, -2)) * scale
        allowed = pos[start:end, None] >= pos[None, :end]
        if key_padding is not None:
            allowed = allowed & key_padding[:, None, None, None, :end].to(q.device)
        p = torch.softmax(sc.masked_fill_(~allowed, float("-inf")), dim=-1).nan_to_num_(0.0)
        del sc
        out[:, :, start:end] = torch.matmul(p, v[:, :, None, :end].float()).reshape(b, hq, end - start, d).to(q.dtype)
        qb0, qb1, kb1 = start // block_size, math.ceil(end / block_size), math.ceil(end / block_size)
        extra_k, extra_q = kb1 * block_size - end, (qb1 - qb0) * block_size - (end - start)
        pp = torch.nn.functional.pad(p, (0, extra_k, 0, extra_q)) if extra_k or extra_q else p
        pp = pp.reshape(b, hkv, g, qb1 - qb0, block_size, kb1, block_size)
        pp = pp.sum(dim=(-3, -1)) if stat == "mass" else pp.amax(dim=(-3, -1))
        bmax[:, :, qb0:qb1, :kb1] = pp.reshape(b, hq, qb1 - qb0, kb1)
    return out, bmax
