"""llama.cpp's 32-weight block types: one layout each, the grid each puts weights on, and two ways to choose a
block's scale (ggml's reference rounding, bit for bit with the ``gguf`` package's ``quantize``; and a search that
weighs each weight by how much its input matters, as llama.cpp does with an importance matrix).

Per block of 32 weights along a row (ggml-common.h; github.com/ggml-org/ggml docs/gguf.md):

    q4_0    d f16, 16 bytes of nibbles          w = (q - 8) * d            q in 0..15
    q4_1    d f16, m f16, 16 bytes of nibbles   w = q * d + m              q in 0..15
    q5_0    d f16, 4 bytes of fifth bits, 16    w = (q - 16) * d           q in 0..31
    q5_1    d f16, m f16, 4 bytes, 16           w = q * d + m              q in 0..31
    q8_0    d f16, 32 int8                      w = (q - 128) * d          q in 1..255 (int8 -127..127, + 128)
    iq4_nl  d f16, 16 bytes of nibbles          w = IQ4_NL_VALUES[q] * d   q in 0..15

A nibble byte j holds weight j (low) and weight j + 16 (high); bit j of the fifth-bit word is weight j's bit 4.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
# ggml's kvalues_iq4nl: a non-uniform 4-bit grid, denser near zero, as weights are.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class BlockType:
    """One block type: its code range, how a code becomes a weight, and its bytes per block of 32."""

    name: str
    qmin: int
    qmax: int
    offset: int  # symmetric types: w = (q - offset) * d
    has_min: bool  # w = q * d + m
    levels: tuple[int, ...] | None  # non-uniform: w = levels[q] * d
    bytes: int

    @property
    def block(self) -> int:
        """Weights per stored block: rows must be a multiple of it."""
        return BLOCK

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, the block's scale (and min) included."""
        return self.bytes * 8 / BLOCK

    @property
    def fifth_bit(self) -> bool:
        """Whether codes have 5 bits (Q5_0, Q5_1): the fifth of each in a 32-bit word after the scale."""
        return self.qmax == 31


TYPES = {t.name: t for t in (
    BlockType("q4_0", 0, 15, 8, False, None, 18),
    BlockType("q4_1", 0, 15, 0, True, None, 20),
    BlockType("q5_0", 0, 31, 16, False, None, 22),
    BlockType("q5_1", 0, 31, 0, True, None, 24),
    BlockType("q8_0", 1, 255, 128, False, None, 34),
    BlockType("iq4_nl", 0, 15, 0, False, IQ4_NL_VALUES, 18),
)}


def block_type(name: str) -> BlockType:
    """The block type called ``name`` (q4_0, ..., iq4_nl); ValueError naming the choices otherwise."""
    t = TYPES.get(name)
    if t is None:
        raise ValueError(f"unknown block type {name!r}; choose from {', '.join(TYPES)}")
    return t


@dataclass
class Blocks:
    """A weight [rows, cols] on a block type's grid: codes, and d (and m) per block of 32, fp16 values in float32."""

    type: BlockType
    codes: torch.Tensor  # uint8 [rows, cols]
    d: torch.Tensor  # float32 [rows, cols // 32]
    m: torch.Tensor | None  # float32 [rows, cols // 32], types with a min

    def per_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d, m) of every weight, [rows, cols] each (m None for types without a min)."""
        return _per_weight(self.d), _per_weight(self.m)

    def dequantize(self) -> torch.Tensor:
        """The float32 [rows, cols] weight the blocks stand for."""
        return grid_value(self.type, self.codes.float(), *self.per_weight())


def _per_weight(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.repeat_interleave(BLOCK, dim=-1)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


_LEVELS = {name: torch.tensor(t.levels, dtype=torch.float32) for name, t in TYPES.items() if t.levels}
_MIDPOINTS = {name: (v[1:] + v[:-1]) / 2 for name, v in _LEVELS.items()}


def grid_value(t: BlockType, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """The weights codes ``q`` (float) stand for, with d (and m) given per weight."""
    if t.levels is not None:
        return _LEVELS[t.name][q.long()] * d
    return q * d + m if t.has_min else (q - t.offset) * d


def nearest(t: BlockType, w: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Float codes of the grid points nearest to ``w`` (d, m broadcast against it); a zero scale gives the code of 0
    (of m, for types with a min)."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    if t.levels is not None:
        q = torch.bucketize((w / safe).contiguous(), _MIDPOINTS[t.name]).float()
        return torch.where(d == 0, torch.full_like(q, 8.0), q)  # level 1 of 127: nearest to 0
    x = (w - m) / safe if t.has_min else w / safe + t.offset
    q = torch.round(x).clamp(t.qmin, t.qmax)
    return torch.where(d == 0, torch.full_like(q, 0.0 if t.has_min else t.offset), q)


# --- ggml's reference rounding (quantize_row_*_ref), for the types the gguf package also quantizes --------------

def reference(t: BlockType, w: torch.Tensor) -> Blocks:
    """ggml's plain rounding of a float32 [rows, cols] weight: the same bytes as ``gguf.quantize``'s (IQ4_NL, which
    ggml only rounds by a search, goes through ``search`` with weights w^2)."""
    rows, cols = _check_shape(w)
    x = w.float().reshape(rows, cols // BLOCK, BLOCK)
    if t.levels is not None:
        return search(t, w, None)  # ggml's IQ4_NL has no plain rounding: its scale search with weights x^2
    if t.has_min:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / t.qmax
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc((x - lo) * inv + 0.5).clamp(0, t.qmax)
        m = lo
    elif t.name == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        v = x * inv  # C's roundf (halves away from zero), as ggml computes it: no x + 0.5, which rounds up near .5
        a = v.abs()
        q = torch.sign(v) * (torch.floor(a) + torch.floor(2 * (a - torch.floor(a)))) + t.offset
        m = None
    else:  # the value of largest magnitude, with its sign, lands on the grid's end -offset
        big = x.gather(-1, x.abs().argmax(-1, keepdim=True))
        d = big / -t.offset
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(x * inv + (t.offset + 0.5)).clamp(0, t.qmax)
        m = None
    return Blocks(t, q.reshape(rows, cols).to(torch.uint8), _f16(d[..., 0]), None if m is None else _f16(m[..., 0]))


def _check_shape(w: torch.Tensor) -> tuple[int, int]:
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"block types take [rows, cols] weights with cols a multiple of {BLOCK}, got {tuple(w.shape)}")
    return w.shape[0], w.shape[1]


# --- a block's scale chosen for the least weighted error ---------------------------------------------------------

def importance(w: torch.Tensor, input_power: torch.Tensor | None) -> torch.Tensor:
    """Each weight's weight in a block's error: llama.cpp's choice, the mean square of its input times
    sqrt(2 * mean row w^2 + w^2) with an importance matrix, else w^2."""
    if input_power is None:
        return w.square()
    sigma2 = 2 * w.square().mean(1, keepdim=True)
    return input_power.float()[None, :] * torch.sqrt(sigma2 + w.square())


def search(t: BlockType, w: torch.Tensor, input_power: torch.Tensor | None = None) -> Blocks:
    """Each block's d (and m) by a search over scales, each refit by weighted least squares, keeping the one of least
    weighted squared error; then every weight to its nearest grid point under the fp16-rounded d (and m).

    ``input_power`` [cols]: mean square of each input (the Hessian's diagonal, an importance matrix); None weighs by
    w^2 alone."""
    rows, cols = _check_shape(w)
    x = w.float().reshape(-1, BLOCK)
    wt = importance(w.float(), input_power).reshape(-1, BLOCK)
    best_err = torch.full((x.shape[0],), float("inf"))
    best_d = torch.zeros(x.shape[0])
    best_m = torch.zeros(x.shape[0])
    for d0, m0 in _candidates(t, x):
        q = nearest(t, x, d0[:, None], None if m0 is None else m0[:, None])
        d, m = _refit(t, x, wt, q, d0, m0)
        err = (wt * (x - grid_value(t, q, d[:, None], None if m is None else m[:, None])).square()).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d, best_d)
        if m is not None:
            best_m = torch.where(better, m, best_m)
    d = _f16(best_d)
    m = _f16(best_m) if t.has_min else None
    q = nearest(t, x, d[:, None], None if m is None else m[:, None])
    nb = cols // BLOCK
    return Blocks(t, q.reshape(rows, cols).to(torch.uint8), d.reshape(rows, nb), None if m is None else m.reshape(rows, nb))


def _candidates(t: BlockType, x: torch.Tensor):
    """Starting (d, m) per block: the plain range, then ranges stretched and shrunk around it."""
    if t.has_min:
        lo, hi = x.amin(1), x.amax(1)
        for k in range(-10, 11):  # the top code at (qmax + k/10) steps of the range
            yield (hi - lo) / (t.qmax + k / 10), lo
        return
    big = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]
    end = -t.levels[0] if t.levels is not None else t.offset - (t.name == "q8_0")
    for k in range(-9, 10):  # the largest weight at -(end + k/10) steps, either sign
        yield big / -(end + k / 10), None
        if t.levels is not None:
            yield big / (t.levels[-1] + k / 10), None


def _refit(t: BlockType, x: torch.Tensor, wt: torch.Tensor, q: torch.Tensor, d0: torch.Tensor,
           m0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weighted least-squares d (and m) for codes ``q`` (kept at d0, m0 where the fit is degenerate)."""
    if t.has_min:
        d, m, ok = affine_fit(x, wt, q)
        return torch.where(ok, d, d0), torch.where(ok, m, m0)
    v = _LEVELS[t.name][q.long()] if t.levels is not None else q - t.offset
    d, ok = scale_fit(x, wt, v)
    return torch.where(ok, d, d0), None


def affine_fit(x: torch.Tensor, wt: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the weighted least-squares (d, m) of x ~ q d + m (a 2x2 normal system), and where it is not
    degenerate (elsewhere d and m are meaningless)."""
    sw, sq, sqq = wt.sum(1), (wt * q).sum(1), (wt * q * q).sum(1)
    sx, sqx = (wt * x).sum(1), (wt * q * x).sum(1)
    det = sw * sqq - sq * sq
    ok = det.abs() > 1e-20 * (sw * sqq).clamp(min=1e-30)
    det = torch.where(ok, det, torch.ones_like(det))
    return (sw * sqx - sq * sx) / det, (sqq * sx - sq * sqx) / det, ok


def scale_fit(x: torch.Tensor, wt: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the weighted least-squares d of x ~ v d, and where it exists (some v != 0)."""
    num, den = (wt * v * x).sum(1), (wt * v * v).sum(1)
    return num / den.clamp(min=1e-30), den > 0


# --- bytes -------------------------------------------------------------------------------------------------------

def pack(b: Blocks) -> torch.Tensor:
    """The blocks as the type stores them: uint8 [rows, blocks * bytes]."""
    t = b.type
    rows, cols = b.codes.shape
    nb = cols // BLOCK
    q = b.codes.reshape(rows, nb, BLOCK)
    parts = [f16_bytes(b.d)]
    if t.has_min:
        parts.append(f16_bytes(b.m))
    if t.name == "q8_0":
        parts.append(q ^ 0x80)  # q - 128 as an int8 is q ^ 0x80 as a byte
    else:
        if t.fifth_bit:
            bits = ((q >> 4) & 1).to(torch.int64) << torch.arange(BLOCK)
            word = bits.sum(-1)
            parts.append(torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], -1).to(torch.uint8))
        low = q & 0x0F
        parts.append(low[..., :16] | (low[..., 16:] << 4))
    return torch.cat(parts, -1).reshape(rows, nb * t.bytes)


def unpack(t: BlockType, data: torch.Tensor, cols: int) -> Blocks:
    """Blocks from the bytes ``pack`` writes (or a GGUF tensor's data), uint8 [rows, cols // 32 * bytes]."""
    rows = data.shape[0]
    nb = cols // BLOCK
    if cols % BLOCK or data.shape != (rows, nb * t.bytes):
        raise ValueError(f"{t.name}: {cols} columns take {nb * t.bytes} bytes a row, got {tuple(data.shape)}")
    b = data.reshape(rows, nb, t.bytes)
    d = f16_from_bytes(b[..., 0:2])
    at = 2
    m = None
    if t.has_min:
        m = f16_from_bytes(b[..., 2:4])
        at = 4
    if t.name == "q8_0":
        q = b[..., at:] ^ 0x80
    else:
        high = torch.zeros(rows, nb, BLOCK, dtype=torch.uint8)
        if t.fifth_bit:
            word = sum(b[..., at + i].to(torch.int64) << (8 * i) for i in range(4))
            high = (((word[..., None] >> torch.arange(BLOCK)) & 1) << 4).to(torch.uint8)
            at += 4
        nib = b[..., at:at + 16]
        q = torch.cat([nib & 0x0F, nib >> 4], -1) | high
    return Blocks(t, q.reshape(rows, cols).contiguous(), d, m)


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """x as fp16, each value's two little-endian bytes on a last axis: uint8 [*x.shape, 2]."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def f16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """The float32 values of fp16 numbers stored as ``f16_bytes`` writes them (uint8 [..., 2])."""
    return b.contiguous().view(torch.float16)[..., 0].float()


__all__ = ["BLOCK", "BlockType", "Blocks", "IQ4_NL_VALUES", "TYPES", "affine_fit", "block_type", "f16_bytes",
           "f16_from_bytes", "grid_value", "importance", "nearest", "pack", "reference", "scale_fit", "search", "unpack"]
