"""GGUF in and out (issue 15 items 2, 3, 6): the bundled Q4_1 model loads in its own codes, exports back bit for bit,
other types round-trip through files that transformers' independent GGUF reader agrees with, and a damaged or
unsupported file is one clear error."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import lowbit
from lowbit.app.models import default_gguf, load_default_model
from lowbit.interop.gguf import GGUFError, load_gguf, read
from lowbit.interop.gguf_export import export_gguf


@pytest.fixture(scope="module")
def native():
    with pytest.warns(UserWarning, match=r"token_embd.weight \(Q8_0\)"):  # the one tensor that is not a linear layer
        return load_gguf(default_gguf(), progress=False)


@pytest.fixture(scope="module")
def dequantized():  # transformers' own reading of the same file, each tensor dequantized to fp32 by the gguf package
    return load_default_model()[0]


def test_bundled_q4_1_loads_in_its_own_codes(native, dequantized):
    model, tok = native
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lowbit.nn.IntLinear)}
    assert len(layers) == 210 and all(m.bits == 4 and m.group_size == 32 and m.zero_dtype == "float32"
                                      for m in layers.values())
    reference = dict(dequantized.named_modules())
    for name, layer in layers.items():
        w, r = layer.dequantize(), reference[name].weight
        # (q - (-m / d)) * d against q * d + m: the same weight up to float32 rounding
        assert torch.allclose(w, r, rtol=0, atol=2e-6 * r.abs().max().item()), name
        assert layer.weight_packed.numel() == w.numel() // 2  # 4 bits a weight, not a dequantized copy
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (model(ids).logits - dequantized(ids).logits).abs().max() < 1e-3
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])


def test_q4_1_export_of_the_native_model_is_the_file_bit_for_bit(tmp_path, native):
    model, tok = native
    report = export_gguf(model, tok, tmp_path / "out.gguf", "q4_1", progress=False)
    assert report["from_codes"] == 210
    original = {t.name: t for t in read(default_gguf()).tensors}
    written = {t.name: t for t in read(tmp_path / "out.gguf").tensors}
    assert original.keys() == written.keys()
    for name, t in original.items():
        assert t.tensor_type == written[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(written[name].data)), name


def tiny_model(tied=True, hidden=64, intermediate=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer of 320 tokens, trained on the bundled text: small files, fast to read, and the
    path that makes GGUF tokenizer fields from a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.data import default_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([default_text()[:20000]], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


IDS = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("tied", [True, False])
def test_export_then_native_import_agree_with_transformers_reading(tmp_path, tok, qtype, tied):
    from transformers import AutoModelForCausalLM

    model = tiny_model(tied)
    path = tmp_path / f"tiny-{qtype}.gguf"
    export_gguf(model, tok, path, qtype, progress=False)
    ours, their_tok = load_gguf(path, progress=False)
    assert their_tok("def f(x): return x").input_ids == tok("def f(x): return x").input_ids
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    kinds = {type(m).__name__ for m in ours.modules() if isinstance(m, lowbit.nn.QuantLinear)}
    assert kinds == (set() if qtype == "f16" else {"IntLinear"})
    with torch.no_grad():
        a, b, c = ours(IDS).logits, theirs(IDS).logits, model(IDS).logits
    assert (a - b).abs().max() < 1e-4  # our codes and transformers' dequantization of the same file
    if qtype in ("f16", "q8_0"):
        assert (a - c).abs().max() < 0.05 * c.abs().max()  # and the file is close to the model it came from
    # A second export of the native model writes the very same linear blocks.
    again = tmp_path / "again.gguf"
    report = export_gguf(ours, None, again, qtype, progress=False)  # the tokenizer from the file it came from
    assert report["from_codes"] == (0 if qtype == "f16" else 14)
    first = {t.name: np.asarray(t.data) for t in read(path).tensors}
    assert all(np.array_equal(first[t.name], np.asarray(t.data)) for t in read(again).tensors if "blk" in t.name)


@pytest.mark.filterwarnings("ignore:ternary weights made post-training")
def test_tq2_0_takes_ternary_models_and_refuses_others(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    big = dict(hidden=256, intermediate=512)  # TQ2_0 blocks are 256 weights
    with pytest.raises(GGUFError, match="not ternary.*--force-ternary"):
        export_gguf(tiny_model(**big), tok, tmp_path / "no.gguf", "tq2_0", progress=False)
    assert not list(tmp_path.iterdir())  # nothing left behind
    # Rows of 64 weights: TQ2_0's blocks of 256 do not tile them, so they go out in Q8_0, as llama.cpp does.
    r = export_gguf(tiny_model(), tok, tmp_path / "small.gguf", "tq2_0", force_ternary=True, progress=False)
    assert len(r["fallback"]) == 14 and {t.tensor_type.name for t in read(tmp_path / "small.gguf").tensors} >= {"Q8_0"}
    model = lowbit.quantize(tiny_model(**big), lowbit.TernaryConfig(), progress=False)
    export_gguf(model, tok, tmp_path / "t.gguf", "tq2_0", progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="t.gguf", dtype=torch.float32)
    for name, m in model.named_modules():
        if isinstance(m, lowbit.nn.BitLinear):
            w = theirs.get_submodule(name).weight
            assert torch.allclose(w, m.dequantize(), rtol=1e-3, atol=0), name  # scale through fp16
    # Read back natively: BitLinear layers holding the same trits, the scale through fp16.
    back, _ = load_gguf(tmp_path / "t.gguf", progress=False)
    for name, m in model.named_modules():
        if isinstance(m, lowbit.nn.BitLinear):
            b = back.get_submodule(name)
            assert isinstance(b, lowbit.nn.BitLinear) and torch.equal(b.trits(), m.trits()), name
            assert abs(b.weight_gamma.item() / m.weight_gamma.item() - 1) < 1e-3
    export_gguf(tiny_model(**big), tok, tmp_path / "forced.gguf", "tq2_0", force_ternary=True, progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory, tok) -> Path:
    path = tmp_path_factory.mktemp("g") / "small.gguf"
    export_gguf(tiny_model(), tok, path, "q4_0", progress=False)
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_gguf_is_one_error_type(tmp_path_factory, small, data):
    # Truncations, byte flips and 64-bit counts or sizes written over the header: GGUFError or a clean read, never
    # another exception or a huge allocation (the reader maps the file; sizes beyond it are refused).
    blob = bytearray(small.read_bytes())
    kind = data.draw(st.sampled_from(["truncate", "flip", "huge"]))
    if kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, min(len(blob), 4096) - 1))] ^= data.draw(st.integers(1, 255))
    else:
        at = data.draw(st.integers(4, min(len(blob), 2048) - 8))
        blob[at:at + 8] = data.draw(st.sampled_from([2**63 - 1, 2**40, 2**32 + 7, 0xFFFFFFFFFFFFFFFF])).to_bytes(8, "little")
    path = tmp_path_factory.mktemp("bad") / "bad.gguf"
    path.write_bytes(bytes(blob))
    try:
        load_gguf(path, progress=False)
    except GGUFError:
        pass


def test_a_string_field_that_is_not_utf8_is_a_gguf_error(tmp_path, small):
    # Found by the test above: a flipped byte in general.architecture's value raised UnicodeDecodeError.
    blob = bytearray(small.read_bytes())
    key = b"general.architecture"
    value = blob.find(key) + len(key) + 4 + 8  # after the key: the value's type (u32) and length (u64)
    blob[value] = 0xEC
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(blob))
    with pytest.raises(GGUFError, match="general.architecture is not valid UTF-8"):
        load_gguf(path, progress=False)


def test_a_vocabulary_its_merges_do_not_fit_is_a_gguf_error(tmp_path, small):
    # Found by the test above in CI: the tokenizers library raised a bare Exception ("Token `on` out of vocabulary").
    blob = bytearray(small.read_bytes())
    at = blob.find(b"\x02\x00\x00\x00\x00\x00\x00\x00on")  # the vocabulary's string "on" (length 2)
    assert at > 0
    blob[at + 8] = ord("p")
    (tmp_path / "vocab.gguf").write_bytes(bytes(blob))
    with pytest.raises(GGUFError, match="tokenizer"):
        load_gguf(tmp_path / "vocab.gguf", progress=False)


def test_unsupported_architecture_and_cli_errors_are_one_line(tmp_path):
    import gguf

    w = gguf.GGUFWriter(tmp_path / "odd.gguf", "no-such-arch")
    w.add_tensor("x.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="no-such-arch"):
        load_gguf(tmp_path / "odd.gguf", progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cases = [
        (["eval", str(tmp_path / "odd.gguf"), "--method", "native", "--tokens", "16"], "no-such-arch"),
        (["export", "smollm2-135m", "--type", "q3_k", "--out", str(tmp_path / "x.gguf")], "--type for gguf"),
        (["export", "smollm2-135m", "--type", "tq2_0", "--out", str(tmp_path / "x.gguf")], "--force-ternary"),
        (["eval", str(tmp_path), "--method", "native"], "not a GGUF model"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert message in " ".join(proc.stderr.split()), (args, proc.stderr)
    assert not (tmp_path / "x.gguf").exists()


def test_a_quantized_layer_whose_bias_the_file_lacks_is_refused(tmp_path, tok, monkeypatch):
    # Qwen2's q/k/v have biases: a file without one must not load as a layer that silently has none.
    import gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lowbit.interop import gguf_export

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    export_gguf(model, tok, tmp_path / "q.gguf", "q4_0", progress=False)
    ours, _ = load_gguf(tmp_path / "q.gguf", progress=False)  # whole: loads, biases included
    with torch.no_grad():
        assert torch.equal(ours.model.layers[0].self_attn.q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)
    real_add = gguf.GGUFWriter.add_tensor
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", lambda self, name, *a, **k:
                        None if name == "blk.0.attn_q.bias" else real_add(self, name, *a, **k))
    gguf_export.export_gguf(model, tok, tmp_path / "nobias.gguf", "q4_0", progress=False)
    monkeypatch.undo()
    with pytest.raises(GGUFError, match="lacks model.layers.0.self_attn.q_proj.bias"):
        load_gguf(tmp_path / "nobias.gguf", progress=False)
