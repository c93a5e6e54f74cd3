"""The checkpoint readers under fuzzing (issue 14 item 3): a few hundred mutated checkpoints per reader in the
suite; benchmarks/fuzz_checkpoint.py runs 10,000 and more. Each must load or raise CheckpointError within 2 s."""
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import checkpoint_fuzz as fz

# No shrinking: a failing case is reported as drawn (shrinking one took over five minutes).
SETTINGS = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return fz.make_checkpoints(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def outcomes():
    return Counter()


def test_fuzzed_lowbit_checkpoints_load_or_raise_checkpoint_error(good, tmp_path, outcomes):
    @SETTINGS
    @given(st.data())
    def case(data):
        fz.check_case(fz.read_lowbit(fz.mutated_lowbit(data.draw, good[0], tmp_path / "case")), outcomes)

    case()
    assert outcomes["CheckpointError"] > 100  # the mutations do reach the checks


@pytest.mark.parametrize("reader", ["lowbit", "hf"])
def test_fuzzed_values_load_and_compute_as_the_reference_or_raise_checkpoint_error(good, tmp_path, reader):
    """Issue 32: out-of-range codes, NaN/inf constants, outlier indices past the row, with checksums that match,
    through lowbit.load and transformers' from_pretrained alike."""
    counts = Counter()
    read = fz.read_lowbit if reader == "lowbit" else fz.read_hf

    @SETTINGS
    @given(st.data())
    def case(data):
        fz.check_case(read(fz.mutated_values(data.draw, good[2], tmp_path / "case")), counts, forward=True)

    case()
    assert counts["CheckpointError"] > 30 and counts["loaded"] > 30  # both outcomes are reached


def test_fuzzed_bitsandbytes_checkpoints_load_or_raise_checkpoint_error(good, tmp_path):
    counts = Counter()

    @SETTINGS
    @given(st.data())
    def case(data):
        fz.check_case(fz.read_bnb(fz.mutated_bnb(data.draw, good[1], tmp_path / "case")), counts)

    case()
    assert counts["CheckpointError"] > 100


def test_a_bitsandbytes_quant_state_claiming_a_huge_shape(good, tmp_path):
    # Found by the fuzzer: the JSON shape was used to build the layer before it was checked against the data.
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    import lowbit

    shutil.copytree(good[1], tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if fz.STATE_PREFIX in k)
    meta = json.loads(bytes(tensors[key].tolist()).decode())
    meta["shape"] = [2**62, 2**62]
    tensors[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(tensors, path)
    with pytest.raises(lowbit.CheckpointError, match="expected torch.uint8 with"):
        fz.read_bnb(tmp_path / "ck")()
