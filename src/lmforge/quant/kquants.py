"""llama.cpp's K-quants (Q4_K, Q5_K, Q6_K) in numpy: the block layouts ggml reads, quantized by a weighted search.

The `gguf` package dequantizes these types but cannot quantize them, so GGUF export quantizes here. A K-quant block
covers 256 values of a row:

- ``Q4_K`` / ``Q5_K`` (144 / 176 bytes): eight sub-blocks of 32 values, each with a 6-bit scale and a 6-bit min
  (packed into 12 bytes), themselves scaled by the block's fp16 ``d`` and ``dmin``: ``x = d * sc * q - dmin * m``
  with 4-bit (Q4_K) or 5-bit (Q5_K: the fifth bit in ``qh``) codes ``q``.
- ``Q6_K`` (210 bytes): sixteen sub-blocks of 16 values, each with an int8 scale times the block's fp16 ``d``:
  ``x = d * sc * (q - 32)`` with 6-bit codes (low 4 bits in ``ql``, high 2 in ``qh``).

Each sub-block's (scale, min) or scale is picked by trying a small range of candidate scales around the max/min fit
and keeping the one with the least importance-weighted squared error (weights grow with |x|, as llama.cpp's
reference quantizer does), then the sub-block constants are quantized and the codes recomputed from them. The
result is a valid block of the type (round-tripped through ``gguf.quants.dequantize`` by the tests), close to but
not bit-identical with llama.cpp's own quantizer.
"""
from __future__ import annotations

import numpy as np

__all__ = ["quantize_q4_k", "quantize_q5_k", "quantize_q6_k", "QK_K"]

QK_K = 256  # values per super-block


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (last axis) the (scale >= 0, min <= 0) of x ~ scale * q + min, q in 0..nmax, that minimizes the
    weighted squared error over candidate scales (nmax + rmin + rdelta * i) / (max - min), i = 0..nstep."""
    lo = np.minimum(x.min(-1), 0.0)  # (...,)
    hi = x.max(-1)
    span = hi - lo
    safe = np.where(span > 0, span, 1.0)
    scale = np.where(span > 0, span / nmax, 0.0)
    best_min = lo.copy()
    q = np.clip(np.rint((x - lo[..., None]) / np.where(scale > 0, scale, 1.0)[..., None]), 0, nmax)
    best_err = (w * (scale[..., None] * q + lo[..., None] - x) ** 2).sum(-1)
    sw, swx = w.sum(-1), (w * x).sum(-1)
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / safe
        q = np.clip(np.rint(iscale[..., None] * (x - lo[..., None])), 0, nmax)
        swl, swl2, swlx = (w * q).sum(-1), (w * q * q).sum(-1), (w * q * x).sum(-1)
        det = sw * swl2 - swl * swl
        ok = det > 0
        det = np.where(ok, det, 1.0)
        s = (sw * swlx - swl * swx) / det  # weighted least squares of x ~ s * q + m
        m = (swl2 * swx - swl * swlx) / det
        pos = m > 0  # a positive min is not representable: refit the scale alone with m = 0
        s = np.where(pos, swlx / np.where(swl2 > 0, swl2, 1.0), s)
        m = np.where(pos, 0.0, m)
        err = (w * (s[..., None] * q + m[..., None] - x) ** 2).sum(-1)
        better = ok & (err < best_err) & (span > 0)
        best_err = np.where(better, err, best_err)
        scale = np.where(better, s, scale)
        best_min = np.where(better, m, best_min)
    return scale, best_min


def _importance(x: np.ndarray) -> np.ndarray:
    """llama.cpp's default importance of each value: rms of its super-block plus its magnitude."""
    rms = np.sqrt((x * x).mean(axis=(-2, -1), keepdims=True))
    return rms + np.abs(x)


def _quantize_qk_min(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared Q4_K/Q5_K step: codes (nb, 8, 32) in 0..nmax, 6-bit scales/mins (nb, 8), fp16 d/dmin (nb,)."""
    xs = x.reshape(-1, 8, 32)
    scale, mn = _fit_scale_min(xs, _importance(xs), nmax, rmin, 0.1, nstep)
    m = -mn  # stored positive: x = d * sc * q - dmin * m
    max_scale, max_min = scale.max(-1), m.max(-1)
    inv_s = np.where(max_scale > 0, 63 / np.where(max_scale > 0, max_scale, 1), 0.0)
    inv_m = np.where(max_min > 0, 63 / np.where(max_min > 0, max_min, 1), 0.0)
    ls = np.clip(np.rint(inv_s[:, None] * scale), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_m[:, None] * m), 0, 63).astype(np.uint8)
    d = _f16(np.where(max_scale > 0, max_scale / 63, 0.0))
    dmin = _f16(np.where(max_min > 0, max_min / 63, 0.0))
    dl = d.astype(np.float32)[:, None] * ls  # (nb, 8): the scales as the reader rebuilds them
    dm = dmin.astype(np.float32)[:, None] * lm
    safe = np.where(dl > 0, dl, 1.0)
    q = np.where(dl[..., None] > 0, np.clip(np.rint((xs + dm[..., None]) / safe[..., None]), 0, nmax), 0)
    return q.astype(np.uint8), ls, lm, d, dmin


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> the 12 bytes ggml's get_scale_min_k4 unpacks, (nb, 12)."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(nb, 8, 32) codes -> (nb, 128) bytes: sub-blocks 2j in the low nibbles, 2j+1 in the high ones."""
    q = q.reshape(-1, 4, 2, 32) & 0xF
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _blocks(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} values, got {x.shape[-1]}")
    return x.reshape(-1, QK_K), x.shape


def _rows(blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(n_blocks, bytes per block) -> (*shape[:-1], bytes per row), the layout gguf's writer takes."""
    return blocks.reshape(*shape[:-1], shape[-1] // QK_K * blocks.shape[-1])


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float rows (..., n * 256) -> Q4_K bytes (..., n * 144)."""
    xb, shape = _blocks(x)
    q, ls, lm, d, dmin = _quantize_qk_min(xb, 15, -1.0, 20)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), _pack_scales(ls, lm),
                          _nibbles(q)], axis=1)
    return _rows(out, shape)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """float rows (..., n * 256) -> Q5_K bytes (..., n * 176)."""
    xb, shape = _blocks(x)
    q, ls, lm, d, dmin = _quantize_qk_min(xb, 31, -0.5, 15)
    high = (q >> 4) & 1  # (nb, 8, 32): bit j of qh[l] is the fifth bit of sub-block j's value l
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)  # (nb, 32)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), _pack_scales(ls, lm),
                          qh, _nibbles(q)], axis=1)
    return _rows(out, shape)


def _fit_symmetric(x: np.ndarray, nmax: int) -> np.ndarray:
    """Per sub-block (last axis) the signed scale s of x ~ s * q, q in -nmax..nmax-1, best of 19 candidates around
    -nmax / (the value of largest magnitude), weighted by x^2."""
    idx = np.abs(x).argmax(-1)
    vmax = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    nz = vmax != 0
    safe = np.where(nz, vmax, 1.0)
    w = x * x
    best_s = np.zeros_like(vmax)
    best_score = np.full_like(vmax, -1.0)
    for i in range(-9, 10):
        iscale = -(nmax + 0.1 * i) / safe
        q = np.clip(np.rint(iscale[..., None] * x), -nmax, nmax - 1)
        swlx, swl2 = (w * x * q).sum(-1), (w * q * q).sum(-1)
        ok = swl2 > 0
        s = swlx / np.where(ok, swl2, 1.0)
        score = np.where(ok, swlx * s, -1.0)  # = (sum w x q)^2 / sum w q^2: larger is a better fit
        better = nz & ok & (score > best_score)
        best_score = np.where(better, score, best_score)
        best_s = np.where(better, s, best_s)
    return best_s


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float rows (..., n * 256) -> Q6_K bytes (..., n * 210)."""
    xb, shape = _blocks(x)
    xs = xb.reshape(-1, 16, 16)
    s = _fit_symmetric(xs, 32)  # (nb, 16)
    idx = np.abs(s).argmax(-1)
    smax = np.take_along_axis(s, idx[:, None], -1)[:, 0]
    nz = smax != 0
    iscale = np.where(nz, -128 / np.where(nz, smax, 1.0), 0.0)
    sc = np.clip(np.rint(iscale[:, None] * s), -128, 127).astype(np.int8)
    d = _f16(np.where(nz, 1 / np.where(nz, iscale, 1.0), 0.0))
    dl = d.astype(np.float32)[:, None] * sc  # (nb, 16)
    safe = np.where(dl != 0, dl, 1.0)
    q = np.where(dl[..., None] != 0, np.clip(np.rint(xs / safe[..., None]), -32, 31), 0).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # (nb, half, quarter, 32): value = 128 * half + 32 * quarter + l
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)
    return _rows(out, shape)
