"""llama.cpp's K-quant types Q4_K and Q6_K: super-blocks of 256 weights whose sub-block scales are themselves
quantized against one fp16 scale per super-block. One layout each (ggml-common.h), the grid each puts weights on,
and a scale search weighted by each weight's importance (the same weighting as lowbit/formats/ggml.py).

Per super-block of 256 weights along a row:

    q4_k  d f16, dmin f16, 12 bytes of 6-bit scales sc[8] and mins mn[8], 128 bytes of nibbles    (144 bytes)
          sub-block j of 32: w = d * sc[j] * q - dmin * mn[j]                       q in 0..15
    q6_k  128 bytes of low nibbles, 64 bytes of high 2-bit pairs, int8 sc[16], d f16              (210 bytes)
          sub-block j of 16: w = d * sc[j] * (q - 32)                               q in 0..63

Q4_K's nibbles: byte l of the 32-byte chunk c holds weight 64c + l (low) and 64c + 32 + l (high). Its scales:
bytes 0-3 hold sc[0..3] in their low 6 bits and the top 2 bits of sc[4..7]; bytes 4-7 the same for the mins;
bytes 8-11 the low 4 bits of sc[4..7] (low nibble) and of mn[4..7] (high nibble). Q6_K, per half of 128 weights:
weight 32u + l (u in 0..3) has its low 4 bits in ql byte 64h + 32(u % 2) + l (low nibble for u < 2, high after)
and its top 2 bits at bits 2u..2u+1 of qh byte 32h + l.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.ggml import affine_fit, f16_bytes, f16_from_bytes, importance, scale_fit

SUPER = 256


@dataclass(frozen=True)
class KType:
    """One K-quant type: its sub-block size, code range, and bytes per super-block of 256."""

    name: str
    sub: int  # weights per sub-block (one scale, and one min for q4_k)
    qmax: int
    offset: int  # w = (q - offset) * scale for q6_k; q4_k has a min instead
    has_min: bool
    bytes: int

    @property
    def block(self) -> int:
        """Weights per stored block: rows must be a multiple of it."""
        return SUPER

    @property
    def bits_per_weight(self) -> float:
        return self.bytes * 8 / SUPER


TYPES = {t.name: t for t in (KType("q4_k", 32, 15, 0, True, 144), KType("q6_k", 16, 63, 32, False, 210))}


@dataclass
class KBlocks:
    """A weight [rows, cols] on a K type's grid: codes, and per super-block d (and dmin) with the integer sub-block
    scales sc (and mins mn)."""

    type: KType
    codes: torch.Tensor  # uint8 [rows, cols]
    d: torch.Tensor  # float32 (fp16 values) [rows, cols // 256]
    sc: torch.Tensor  # int64 [rows, cols // sub]: 0..63 for q4_k, -128..127 for q6_k
    dmin: torch.Tensor | None = None  # q4_k
    mn: torch.Tensor | None = None  # q4_k, 0..63

    def per_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, min) of every weight: w = q * scale + min (q4_k) or (q - 32) * scale (q6_k)."""
        per_sub = self.type.sub
        n = SUPER // per_sub
        scale = (self.d.repeat_interleave(n, 1) * self.sc.float()).repeat_interleave(per_sub, 1)
        if not self.type.has_min:
            return scale, None
        return scale, -(self.dmin.repeat_interleave(n, 1) * self.mn.float()).repeat_interleave(per_sub, 1)

    def dequantize(self) -> torch.Tensor:
        return grid_value(self.type, self.codes.float(), *self.per_weight())


def grid_value(t: KType, q: torch.Tensor, scale: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """The weights codes ``q`` (float) stand for, with scale (and min) given per weight."""
    return q * scale + m if t.has_min else (q - t.offset) * scale


def nearest(t: KType, w: torch.Tensor, scale: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Float codes of the grid points nearest to ``w``; a zero scale gives the code of 0 (of the min for q4_k)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    x = (w - m) / safe if t.has_min else w / safe + t.offset
    q = torch.round(x).clamp(0, t.qmax)
    return torch.where(scale == 0, torch.full_like(q, 0.0 if t.has_min else t.offset), q)


def _check_shape(w: torch.Tensor) -> tuple[int, int]:
    if w.dim() != 2 or w.shape[1] % SUPER:
        raise ValueError(f"K-quant types take [rows, cols] weights with cols a multiple of {SUPER}, got "
                         f"{tuple(w.shape)}")
    return w.shape[0], w.shape[1]


def _sub_scales(t: KType, x: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per sub-block (rows of ``x``), the float scale (and the subtracted min, >= 0) of least weighted error over a
    range of candidates, each refit by weighted least squares."""
    best_err = torch.full((x.shape[0],), float("inf"))
    best_s, best_m = torch.zeros(x.shape[0]), torch.zeros(x.shape[0])
    if t.has_min:  # w = q s - m with m >= 0: the block's minimum, or 0 if all weights are positive
        lo, hi = x.amin(1).clamp(max=0), x.amax(1)
        starts = [((hi - lo) / (t.qmax + k / 10), -lo) for k in range(-10, 11)]
    else:  # the weight of largest magnitude, with its sign, at -(offset + k/10) steps
        big = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]
        starts = [(big / -(t.offset + k / 10), None) for k in range(-9, 10)]
    for s0, m0 in starts:
        q = nearest(t, x, s0[:, None], None if m0 is None else -m0[:, None])
        if t.has_min:  # weighted least squares of w ~ q s - m, with m clamped at 0 where the fit wants it negative
            s, plus_m, ok = affine_fit(x, wt, q)
            s, m = torch.where(ok, s, s0), torch.where(ok, -plus_m, m0)
            alone, has = scale_fit(x, wt, q)  # m = 0: s alone
            s, m = torch.where(m < 0, torch.where(has, alone, s0), s), m.clamp(min=0)
            err = (wt * (x - (q * s[:, None] - m[:, None])).square()).sum(1)
        else:
            v = q - t.offset
            s, has = scale_fit(x, wt, v)
            s, m = torch.where(has, s, s0), None
            err = (wt * (x - v * s[:, None]).square()).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if m is not None:
            best_m = torch.where(better, m, best_m)
    return best_s, best_m if t.has_min else None


def _super_scale(s: torch.Tensor, levels: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 d per super-block, integer scales) with d * sc ~ s; ``s`` [rows, super-blocks, subs]."""
    if signed:  # q6_k: the scale of largest magnitude maps to -128, as ggml stores it
        big = s.gather(-1, s.abs().argmax(-1, keepdim=True))
        d = (big / -128).to(torch.float16).float()
        sc = torch.round(s / torch.where(d == 0, torch.ones_like(d), d)).clamp(-128, 127)
    else:
        d = (s.amax(-1, keepdim=True) / levels).to(torch.float16).float()
        sc = torch.round(s / torch.where(d == 0, torch.ones_like(d), d)).clamp(0, levels)
    return d[..., 0], torch.where(d == 0, torch.zeros_like(sc), sc).long()


def search(t: KType, w: torch.Tensor, input_power: torch.Tensor | None = None) -> KBlocks:
    """Sub-block scales (and mins) of least weighted error, quantized to the type's integer scales against an fp16
    scale per super-block; then every weight to its nearest grid point under those stored values.

    ``input_power`` [cols]: mean square of each input (an importance matrix); None weighs by w^2 alone."""
    rows, cols = _check_shape(w)
    x = w.float().reshape(-1, t.sub)
    wt = importance(w.float(), input_power).reshape(-1, t.sub)
    s, m = _sub_scales(t, x, wt)
    shape = (rows, cols // SUPER, SUPER // t.sub)
    d, sc = _super_scale(s.reshape(shape), 63 if t.has_min else 127, signed=not t.has_min)
    dmin = mn = None
    if t.has_min:
        dmin, mn = _super_scale(m.reshape(shape), 63, signed=False)
        mn = mn.reshape(rows, -1)
    b = KBlocks(t, torch.zeros(rows, cols, dtype=torch.uint8), d, sc.reshape(rows, -1), dmin, mn)
    b.codes = nearest(t, w.float(), *b.per_weight()).to(torch.uint8)
    return b


# --- bytes -------------------------------------------------------------------------------------------------------

def pack(b: KBlocks) -> torch.Tensor:
    """The super-blocks as the type stores them: uint8 [rows, super-blocks * bytes]."""
    t = b.type
    rows, cols = b.codes.shape
    ns = cols // SUPER
    q = b.codes.reshape(rows, ns, SUPER)
    if t.has_min:
        sc, mn = b.sc.reshape(rows, ns, 8), b.mn.reshape(rows, ns, 8)
        scales = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                            (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], -1).to(torch.uint8)
        chunks = q.reshape(rows, ns, 4, 2, 32)  # chunk c: weights 64c..64c+31 (low nibbles), 64c+32.. (high)
        nib = (chunks[..., 0, :] | (chunks[..., 1, :] << 4)).reshape(rows, ns, 128)
        out = torch.cat([f16_bytes(b.d), f16_bytes(b.dmin), scales, nib], -1)
    else:
        halves = q.reshape(rows, ns, 2, 4, 32)  # half h, quarter u, l
        low, high = halves & 0x0F, halves >> 4
        ql = torch.cat([low[:, :, :, 0] | (low[:, :, :, 2] << 4), low[:, :, :, 1] | (low[:, :, :, 3] << 4)], -1)
        qh = high[:, :, :, 0] | (high[:, :, :, 1] << 2) | (high[:, :, :, 2] << 4) | (high[:, :, :, 3] << 6)
        sc = b.sc.reshape(rows, ns, 16).to(torch.int8).view(torch.uint8)
        out = torch.cat([ql.reshape(rows, ns, 128), qh.reshape(rows, ns, 64), sc, f16_bytes(b.d)], -1)
    return out.reshape(rows, ns * t.bytes)


def unpack(t: KType, data: torch.Tensor, cols: int) -> KBlocks:
    """KBlocks from the bytes ``pack`` writes (or a GGUF tensor's data), uint8 [rows, cols // 256 * bytes]."""
    rows, ns = data.shape[0], cols // SUPER
    if cols % SUPER or data.shape != (rows, ns * t.bytes):
        raise ValueError(f"{t.name}: {cols} columns take {ns * t.bytes} bytes a row, got {tuple(data.shape)}")
    b = data.reshape(rows, ns, t.bytes)
    if t.has_min:
        d, dmin = f16_from_bytes(b[..., 0:2]), f16_from_bytes(b[..., 2:4])
        s = b[..., 4:16].long()
        sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], -1)
        mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
        nib = b[..., 16:].reshape(rows, ns, 4, 32)
        q = torch.stack([nib & 0x0F, nib >> 4], 3).reshape(rows, cols)
        return KBlocks(t, q.contiguous(), d, sc.reshape(rows, -1), dmin, mn.reshape(rows, -1))
    ql = b[..., :128].reshape(rows, ns, 2, 2, 32)  # half, which 32 bytes, l
    qh = b[..., 128:192].reshape(rows, ns, 2, 32)
    low = torch.stack([ql[:, :, :, 0] & 0x0F, ql[:, :, :, 1] & 0x0F, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4], 3)
    high = torch.stack([(qh >> (2 * u)) & 3 for u in range(4)], 3)
    q = (low | (high << 4)).reshape(rows, cols)
    sc = b[..., 192:208].contiguous().view(torch.int8).long()
    d = f16_from_bytes(b[..., 208:210])
    return KBlocks(t, q.contiguous(), d, sc.reshape(rows, -1))


__all__ = ["KBlocks", "KType", "SUPER", "TYPES", "grid_value", "nearest", "pack", "search", "unpack"]
