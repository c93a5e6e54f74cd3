import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import packing as P

WIDTHS = [(P.pack_4bit, P.unpack_4bit, 4), (P.pack_3bit, P.unpack_3bit, 3), (P.pack_2bit, P.unpack_2bit, 2)]


@pytest.mark.parametrize("pack,unpack,bits", WIDTHS)
@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_roundtrip_every_width(pack, unpack, bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=0, max_size=70))
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack(codes)
    assert packed.dtype == torch.uint8
    per_group = {4: (2, 1), 3: (8, 3), 2: (4, 1)}[bits]  # codes, bytes
    assert packed.numel() == -(-len(values) // per_group[0]) * per_group[1]
    assert unpack(packed, len(values)).tolist() == values


@given(st.lists(st.integers(-1, 1), min_size=0, max_size=70))
@settings(max_examples=60, deadline=None)
def test_ternary_roundtrip_2bit_and_base3(values):
    t = torch.tensor(values, dtype=torch.int8)
    assert P.unpack_ternary_2bit(P.pack_ternary_2bit(t), len(values)).tolist() == values
    packed = P.pack_ternary_base3(t)
    assert packed.numel() == -(-len(values) // 5)  # 1.6 bits a trit
    assert P.unpack_ternary_base3(packed, len(values)).tolist() == values


def test_layouts_are_the_documented_ones():
    assert P.pack_4bit(torch.tensor([1, 2, 15], dtype=torch.uint8)).tolist() == [0x12, 0xF0]
    assert P.pack_2bit(torch.tensor([3, 0, 1, 2], dtype=torch.uint8)).tolist() == [0b11000110]
    assert P.pack_3bit(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)).tolist() == [0b00101001, 0b11001011, 0b10111000]
    assert P.pack_ternary_base3(torch.tensor([1, 0, -1, 1, 1], dtype=torch.int8)).tolist() == [2 + 1 * 3 + 0 * 9 + 2 * 27 + 2 * 81]


def test_four_bit_nibble_order_matches_bitsandbytes():
    import bitsandbytes.functional as bnbf

    # One block whose values hit codes 15 and 0 in turn: bitsandbytes' first value is the high nibble.
    x = torch.tensor([1.0, -1.0] * 32)
    packed, _ = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert P.unpack_4bit(packed.flatten(), 64).tolist() == [15, 0] * 32


def test_bad_codes_are_rejected():
    with pytest.raises(ValueError, match="4-bit codes"):
        P.pack_4bit(torch.tensor([16]))
    with pytest.raises(TypeError):
        P.pack_2bit(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="ternary"):
        P.pack_ternary_2bit(torch.tensor([2]))
    with pytest.raises(ValueError, match="cannot hold"):
        P.unpack_4bit(torch.zeros(3, dtype=torch.uint8), 7)
    with pytest.raises(TypeError):
        P.unpack_2bit(torch.zeros(3, dtype=torch.int32), 12)
    with pytest.raises(ValueError, match="242"):
        P.unpack_ternary_base3(torch.tensor([250], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="code 3"):
        P.unpack_ternary_2bit(torch.tensor([0xFF], dtype=torch.uint8), 4)
