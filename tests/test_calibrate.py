"""GPTQ and SpQR: they beat round-to-nearest where inputs are correlated, respect their budgets, save and load."""
import pytest
import torch
from torch import nn

import lowbit
from lowbit.calibrate import calibration_batches, gptq_quantize, spqr_quantize
from lowbit.nn import IntLinear, SpQRLinear


def correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scales = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]  # some inputs matter 100x more than others
    return (torch.randn(n, d, generator=g) @ mix) * scales


def hessian(X):
    return 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("bits,act_order,margin", [(2, True, 0.9), (3, True, 0.9), (4, True, 0.9), (8, True, 0.9),
                                                    (3, False, 1.0), (4, False, 1.0)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits, act_order, margin):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    X = correlated_inputs()
    codes, scale, zero = gptq_quantize(lin.weight.detach(), hessian(X), bits, 32, act_order)
    gptq = IntLinear.from_codes(codes, scale, zero, None, bits, 32)
    rtn = IntLinear.from_linear(lin, bits, 32)
    with torch.no_grad():
        exact = lin(X)
        err = lambda layer: float((layer(X) - exact).norm() / exact.norm())
    assert codes.max() <= 2**bits - 1
    assert err(gptq) < margin * err(rtn), (err(gptq), err(rtn))


def test_gptq_with_identity_hessian_is_round_to_nearest():
    # With H = I no column can help another: GPTQ reduces to rounding (static groups: same statistics).
    torch.manual_seed(1)
    lin = nn.Linear(96, 40, bias=False)
    codes, scale, zero = gptq_quantize(lin.weight.detach(), torch.eye(96), 4, 32, act_order=True, damp=0.0)
    rtn = IntLinear.from_linear(lin, 4, 32)
    assert torch.equal(IntLinear.from_codes(codes, scale, zero, None, 4, 32).dequantize(), rtn.dequantize())


def test_spqr_without_outliers_is_its_dense_grouped_quantization():
    torch.manual_seed(2)
    W = torch.randn(48, 64)
    X = correlated_inputs(d=64)
    q = spqr_quantize(W, hessian(X), bits=3, group_size=16, max_outliers=0.0)
    assert not q.outliers.any()
    layer = SpQRLinear.from_spqr(q, None, 3, 16, 16)
    assert layer.num_outliers() == 0
    assert torch.equal(layer.dequantize(), layer.dense_part())
    # Every weight sits on its group's grid built from the 3-bit statistics.
    stats = [torch.stack([lowbit.functional.grouped.dequantize_stats(q.stat_codes[k, :, j], q.stat_scale[k, :, j],
                                                                      q.stat_zero[k, :, j], 16) for j in range(4)], 1)
             for k in range(2)]
    scale, zero = (s.repeat_interleave(16, dim=1) for s in stats)
    assert torch.allclose(layer.dense_part(), (q.codes.float() - zero) * scale, atol=1e-6)


@pytest.mark.parametrize("budget", [0.0, 0.005, 0.02])
def test_spqr_respects_the_outlier_budget_and_outliers_help(budget):
    torch.manual_seed(3)
    W = torch.randn(64, 128)
    W[torch.rand_like(W) < 0.01] *= 12  # a few large weights, as in real models
    X = correlated_inputs()
    q = spqr_quantize(W, hessian(X), bits=3, group_size=16, outlier_threshold=2.0, max_outliers=budget)
    per_group = q.outliers.view(64, -1, 16).sum(dim=(0, 2))
    assert int(per_group.max()) <= int(budget * 64 * 16)
    layer = SpQRLinear.from_spqr(q, None, 3, 16, 16)
    assert layer.num_outliers() == int(q.outliers.sum())
    w = layer.dequantize()
    # Outliers keep their (GPTQ-updated) value exactly, in fp16, off the rounding grid.
    assert torch.equal(w[q.outliers], q.values[q.outliers]) and torch.equal(q.values, q.values.half().float())
    if budget:
        assert int(q.outliers.sum()) > 0
    exact = X @ W.t()
    err = float((X @ w.t() - exact).norm() / exact.norm())
    if budget == 0.0:
        test_spqr_respects_the_outlier_budget_and_outliers_help.dense_err = err
    else:
        assert err < test_spqr_respects_the_outlier_budget_and_outliers_help.dense_err


def test_bits_per_param_counts_everything():
    q = spqr_quantize(torch.randn(64, 128), torch.eye(128), bits=3, group_size=16, max_outliers=0.01, outlier_threshold=1.0)
    layer = SpQRLinear.from_spqr(q, None, 3, 16, 16)
    n, nnz = 64 * 128, layer.num_outliers()
    expected = (3 * n + 2 * 3 * 64 * 8 + 2 * 2 * 16 * 4 * 8 + nnz * (16 + 16) + 32 * 65) / n
    assert layer.bits_per_param() == pytest.approx(expected)
    assert IntLinear(128, 64, bits=4, group_size=128).bits_per_param() == pytest.approx(4 + 24 / 128)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("config", [lowbit.GPTQConfig(bits=3, group_size=32), lowbit.SpQRConfig(bits=3, outlier_threshold=2.0)])
def test_calibrated_model_saves_and_loads(tmp_path, config):
    model = tiny_llama()
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    lowbit.quantize(model, config, progress=False, calibration=ids)
    kinds = {type(m) for m in model.modules()}
    assert (IntLinear if isinstance(config, lowbit.GPTQConfig) else SpQRLinear) in kinds
    assert model.lowbit_calibration["layers"] == 14
    lowbit.save(model, tmp_path / "ck")
    loaded = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.lowbit_config == config


def test_calibration_data_is_disjoint_and_seeded(smollm):
    from lowbit.data import default_text

    _, tok = smollm
    text = default_text()
    a = calibration_batches(tok, text, n_samples=4, seq_len=64)
    assert torch.equal(a, calibration_batches(tok, text, n_samples=4, seq_len=64)) and a.shape == (4, 64)
    assert not torch.equal(a, calibration_batches(tok, text, n_samples=4, seq_len=64, seed=1))
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[0]
    after_eval = ids[8192:].unfold(0, 64, 1)  # every 64-token window past the evaluation tokens
    assert all(bool((after_eval == row).all(1).any()) for row in a)
    with pytest.raises(ValueError, match="calibration data"):
        lowbit.quantize(tiny_llama(), lowbit.GPTQConfig())


def test_spqr_matches_gptq_quality_on_tiny_groups():
    # With 3-bit statistics and no outliers SpQR is GPTQ on groups of 16 plus the statistics' rounding:
    # its output error must stay close to GPTQ's, and well below round-to-nearest's.
    torch.manual_seed(4)
    lin = nn.Linear(128, 64, bias=False)
    X = correlated_inputs()
    H = hessian(X)
    with torch.no_grad():
        exact = lin(X)
        err = lambda w: float((X @ w.t() - exact).norm() / exact.norm())
        gptq = IntLinear.from_codes(*gptq_quantize(lin.weight, H, 3, 16), None, 3, 16).dequantize()
        spqr = SpQRLinear.from_spqr(spqr_quantize(lin.weight, H, 3, 16, max_outliers=0.0), None, 3, 16, 16).dequantize()
        rtn = IntLinear.from_linear(lin, 3, 16).dequantize()
    assert err(spqr) < 1.15 * err(gptq) and err(spqr) < 0.9 * err(rtn), (err(spqr), err(gptq), err(rtn))


def test_clip_tokens_caps_massive_tokens_only():
    from lowbit.calibrate.sequential import clip_tokens

    x = torch.randn(100, 32)
    x[0] *= 1000  # an attention-sink token with massive activations
    out = clip_tokens(x, 3.0)
    norms, median = out.square().sum(1), x.square().sum(1).median()
    assert norms[0] <= 3.0 * median * (1 + 1e-5)
    kept = x.square().sum(1) <= 3.0 * median
    assert torch.equal(out[kept], x[kept])
    assert torch.allclose(out[0] / out[0].norm(), x[0] / x[0].norm())  # direction kept


def test_true_sequential_calibrates_each_group_on_the_quantized_groups_before_it():
    import copy

    from lowbit.calibrate.sequential import _input_groups, quantize_sequential

    model = tiny_llama()
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    block = model.model.layers[0]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a, kw: seen.update(args=(a, kw)), with_kwargs=True)
    model(ids)
    handle.remove()
    assert _input_groups(block, linears, *seen["args"]) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]

    def zeroing(record):
        # A "quantizer" that zeroes every layer: once v_proj is zero, o_proj's true inputs are zero too.
        def quantize(name, module, H):
            record[name] = H
            out = copy.deepcopy(module)
            out.weight.data.zero_()
            return out
        return quantize

    hs = {}
    for true_seq in (True, False):
        record = {}
        quantize_sequential(copy.deepcopy(model), ids, zeroing(record), progress=False, true_sequential=true_seq)
        hs[true_seq] = record
    assert hs[True]["model.layers.0.self_attn.o_proj"].abs().max() == 0
    assert hs[False]["model.layers.0.self_attn.o_proj"].abs().max() > 0
    # q, k and v share one Hessian; the first group is calibrated on the same inputs either way
    q, k = hs[True]["model.layers.0.self_attn.q_proj"], hs[True]["model.layers.0.self_attn.k_proj"]
    assert q is k and torch.equal(q, hs[False]["model.layers.0.self_attn.q_proj"])
