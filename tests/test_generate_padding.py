"""lowbit.generate on padded batches (attention_mask) and its argument checks.

Item 3: a left- or right-padded batch gives each row the tokens of its own unpadded run, on lowbit's lean decoder
(Llama, SmolLM2, NF4) and on transformers' forward (GPT-2); expected tokens come from transformers' generate.
Item 9: each generation argument out of its range is one ValueError naming it, before any decoding.
"""
from __future__ import annotations

import math

import pytest
import torch

import lowbit
from lowbit.decode import HFDecoder, StaticDecoder, decoder_for

PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [100, 3, 250, 4, 60], [77]]  # different lengths
PAD = 0


def tiny_model(arch: str) -> torch.nn.Module:
    """A small random model (fixed seed, eval) with no end token, so every run decodes all its tokens."""
    import transformers

    torch.manual_seed(0)
    if arch == "gpt2":
        # Larger random weights than the default 0.02, at which every row just repeats its last token: here the
        # tokens depend on the context and on the (learned, absolute) positions.
        config = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, eos_token_id=None,
                                         bos_token_id=None, initializer_range=0.2)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, eos_token_id=None,
                                          bos_token_id=None, pad_token_id=None)
        model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model = model.eval()
    if arch == "llama-nf4":
        model = lowbit.quantize(model, lowbit.NF4Config(), progress=False)
    if arch == "llama-bf16":  # one-token steps run SDPA with the padding mask, not the float32 matmuls
        model = model.to(torch.bfloat16)
    return model


def padded(prompts: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of ``prompts`` padded on ``side`` with PAD."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        cols = slice(0, len(prompt)) if side == "right" else slice(width - len(prompt), width)
        ids[row, cols], mask[row, cols] = torch.tensor(prompt), 1
    return ids, mask


def single_runs(model, prompts: list[list[int]], n: int) -> torch.Tensor:
    """Each prompt's new tokens from transformers' greedy generate on that prompt alone, stacked [batch, n]."""
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
            rows.append(out[0, len(prompt):])
    return torch.stack(rows)


# Item 3: padded batches


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch, decoder", [("llama", StaticDecoder), ("llama-nf4", StaticDecoder),
                                           ("llama-bf16", StaticDecoder), ("gpt2", HFDecoder)])
def test_padded_batch_equals_single_unpadded_runs(arch, decoder, side):
    model = tiny_model(arch)
    assert isinstance(decoder_for(model, len(PROMPTS), 8), decoder)
    ids, mask = padded(PROMPTS, side)
    out = lowbit.generate(model, ids, max_new_tokens=10, attention_mask=mask)
    assert out.shape == (len(PROMPTS), ids.shape[1] + 10)
    assert torch.equal(out[:, :ids.shape[1]], ids)  # the prompts as given, padding where it was
    assert torch.equal(out[:, ids.shape[1]:], single_runs(model, PROMPTS, 10))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_equals_transformers_batch(arch):
    model = tiny_model(arch)
    ids, mask = padded(PROMPTS, "left")
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              pad_token_id=PAD)
    assert torch.equal(lowbit.generate(model, ids, max_new_tokens=10, attention_mask=mask), want)


def test_padding_in_the_middle_is_left_out_too():
    # A mask with holes (as a packed or edited batch has): the row continues as its real tokens alone.
    model = tiny_model("llama")
    ids = torch.tensor([[5, 99, 17, 98, 42], [7, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 0, 1, 0, 1], [1, 1, 1, 1, 1]])
    out = lowbit.generate(model, ids, max_new_tokens=8, attention_mask=mask)
    assert torch.equal(out[:, 5:], single_runs(model, [[5, 17, 42], [7, 8, 9, 10, 11]], 8))


def test_decoder_positions_count_real_tokens_only():
    # Padding inside a row takes no position: RoPE sees the real tokens 1 apart, as in the unpadded row (generate
    # left-aligns rows, so only the decoder itself meets such a hole).
    model = tiny_model("llama")
    decoder = StaticDecoder(model, 1, 8)
    logits = decoder.forward(torch.tensor([[5, PAD, PAD, 17, 42]]), torch.tensor([[1, 0, 0, 1, 1]]))
    with torch.no_grad():
        want = model(torch.tensor([[5, 17, 42]])).logits[:, -1]
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decoder.forward(torch.tensor([[9]])),
                               model(torch.tensor([[5, 17, 42, 9]])).logits[:, -1].detach(), rtol=1e-4, atol=1e-4)


def test_padded_first_token_fed_alone_leaves_no_nan():
    # A row whose first token is padding, fed as a one-token step (the float32 matmul path): its query sees no real
    # key, so it must see itself, else its softmax row is NaN and 0 * NaN reaches the row's later tokens.
    model = tiny_model("llama")
    decoder = StaticDecoder(model, 2, 4)
    decoder.forward(torch.tensor([[PAD], [5]]), torch.tensor([[0], [1]]))
    logits = decoder.forward(torch.tensor([[17], [17]]))
    with torch.no_grad():
        want = model(torch.tensor([[17]])).logits[:, -1], model(torch.tensor([[5, 17]])).logits[:, -1]
    torch.testing.assert_close(logits, torch.cat(want), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("side", ["left", "right"])
def test_smollm2_padded_prompts_equal_single_runs(smollm, side):
    model, tok = smollm
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
             "2 + 2 =", "The best way to learn a new language is"]
    batch = tok(texts, return_tensors="pt", padding=True, padding_side=side)
    assert not bool(batch.attention_mask.all())  # the batch is padded
    prompts = [tok(text).input_ids for text in texts]
    out = lowbit.generate(model, batch.input_ids, max_new_tokens=12, attention_mask=batch.attention_mask)
    width = batch.input_ids.shape[1]
    assert torch.equal(out[:, :width], batch.input_ids)
    assert torch.equal(out[:, width:], single_runs(model, prompts, 12))
    if side == "left":  # and the tokens of transformers' own batched generate
        with torch.no_grad():
            want = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(out, want)


@pytest.mark.parametrize("mask, match", [
    (torch.ones(2, 4, dtype=torch.long), r"attention_mask must have input_ids' shape \(2, 3\)"),
    (torch.tensor([[1, 1, 2], [0, 1, 1]]), "only 1 .token. and 0 .padding."),
    (torch.tensor([[0, 0, 0], [0, 1, 1]]), r"rows \[0\] have none"),
], ids=["shape", "values", "empty-row"])
def test_bad_attention_mask_is_one_clear_error(mask, match):
    with pytest.raises(ValueError, match=match):
        lowbit.generate(tiny_model("llama"), torch.ones(2, 3, dtype=torch.long), 4, attention_mask=mask)


# Item 9: generation arguments checked up front


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=1.5), r"max_new_tokens must be an int >= 0, got 1.5"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an int >= 0, got True"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be an int >= 0, got -1"),
    (dict(do_sample=True, temperature=math.nan), r"temperature must be a finite number > 0 when sampling"),
    (dict(do_sample=True, temperature=math.inf), r"temperature must be a finite number > 0 when sampling"),
    (dict(do_sample=True, temperature=0.0), r"temperature must be a finite number > 0 when sampling"),
    (dict(do_sample=True, top_k=-5), r"top_k must be an int >= 1, or None"),
    (dict(do_sample=True, top_k=0), r"top_k must be an int >= 1, or None for no limit \(transformers' top_k=0\)"),
    (dict(do_sample=True, top_k=2.5), r"top_k must be an int >= 1"),
    (dict(do_sample=True, top_p=0.0), r"top_p must be a number in \(0, 1\].*top_k=1"),
    (dict(do_sample=True, top_p=2.0), r"top_p must be a number in \(0, 1\]"),
    (dict(do_sample=True, top_p=math.nan), r"top_p must be a number in \(0, 1\]"),
    (dict(eos_token_id=2.0), r"eos_token_id must be an int >= 0, a list of them or None"),
    (dict(eos_token_id=[1, "2"]), r"eos_token_id must be an int >= 0"),
    (dict(eos_token_id=-1), r"eos_token_id must be an int >= 0"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_bad_generation_argument_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowbit.generate(tiny_model("llama"), torch.tensor([[5, 6, 7]]), **kwargs)


def test_edges_of_the_ranges_are_accepted():
    # The ranges' closed ends stay valid: top_p=1 and top_k=1 (sampling that keeps only the best token: greedy)
    model, ids = tiny_model("llama"), torch.tensor([[5, 6, 7]])
    greedy = lowbit.generate(model, ids, 6)
    assert torch.equal(greedy[:, 3:], single_runs(model, [[5, 6, 7]], 6))
    assert torch.equal(lowbit.generate(model, ids, 6, do_sample=True, top_k=1, top_p=1.0,
                                       generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(lowbit.generate(model, ids, 6, eos_token_id=[]), greedy)
    assert torch.equal(lowbit.generate(model, ids, 0), ids)


@pytest.mark.parametrize("args,message", [
    (dict(input_ids=[[1, 2, 3]]), "must be a tensor"),
    (dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), "batch, T >= 1"),
    (dict(do_sample="yes"), "do_sample must be True or False"),
    (dict(max_new_tokens=10**9), "max_position_embeddings"),
])
def test_more_bad_generate_arguments_are_one_clear_error(args, message):
    """Found by a rerun of the probes: a raw RuntimeError, an AttributeError, a 32 GB allocation, a string taken as
    True."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    kwargs = {"input_ids": torch.tensor([[1, 2, 3]]), "max_new_tokens": 4, **args}
    with pytest.raises(ValueError, match=message):
        lowbit.generate(model, **kwargs)
