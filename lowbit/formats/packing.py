"""Bit packing: k-bit codes (as uint8 tensors) to dense bytes and back.

Layouts (the first code goes to the most significant bits, as bitsandbytes does for 4-bit):
  4-bit: two codes a byte, ``byte = c0 << 4 | c1``.
  2-bit: four codes a byte, ``c0 << 6 | c1 << 4 | c2 << 2 | c3``.
  3-bit: eight codes in three bytes, as one big-endian 24-bit word ``c0 << 21 | ... | c7``.
  ternary, 2 bits: trit t in {-1, 0, 1} stored as the 2-bit code t + 1.
  ternary, 1.6 bits: five trits a byte in base 3, ``byte = sum((t_i + 1) * 3**i)`` (0..242).
A tail that does not fill the last byte is padded with code 0; unpacking takes the count back.
"""
from __future__ import annotations

from functools import lru_cache

import torch


def _codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"{bits}-bit codes must lie in [0, {2**bits - 1}]")
    return flat.to(torch.uint8)


def _pad(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    rem = flat.numel() % multiple
    return torch.nn.functional.pad(flat, (0, multiple - rem)) if rem else flat


def _check_count(packed: torch.Tensor, n: int, group_codes: int, group_bytes: int = 1) -> torch.Tensor:
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed data must be uint8, got {packed.dtype}")
    need = -(-n // group_codes) * group_bytes
    flat = packed.reshape(-1)
    if n < 0 or flat.numel() != need:
        raise ValueError(f"{flat.numel()} packed bytes cannot hold exactly {n} codes (need {need})")
    return flat


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two a byte, the first in the high nibble."""
    q = _pad(_codes(codes, 4), 2).view(-1, 2)
    return (q[:, 0] << 4) | q[:, 1]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack ``n`` 4-bit codes (uint8) from ``pack_4bit`` output."""
    flat = _check_count(packed, n, 2)
    return torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[:n]


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes four a byte, the first in the two high bits."""
    q = _pad(_codes(codes, 2), 4).view(-1, 4)
    return (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]


def unpack_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack ``n`` 2-bit codes (uint8) from ``pack_2bit`` output."""
    flat = _check_count(packed, n, 4)
    shifts = torch.tensor([6, 4, 2, 0], dtype=torch.uint8)
    return ((flat.unsqueeze(1) >> shifts) & 0x3).reshape(-1)[:n]


def pack_3bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 3-bit codes eight to three bytes (one big-endian 24-bit word)."""
    q = _pad(_codes(codes, 3), 8).view(-1, 8).to(torch.int32)
    shifts = torch.arange(21, -1, -3, dtype=torch.int32)
    word = (q << shifts).sum(dim=1, dtype=torch.int32)
    return torch.stack(((word >> 16) & 0xFF, (word >> 8) & 0xFF, word & 0xFF), dim=1).reshape(-1).to(torch.uint8)


def unpack_3bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack ``n`` 3-bit codes (uint8) from ``pack_3bit`` output."""
    flat = _check_count(packed, n, 8, 3).view(-1, 3).to(torch.int32)
    word = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    shifts = torch.arange(21, -1, -3, dtype=torch.int32)
    return ((word.unsqueeze(1) >> shifts) & 0x7).reshape(-1)[:n].to(torch.uint8)


def _trits(values: torch.Tensor) -> torch.Tensor:
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"ternary values must be an integer tensor, got {values.dtype}")
    flat = values.reshape(-1)
    if flat.numel() and (int(flat.min()) < -1 or int(flat.max()) > 1):
        raise ValueError("ternary values must lie in {-1, 0, 1}")
    return (flat + 1).to(torch.uint8)


def pack_ternary_2bit(values: torch.Tensor) -> torch.Tensor:
    """Pack ternary values {-1, 0, 1} at 2 bits each (codes 0, 1, 2)."""
    return pack_2bit(_trits(values))


def ternary_2bit_valid(packed: torch.Tensor) -> bool:
    """Whether every 2-bit field of ``pack_ternary_2bit`` output is a trit code (0, 1 or 2; never 3)."""
    # A field is 3 when both its bits are set: the low bit of each field, ANDed with the high bit shifted onto it.
    # Eight bytes at a time where they fit: the bit shifted in from the next byte (or the sign) lands on a high bit,
    # which the mask drops.
    words = packed.view(torch.int64) if packed.numel() % 8 == 0 and packed.is_contiguous() else packed
    mask = 0x5555555555555555 if words.dtype == torch.int64 else 0x55
    return not bool((words & (words >> 1) & mask).any())


def unpack_ternary_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack ``n`` ternary values (int8) from ``pack_ternary_2bit`` output."""
    codes = unpack_2bit(packed, n)
    if codes.numel() and int(codes.max()) > 2:
        raise ValueError("2-bit ternary data holds code 3, which is not a trit")
    return codes.to(torch.int8) - 1


_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


def pack_ternary_base3(values: torch.Tensor) -> torch.Tensor:
    """Pack ternary values five a byte in base 3 (1.6 bits each)."""
    t = _pad(_trits(values), 5).view(-1, 5).to(torch.int32)
    # Padding code 0 is the trit -1; the count given to unpack drops it.
    return (t * _POW3).sum(dim=1, dtype=torch.int32).to(torch.uint8)


@lru_cache(maxsize=None)
def _base3_table() -> torch.Tensor:
    b = torch.arange(256, dtype=torch.int32).unsqueeze(1)
    return ((b // _POW3) % 3).to(torch.int8) - 1


def unpack_ternary_base3(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack ``n`` ternary values (int8) from ``pack_ternary_base3`` output."""
    flat = _check_count(packed, n, 5)
    if flat.numel() and int(flat.max()) > 242:
        raise ValueError("base-3 ternary bytes must be at most 242")
    return _base3_table()[flat.long()].reshape(-1)[:n]
