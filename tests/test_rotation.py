"""Hadamard rotation of the residual stream (issue 35 item 4): the rotated model computes the original's function,
stays an ordinary transformers model and GGUF file, and quantizes with less error."""
from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.interop.gguf import load_gguf
from lowbit.interop.gguf_export import export_gguf
from lowbit.rotation import hadamard, random_rotation, rotate
from test_checkpoint import logits, tiny_llama
from test_cli import run, tiny_model_dir  # noqa: F401 - the fixture
from test_gguf import tok  # noqa: F401 - the fixture


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 44, 48, 64, 576, 960, 1536])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n))


@pytest.mark.parametrize("n", [64, 100])  # 100: no Hadamard built, a random orthogonal matrix instead
def test_random_rotations_are_orthogonal(n):
    q = random_rotation(n, seed=3)
    assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert not torch.equal(q, random_rotation(n, seed=4))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def _with_gains(model):
    # trained models have norm gains far from 1; a fresh one has all ones, which would hide a folding mistake
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "norm" in n:
            p.data = 0.5 + torch.rand(p.shape, generator=g) * 2
    return model


def _llama_with_biases():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                        mlp_bias=True, max_position_embeddings=64)).eval()


def _with_biases(model):  # biases are zero at init: random ones, so that o / down's b <- b Q is checked
    g = torch.Generator().manual_seed(2)
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return model


@pytest.mark.parametrize("make", [lambda: tiny_llama(tied=True), lambda: tiny_llama(tied=False), _qwen2,
                                  lambda: _with_biases(_llama_with_biases())],
                         ids=["llama-tied", "llama-untied", "qwen2-biases", "llama-o-and-down-biases"])
def test_a_rotated_model_computes_the_same_function(make):
    model = _with_gains(make())
    rotated = rotate(copy.deepcopy(model))
    assert (logits(rotated) - logits(model)).abs().max() < 1e-5
    assert not rotated.config.tie_word_embeddings
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in rotated.named_parameters() if "norm" in n)
    # the weights did change: q_proj's inputs are rotated
    assert not torch.allclose(rotated.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_rotation_spreads_an_outlier_feature_and_lowers_rounding_error():
    model = _with_gains(tiny_llama(tied=False))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 40  # one residual dimension far larger than the rest
    rotated = rotate(copy.deepcopy(model))
    err = {}
    for name, m in (("plain", model), ("rotated", rotated)):
        q = lowbit.quantize(copy.deepcopy(m), "rtn3", progress=False)
        err[name] = float((logits(q) - logits(model)).square().mean())
    assert err["rotated"] < err["plain"]


def test_rotation_refuses_what_it_does_not_cover():
    with pytest.raises(ValueError, match="already quantized"):
        rotate(lowbit.quantize(tiny_llama(), "nf4", progress=False))
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="rotation covers llama, mistral, qwen2 models; this is 'gpt2'"):
        rotate(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)))


def test_a_rotated_model_saves_quantized_and_exports_as_an_ordinary_gguf(tmp_path, tok):  # noqa: F811
    from test_gguf import tiny_model

    base = _with_gains(tiny_model())
    rotated = rotate(copy.deepcopy(base))
    q = lowbit.quantize(copy.deepcopy(rotated), "nf4", progress=False)
    lowbit.save(q, tmp_path / "ck")
    assert torch.equal(logits(lowbit.load(tmp_path / "ck")), logits(q))
    export_gguf(rotated, tok, tmp_path / "r.gguf", "f32", progress=False)
    back, _ = load_gguf(tmp_path / "r.gguf", progress=False)
    assert (logits(back) - logits(base)).abs().max() < 1e-4  # the file holds the original's function


def test_rotate_on_the_command_line(tmp_path, tiny_model_dir):  # noqa: F811
    code, out = run("quantize", tiny_model_dir, "--method", "rtn", "--rotate", "--out", tmp_path / "q")
    assert code == 0, out
    assert not lowbit.load(tmp_path / "q").config.tie_word_embeddings
    code, out = run("export", tiny_model_dir, "--type", "q4_0", "--method", "gptq", "--rotate", "--out",
                    tmp_path / "r.gguf")
    assert code == 0, out
    from lowbit.interop.gguf import read

    tensors = {t.name: t for t in read(tmp_path / "r.gguf").tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_0" and "output.weight" in tensors  # untied
    code, out = run("quantize", "smollm2-135m", "--method", "native", "--rotate", "--out", tmp_path / "n")
    assert code == 2 and "--rotate changes the weights" in out
