"""The native decode step (lowbit/decode/native.py, kernels/csrc/engine.cpp): a whole token in one compiled call.

On its exact path (float32 activations) its tokens must be transformers' own (greedy), and its logits the Python
step's within float summation order, for every architecture and weight kind it takes; what it does not take runs
on the Python step, which says why.
"""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.decode import StaticDecoder
from lowbit.kernels import fast
from lowbit.train.bitnet import pack_bitnet, to_bitnet

pytestmark = pytest.mark.skipif(fast() is None or not hasattr(fast(), "DecodeEngine"),
                                reason="no compiled kernels: the native step needs them")

ARCHS = ["llama", "qwen2", "mistral", "gemma", "phi3"]


@pytest.fixture(autouse=True)
def exact_activations(monkeypatch):
    # The exact path: float32 activations (int8 activations, the default, are tested in test_int8_activations.py).
    monkeypatch.setenv("LOWBIT_DECODE_ACTIVATIONS", "float32")
    monkeypatch.setenv("LOWBIT_PREFILL", "exact")  # and float32 prompt GEMMs
METHODS = {"fp32": None, "nf4": lambda: lowbit.NF4Config(), "int4": lambda: lowbit.IntConfig(bits=4, group_size=32),
           "int8-weight": lambda: lowbit.Int8Config(weight_only=True), "rtn3": lambda: lowbit.IntConfig(bits=3)}


def random_model(arch: str) -> torch.nn.Module:
    """A small random decoder of ``arch`` (fixed seed, eval, no end token)."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    kinds = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
             "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64}),
             "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
             "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None})}
    config_name, model_name, extra = kinds[arch]
    config = getattr(transformers, config_name)(**common, **extra)
    # Larger weights than the default 0.02: the tokens then depend on the context, not only on the last token.
    config.initializer_range = 0.3
    model = getattr(transformers, model_name)(config).eval()
    model.generation_config.eos_token_id = None
    return model


def quantized(arch: str, method: str) -> torch.nn.Module:
    model = random_model(arch)
    if METHODS[method] is not None:
        lowbit.quantize(model, METHODS[method](), progress=False)
    return model


def hf_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(METHODS))
def test_greedy_tokens_equal_transformers(arch, method):
    model = quantized(arch, method)
    decoder = StaticDecoder(model, 1, 8)
    assert decoder.native is not None, decoder.native_why
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    want = hf_greedy(model, ids, 24)
    assert len(set(want[0, 6:].tolist())) > 3  # a real test: the tokens move
    assert torch.equal(lowbit.generate(model, ids, max_new_tokens=24), want)


def steps(model, ids: torch.Tensor, n: int) -> list[torch.Tensor]:
    decoder = StaticDecoder(model, 1, ids.shape[1] + n)
    logits = [decoder.forward(ids)]
    for _ in range(n):
        logits.append(decoder.forward(logits[-1].argmax(-1)[:, None]))
    return logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["fp32", "nf4", "int8-weight"])
def test_logits_equal_the_python_step_within_rounding(arch, method, monkeypatch):
    model = quantized(arch, method)
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    native = steps(model, ids, 12)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    python = steps(model, ids, 12)
    for a, b in zip(native, python):
        assert a.shape == b.shape == (1, 300)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_native_step_off_by_environment(monkeypatch):
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    decoder = StaticDecoder(random_model("llama"), 1, 8)
    assert decoder.native is None and decoder.native_why == "LOWBIT_NATIVE=0"


@pytest.mark.parametrize("case, why", [
    ("llm-int8", "Int8Linear"),   # int8 activations with outlier columns: the Python step's layer call
    ("ternary-training", "TrainableBitLinear"),  # b1.58 layers still training: packed ones run natively
    ("batch", "batches of several sequences"),
    ("bf16", "bfloat16 compute"),
])
def test_what_the_native_step_does_not_take_runs_in_python_and_says_why(case, why):
    model = random_model("llama")
    if case == "llm-int8":
        lowbit.quantize(model, lowbit.Int8Config(), progress=False)
    elif case == "ternary-training":
        to_bitnet(model)
    elif case == "bf16":
        model = model.to(torch.bfloat16)
    decoder = StaticDecoder(model, 2 if case == "batch" else 1, 8)
    assert decoder.native is None and why in decoder.native_why
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(3))
    if case != "batch":  # it still decodes, on the Python step
        assert lowbit.generate(model, ids, max_new_tokens=3).shape == (1, 7)


def ternary_model(trained: bool) -> torch.nn.Module:
    """A random Llama with b1.58 layers: post-training ternary (lowbit's ``ternary`` method), or packed from
    training layers, whose input is RMS-normed without a gain first."""
    model = random_model("llama")
    if trained:
        return pack_bitnet(to_bitnet(model))
    return lowbit.quantize(model, lowbit.TernaryConfig(), progress=False)


@pytest.mark.parametrize("trained", [False, True], ids=["post-training", "trained-input-norm"])
def test_ternary_layers_run_natively_and_equal_the_python_step(trained, monkeypatch):
    # The same int8 codes of x and the same integer products as BitLinear's own kernel: the logits differ only by
    # the float order of the norms (a code can move by one where x * 127 / absmax lands near a half).
    model = ternary_model(trained)
    assert any(getattr(m, "input_norm", False) for m in model.modules()) == trained
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(6))
    decoder = StaticDecoder(model, 1, 20)
    assert decoder.native is not None, decoder.native_why
    native = steps(model, ids, 12)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    python = steps(model, ids, 12)
    for a, b in zip(native, python):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    assert [int(a.argmax()) for a in native] == [int(b.argmax()) for b in python]


def test_ternary_weights_of_the_wrong_shape_are_refused():
    ext = fast()
    with pytest.raises(RuntimeError, match="multiple of 4 weights"):
        ext.DecodeWeight.ternary(torch.zeros(6, dtype=torch.uint8), 1.0, 4, 6, None, False)
    with pytest.raises(RuntimeError, match="contiguous uint8 of 8 bytes"):
        ext.DecodeWeight.ternary(torch.zeros(7, dtype=torch.uint8), 1.0, 4, 8, None, False)
    with pytest.raises(RuntimeError, match="gamma must be finite"):
        ext.DecodeWeight.ternary(torch.zeros(8, dtype=torch.uint8), float("nan"), 4, 8, None, False)


def test_padded_batch_of_one_and_prefill_in_pieces_stay_on_the_python_step():
    # The native step takes one real token after an unpadded cache; a later multi-token call continues in Python
    # over the same cache: the tokens equal one run of the whole sequence.
    model = quantized("llama", "nf4")
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(4))
    whole = StaticDecoder(model, 1, 12).forward(ids)
    pieces = StaticDecoder(model, 1, 12)
    pieces.forward(ids[:, :4])
    for i in range(4, 6):
        pieces.forward(ids[:, i:i + 1])  # native steps
    torch.testing.assert_close(pieces.forward(ids[:, 6:]), whole, rtol=1e-4, atol=1e-4)


def test_engine_refuses_bad_input_in_one_line():
    decoder = StaticDecoder(random_model("llama"), 1, 8)
    engine_step = decoder.native
    with pytest.raises(RuntimeError, match="x must be float32"):
        engine_step(torch.zeros(64, dtype=torch.float64), 0)
    with pytest.raises(RuntimeError, match="past the cache"):
        engine_step(torch.zeros(64), 8)
    ext = fast()
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ext.DecodeWeight.dense(torch.zeros(4, 4).t(), None)
    with pytest.raises(RuntimeError, match="act must be silu or gelu_tanh"):
        ext.DecodeEngine(64, 4, 2, 16, 128, 1e-6, 0.25, "relu", torch.zeros(8, 16), torch.zeros(8, 16),
                         torch.ones(64), None, False)


def test_a_group_mixing_block_sizes_equals_the_python_step(monkeypatch):
    # q/k/v in one phase with blocks of 128 and 32 over K = 2048: the second plan needs 64 row constants where the
    # first prepared room for 16 + 32 (found in review: the scratch was sized by the first plan of a phase).
    import transformers

    def model():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=300, hidden_size=2048, intermediate_size=256, num_hidden_layers=1,
                                          num_attention_heads=16, num_key_value_heads=4, initializer_range=0.3)
        return transformers.LlamaForCausalLM(config).eval()

    wide, narrow = model(), model()
    lowbit.quantize(wide, lowbit.NF4Config(blocksize=128), progress=False)
    lowbit.quantize(narrow, lowbit.NF4Config(blocksize=32), progress=False)
    for a, b in zip(wide.model.layers, narrow.model.layers):
        a.self_attn.k_proj, a.mlp.up_proj = b.self_attn.k_proj, b.mlp.up_proj
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(5))
    native = steps(wide, ids, 8)
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    for a, b in zip(native, steps(wide, ids, 8)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_weights_of_the_wrong_size_are_refused():
    ext = fast()
    with pytest.raises(RuntimeError, match="the bias has 3 values for 4 rows"):
        ext.DecodeWeight.dense(torch.zeros(4, 8), torch.zeros(3))
    layer = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)), lowbit.NF4Config(), progress=False)[0]
    from lowbit.kernels.matmul import lut_plan

    plan = lut_plan(ext, layer.lut_weight(), torch.float32)
    with pytest.raises(RuntimeError, match=r"the plan's weight is not \[64, 32\]"):
        ext.DecodeWeight.lut(plan, 64, 32, None)
