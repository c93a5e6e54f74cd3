"""lowbit.generate: the same tokens as transformers' greedy generate, on lowbit's lean decoder and off it."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lowbit
from lowbit.decode import HFDecoder, StaticDecoder, decoder_for
from lowbit.decode.sampling import next_token


@pytest.fixture(autouse=True)
def exact_path(monkeypatch):
    # transformers' tokens are the exact path's: float32 activations in decode and float32 prompt GEMMs (the
    # faster defaults are tested against their own emulations: test_int8_activations.py, test_fast_prefill.py).
    monkeypatch.setenv("LOWBIT_DECODE_ACTIVATIONS", "float32")
    monkeypatch.setenv("LOWBIT_PREFILL", "exact")


def hf_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))


@pytest.fixture(scope="module")
def smol_nf4(smollm):
    model, _ = smollm
    return lowbit.quantize(copy.deepcopy(model), lowbit.NF4Config(), progress=False)


@pytest.mark.parametrize("which", ["fp32", "nf4"])
def test_smollm2_greedy_equals_transformers(smollm, smol_nf4, which):
    model, tok = smollm
    model = model if which == "fp32" else smol_nf4
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ours = lowbit.generate(model, ids, max_new_tokens=40)
    assert torch.equal(ours, hf_greedy(model, ids, 40))
    assert "Paris" in tok.decode(ours[0, ids.shape[1]:])
    assert isinstance(decoder_for(model, 1, 8), StaticDecoder)  # the lean path ran, not transformers'


def random_model(arch: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, eos_token_id=None,
                                      bos_token_id=None)
        return transformers.GPT2LMHeadModel(cfg).eval()
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig}[arch]
    extra = {"sliding_window": 64} if arch == "mistral" else {}  # longer than the tests' sequences
    model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                   "mistral": transformers.MistralForCausalLM}[arch]
    model = model_class(config_class(**common, **extra)).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("method", ["fp32", "int4", "int8"])
def test_random_models_batch_of_two_equal_transformers(arch, method):
    model = random_model(arch)
    if method != "fp32":
        config = lowbit.IntConfig(bits=4, group_size=32) if method == "int4" else lowbit.Int8Config()
        lowbit.quantize(model, config, progress=False)
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(lowbit.generate(model, ids, max_new_tokens=20), hf_greedy(model, ids, 20))
    expected = HFDecoder if arch == "gpt2" else StaticDecoder
    assert isinstance(decoder_for(model, 2, 8), expected)


def test_bf16_model_equals_transformers():
    model = random_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(6))
    assert torch.equal(lowbit.generate(model, ids, max_new_tokens=16), hf_greedy(model, ids, 16))


def test_sliding_window_longer_than_the_sequence_only():
    model = random_model("mistral")  # window of 64 positions
    assert isinstance(decoder_for(model, 1, 64), StaticDecoder)
    assert isinstance(decoder_for(model, 1, 65), HFDecoder)  # past the window transformers' masks are needed


def test_prefill_in_pieces_equals_prefill_at_once():
    model = random_model("llama")
    ids = torch.randint(0, 300, (1, 15), generator=torch.Generator().manual_seed(2))
    whole = StaticDecoder(model, 1, 32).forward(ids)
    pieces = StaticDecoder(model, 1, 32)
    pieces.forward(ids[:, :10])
    torch.testing.assert_close(pieces.forward(ids[:, 10:]), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed the cache"):
        pieces.forward(torch.zeros(1, 20, dtype=torch.long))


def test_stops_at_end_token_and_pads_finished_rows():
    model = random_model("llama")
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(3))
    free = lowbit.generate(model, ids, max_new_tokens=12)
    end = int(free[0, 5 + 3])  # the 4th generated token becomes the end token
    stopped = lowbit.generate(model, ids, max_new_tokens=12, eos_token_id=end)
    first = (free[0, 5:] == end).nonzero()[0].item()
    assert torch.equal(stopped[0], free[0, :5 + first + 1])
    both = lowbit.generate(model, torch.cat([ids, ids.flip(1)]), max_new_tokens=12, eos_token_id=end)
    row = both[0, 5:]
    assert (row[first:] == end).all()  # a finished row is padded with its end token while the other goes on


def test_sampling_is_seeded_and_its_limits_hold():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 4.9]])
    assert next_token(logits).tolist() == [1, 0]
    assert next_token(logits, True, top_k=1).tolist() == [1, 0]  # top_k 1 is greedy
    assert next_token(logits, True, top_p=0.01).tolist() == [1, 0]  # so is a tiny top_p
    draws = torch.stack([next_token(logits, True, top_k=2, generator=torch.Generator().manual_seed(s))
                         for s in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0, 3}
    model = random_model("llama")
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(4))
    runs = [lowbit.generate(model, ids, 16, do_sample=True, temperature=0.8, top_p=0.9,
                            generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*runs)
    assert not torch.equal(runs[0], lowbit.generate(model, ids, 16))


@pytest.mark.parametrize("bad, match", [
    (dict(input_ids=torch.zeros(1, 3)), "integer token ids"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "T >= 1"),
    (dict(input_ids=torch.full((1, 3), 300)), r"must lie in \[0, 300\)"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.long), max_new_tokens=-1), "max_new_tokens"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.long), do_sample=True, temperature=0.0), "temperature"),
])
def test_bad_input_is_one_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        lowbit.generate(random_model("llama"), **bad)


def test_bitnet_model_runs_on_the_lean_decoder():
    from lowbit.train import pack_bitnet, to_bitnet
    from lowbit.train.model import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = pack_bitnet(to_bitnet(build_model("tiny", vocab_size=300, max_seq=64, bos=1, eos=2))).eval()
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(5))
    assert isinstance(decoder_for(model, 1, 8), StaticDecoder)
    assert torch.equal(lowbit.generate(model, ids, 12), hf_greedy(model, ids, 12))


def test_garbage_collector_is_paused_while_decoding_and_restored(monkeypatch):
    import gc

    from lowbit.decode import decoder as decoder_module

    model = random_model("llama")
    seen = []
    forward = decoder_module.StaticDecoder.forward
    monkeypatch.setattr(decoder_module.StaticDecoder, "forward", lambda self, ids: seen.append(gc.isenabled())
                        or forward(self, ids))
    ids = torch.zeros(1, 3, dtype=torch.long)
    lowbit.generate(model, ids, max_new_tokens=3)
    assert seen == [False] * 3 and gc.isenabled()
    gc.disable()  # a caller's own choice stays
    try:
        lowbit.generate(model, ids, max_new_tokens=2)
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_projections_equal_the_layers_own_calls(arch):
    # q/k/v and gate/up of a lowbit LUT model run as one kernel call each: the same logits as one call per layer
    # (qwen2: with q/k/v biases).
    model = lowbit.quantize(random_model(arch), lowbit.IntConfig(bits=4, group_size=32), progress=False)
    fused, plain = StaticDecoder(model, 2, 12), StaticDecoder(model, 2, 12)
    for blk, parts in zip(plain.blocks, plain.parts):  # each layer's own decode call
        for key in ("qkv", "gate_up"):
            calls = [m.decode_call() for m in getattr(parts, key)]
            blk[key] = lambda h, calls=calls: [call(h) for call in calls]
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(2))
    for _ in range(4):
        a, b = fused.forward(ids), plain.forward(ids)
        assert torch.equal(a, b)
        ids = a.argmax(-1)[:, None]


@pytest.mark.parametrize("config", [lowbit.NF4Config(), lowbit.IntConfig(bits=4, group_size=32),
                                    lowbit.Int8Config(weight_only=True), lowbit.Int8Config(),
                                    lowbit.NF4Config(compute_dtype=torch.bfloat16),
                                    lowbit.Int8Config(weight_only=True, compute_dtype=torch.bfloat16)], ids=str)
def test_decode_call_equals_forward(config):
    from lowbit.nn import QuantLinear

    torch.manual_seed(0)
    model = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(128, 96, bias=True)), config, progress=False)
    layer = model[0]
    assert isinstance(layer, QuantLinear)
    call = layer.decode_call()
    x = torch.randn(2, 3, 128)
    cases = [x[:, :1], x, x.transpose(0, 1), x.to(torch.bfloat16), torch.randn(4, 9, 128)]  # 1 and 6 rows,
    with torch.no_grad():  # a strided view, bf16 activations, and past the GEMV's rows (the full forward)
        for case in cases:
            got, want = call(case), layer(case)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want)


def test_thread_chooser_keeps_the_faster_count(monkeypatch):
    from lowbit.decode import threads as threads_module

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chooser = threads_module.ThreadChooser(every=10, probe=2)
        seconds = {2: 3.0, 1: 1.0}  # one thread faster: as on a machine whose other core is busy
        now = [0.0]
        monkeypatch.setattr(threads_module.time, "perf_counter", lambda: now[0])
        used = []
        for step in range(10):
            chooser.before(step)
            used.append(torch.get_num_threads())
            now[0] += seconds[torch.get_num_threads()]  # the step's time on that many threads
            chooser.after(step)
        assert used == [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]  # probed both, then kept one thread
        seconds.update({2: 1.0, 1: 3.0})  # the other core is free again: the next probe goes back to two
        used = []
        for step in range(10, 16):
            chooser.before(step)
            used.append(torch.get_num_threads())
            now[0] += seconds[torch.get_num_threads()]
            chooser.after(step)
        assert used == [2, 2, 1, 1, 2, 2]
    finally:
        torch.set_num_threads(saved)


def test_threads_option_restores_the_count_and_keeps_the_tokens():
    model = random_model("llama")
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(8))
    saved = torch.get_num_threads()
    want = lowbit.generate(model, ids, 20)
    assert torch.equal(lowbit.generate(model, ids, 20, threads=1), want)
    assert torch.equal(lowbit.generate(model, ids, 20, threads="auto"), want)
    assert torch.get_num_threads() == saved
    for bad in (0, "many", 1.5, True):
        with pytest.raises(ValueError, match="threads must be"):
            lowbit.generate(model, ids, 4, threads=bad)


def test_speed_measures_the_decoder_it_is_asked_for():
    from lowbit.eval.speed import speed

    model = random_model("llama")
    lean = speed(model, prompt_tokens=6, new_tokens=3, repeats=1, threads="auto")
    hf = speed(model, prompt_tokens=6, new_tokens=3, repeats=1, decoder="transformers")
    assert lean["decoder"] == "StaticDecoder" and hf["decoder"] == "HFDecoder"
    assert lean["decode_tok_s"] == pytest.approx(3 / lean["decode_s"]) and hf["prefill_s"] > 0
    with pytest.raises(ValueError, match="decoder must be"):
        speed(model, decoder="compiled")
