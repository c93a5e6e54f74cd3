"""`lowbit run` (issue 34 item 4): a model's answer streamed token by token, the chat template applied, speed after."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app

runner = CliRunner()


def _transformers_answer(model, tok, ids, n: int) -> str:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_run_streams_the_chat_answer_transformers_gives(smollm):
    model, tok = smollm
    question = "What is the capital of France?"
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    want = _transformers_answer(model, tok, ids, 12)
    r = runner.invoke(app, ["run", "smollm2-135m", question, "--max-new-tokens", "12", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert want.strip() and want.strip() in r.stdout and "Paris" in r.stdout
    assert "prefill" in r.stderr and "decode" in r.stderr and "tok/s" in r.stderr


def test_run_raw_continues_the_text_itself(smollm):
    model, tok = smollm
    prompt = "def fibonacci(n):"
    want = _transformers_answer(model, tok, tok(prompt, return_tensors="pt").input_ids, 10)
    r = runner.invoke(app, ["run", "smollm2-135m", prompt, "--raw", "--max-new-tokens", "10", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip("\n") == want.rstrip("\n")


def test_run_without_a_prompt_is_a_chat_on_stdin():
    r = runner.invoke(app, ["run", "smollm2-135m", "--max-new-tokens", "8", "--threads", "1"],
                      input="What is the capital of France?\n\nAnd of Italy?\n")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("prefill ") == 2  # two turns (the blank line is none)
    assert r.stderr.count("decode: lowbit's native step") == 1  # the decode path, said once
    assert "Paris" in r.stdout and "Rome" in r.stdout  # the second turn saw the first


def test_generate_on_token_streams_each_new_token():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    seen = []
    out = lowbit.generate(model, ids, max_new_tokens=5, on_token=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, 3:])
    with pytest.raises(ValueError, match="on_token"):
        lowbit.generate(model, ids, max_new_tokens=1, on_token="print")


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--method", "gptq"], "needs calibration"),
    (["--sample", "--top-p", "2"], "top_p"),
    (["--method", "nf5"], "unknown method"),
])
def test_run_bad_options_are_one_line(args, message):
    r = runner.invoke(app, ["run", "smollm2-135m", "Hi", *args, "--threads", "1"])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
