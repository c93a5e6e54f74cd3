"""The training harness (`lowbit train`): tokenizer, schedules, a short run that learns, bit-identical resume,
the saved model in lowbit.load / transformers / the other commands, and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.train.pretrain import TrainConfig, TrainError, run
from lowbit.train.schedule import schedule_at
from lowbit.train.tokenizer import TokenizerError, train_tokenizer

runner = CliRunner()
SMALL = dict(size="tiny", batch=4, seq=64, vocab=1024, eval_every=10, save_every=10, eval_tokens=2048)
CLI_SMALL = ["--batch", "4", "--seq", "64", "--vocab", "1024", "--eval-every", "25", "--save-every", "25",
             "--threads", "1"]


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def text():
    from lowbit.data import default_text

    return default_text()[:150_000]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(text)
    return path


def test_tokenizer_round_trip_and_size(text):
    tok = train_tokenizer(text, 1024)
    assert len(tok) == 1024
    for s in ["def f(x):\n    return x ** 2\n", "  leading spaces, tabs\tand ünïcødé ✓ 日本語", text[5000:6000]]:
        assert tok.decode(tok(s).input_ids) == s
    assert len(tok(text[:20000]).input_ids) < 20000 / 2.5  # merges learned: well under one token per byte
    again = train_tokenizer(text, 1024)
    assert again.get_vocab() == tok.get_vocab()  # the same text gives the same tokenizer
    with pytest.raises(TokenizerError, match="fills only"):
        train_tokenizer("a short text, a short text.", 4096)
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer(" \n ", 1024)


@pytest.mark.parametrize("kind", ["cosine", "two-stage"])
def test_schedules(kind):
    total, warmup = 400, 40
    lr, wd = zip(*(schedule_at(s, total, warmup, kind) for s in range(total)))
    assert lr[0] < lr[warmup // 2] < lr[warmup - 1] <= 1.0  # warm-up rises to the peak
    half = total // 2
    if kind == "cosine":
        assert all(a >= b for a, b in zip(lr[warmup:], lr[warmup + 1:])) and set(wd) == {1.0}
    else:  # a high first stage, a drop at mid-training, weight decay only before it
        assert all(a >= b for a, b in zip(lr[warmup:half], lr[warmup + 1:half]))
        assert all(a >= b for a, b in zip(lr[half:], lr[half + 1:]))
        assert lr[half] < 0.5 * lr[half - 1]
        assert set(wd[:half]) == {1.0} and set(wd[half:]) == {0.0}
    assert 0 < lr[-1] < 0.2


@pytest.mark.parametrize("bits", ["1.58", "32"])
def test_fifty_steps_of_the_tiny_model_lower_the_loss(tmp_path, text, bits):
    torch.set_num_threads(1)
    s = run(text, tmp_path / "run", TrainConfig(bits=bits, steps=50, **SMALL), progress=False)
    first, last = s["losses"][0], sum(s["losses"][-10:]) / 10
    assert first > 6.5  # about ln(1024): an untrained model
    assert last < first - 0.5, (first, last)  # measured: 6.96 -> 6.07 for b1.58 with one thread
    assert s["evals"][-1]["ppl"] < s["evals"][0]["ppl"]
    if bits == "1.58":  # what is saved (packed, 2 bits a weight) scores what was trained
        assert s["saved_loss_rel_diff"] <= 1e-3


def test_gemma3_architecture_trains_and_reloads_as_gemma3(tmp_path, text):
    torch.set_num_threads(1)
    import lowbit
    from transformers import AutoModelForCausalLM

    s = run(text, tmp_path / "g3", TrainConfig(arch="gemma3", bits="32", steps=30, **SMALL), progress=False)
    assert s["losses"][0] > 6.5 and sum(s["losses"][-5:]) / 5 < s["losses"][0] - 0.5, s["losses"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g3")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    # Gemma's traits are there: the embedding is scaled by sqrt(hidden) and the norms multiply by (1 + w).
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(128 ** 0.5)
    ids = torch.tensor([[5, 17, 300, 2]])
    with torch.no_grad():
        expected = model(ids).logits
        got = lowbit.load(tmp_path / "g3")(ids).logits
    torch.testing.assert_close(got, expected)
    with pytest.raises(TrainError, match="--arch"):
        TrainConfig(arch="mamba").check()
    with pytest.raises(TrainError, match="--precision"):
        TrainConfig(precision="fp8").check()
    with pytest.raises(TrainError, match="bf16 autocast"):
        TrainConfig(bits="16", precision="fp16").check()


def test_width_dropout_and_no_clipping(tmp_path, text):
    torch.set_num_threads(1)
    from lowbit.train.model import SIZES
    from lowbit.train.pretrain import make_model
    from lowbit.train.tokenizer import train_tokenizer

    tok = train_tokenizer(text[:20000], 512)
    wide = make_model(TrainConfig(size="micro", width=2, vocab=512), tok)
    narrow = make_model(TrainConfig(size="micro", vocab=512), tok)
    assert wide.config.hidden_size == 2 * SIZES["micro"]["hidden_size"] == 2 * narrow.config.hidden_size
    assert wide.config.num_attention_heads == 4 and wide.config.intermediate_size == 384
    assert wide.config.hidden_size // wide.config.num_attention_heads == 32  # heads keep their width
    dropped = make_model(TrainConfig(size="micro", bits="32", dropout=0.5, vocab=512), tok)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        dropped.train()
        a, b = dropped(ids).logits, dropped(ids).logits
        dropped.eval()
        c, d = dropped(ids).logits, dropped(ids).logits
    assert not torch.equal(a, b) and torch.equal(c, d)  # dropout in training only
    s = run(text, tmp_path / "noclip", TrainConfig(bits="32", steps=20, clip=None, dropout=0.1,
                                                   **{**SMALL, "size": "micro"}), progress=False)
    assert sum(s["losses"][-5:]) / 5 < s["losses"][0] - 0.5, s["losses"]
    for bad, match in ((dict(clip=0.0), "--clip"), (dict(dropout=1.0), "--dropout"), (dict(width=0.1), "--width")):
        with pytest.raises(TrainError, match=match):
            TrainConfig(**bad).check()


@pytest.mark.parametrize("settings", [dict(bits="1.58", optimizer="adamw8bit"), dict(bits="32", precision="fp16")],
                         ids=["b1.58-adamw8bit", "fp16-loss-scaling"])
def test_interrupted_run_resumes_bit_identically(tmp_path, text, monkeypatch, settings):
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=25, **settings, **SMALL)
    whole = run(text, tmp_path / "whole", cfg, progress=False)

    import lowbit.train.pretrain as pretrain

    real = pretrain.batch_at

    def stop_at_step_17(train, step, c):
        if step == 17:
            raise KeyboardInterrupt
        return real(train, step, c)

    monkeypatch.setattr(pretrain, "batch_at", stop_at_step_17)
    with pytest.raises(KeyboardInterrupt):
        run(text, tmp_path / "cut", cfg, progress=False)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "progress.json").read_text())["step"] == 10
    monkeypatch.setattr(pretrain, "batch_at", real)
    resumed = run(text, tmp_path / "cut", cfg, progress=False)
    assert resumed["losses"] == whole["losses"] and resumed["heldout_ppl"] == whole["heldout_ppl"]
    a = torch.load(tmp_path / "whole" / "checkpoint" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint" / "state.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if cfg.precision == "fp16":  # the loss scale goes on from where it was (it grows while no gradient overflows)
        assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
        assert whole["losses"][-1] < whole["losses"][0] - 0.3
    # Other settings in the same folder: refused, not mixed.
    with pytest.raises(TrainError, match="other settings"):
        run(text, tmp_path / "cut", TrainConfig(bits="1.58", steps=25, lr=1e-3, **SMALL), progress=False)


def test_train_command_output_works_with_lowbit_and_transformers(tmp_path, text_file):
    import lowbit
    from lowbit.nn import BitLinear

    out = tmp_path / "bitnet"
    code, output = cli("train", "--size", "tiny", "--bits", "1.58", "--data", text_file, "--steps", 50, "--out", out,
                       *CLI_SMALL)
    assert code == 0, output
    assert "held-out perplexity" in output
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == 50 and s["tokens_seen"] == 50 * 4 * 64 and (out / "loss.png").stat().st_size > 1000
    model = lowbit.load(out)
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 35 and all(m.input_norm and m.bits_per_param() < 2.01 for m in layers)
    tok = lowbit.load_tokenizer(out)
    ids = tok(text_file.read_text()[-3000:], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert 1 < float(loss) < 7

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits)

    code, output = cli("eval", out, "--text", text_file, "--tokens", 512, "--window", 64, "--no-speed")
    assert code == 0 and "perplexity" in output and "(b1.58-trained)" in output, output
    code, output = cli("quantize", out, "--method", "nf4", "--out", tmp_path / "q")
    assert code == 2 and "BitNet b1.58" in output, output  # ternary already: one clear line
    # GGUF's llama graph has no per-layer input norm: an export would compute something else, so none is written.
    code, output = cli("export", out, "--type", "tq2_0", "--out", tmp_path / "m.gguf")
    assert code == 2 and "normalises its input" in output and not (tmp_path / "m.gguf").exists(), output


def test_bf16_run_saves_bf16_weights_that_score_as_trained(tmp_path, text):
    from safetensors import safe_open

    torch.set_num_threads(1)
    s = run(text, tmp_path / "bf16", TrainConfig(bits="16", steps=5, **SMALL), progress=False)
    assert s["saved_loss_rel_diff"] < 0.01
    shard = next((tmp_path / "bf16").glob("model-*.safetensors"))
    with safe_open(shard, "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}


def test_fp32_output_is_a_transformers_model_the_commands_take(tmp_path, text_file):
    out = tmp_path / "fp"
    code, output = cli("train", "--bits", "32", "--data", text_file, "--steps", 5, "--out", out, *CLI_SMALL)
    assert code == 0, output
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == model.config.vocab_size == 1024
    code, output = cli("quantize", out, "--method", "nf4", "--blocksize", 64, "--out", tmp_path / "q")
    assert code == 0, output
    code, output = cli("outliers", out, "--text", text_file, "--tokens", 256, "--no-ablation", "--out", tmp_path / "o")
    assert code == 0, output


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, text_file):
    short = tmp_path / "short.txt"
    short.write_text("Too short to train on. " * 40)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["--data", empty], "empty"),
        (["--data", short], "fills only"),
        (["--data", short, "--vocab", "260", "--seq", "2048"], "fewer than one sequence"),
        (["--data", text_file, "--size", "huge"], "unknown --size 'huge'"),
        (["--data", text_file, "--bits", "3"], "--bits must be 32, 16 or 1.58"),
        (["--data", text_file, "--vocab", "100000"], "vocabulary size must be in"),
        (["--data", text_file, "--steps", "0"], "--steps must be >= 1"),
        (["--data", tmp_path / "missing.txt"], "not found"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, output = cli("train", "--batch", "2", "--seq", "64", "--vocab", "512", *args, "--out", out)
        assert code == 2 and message in " ".join(output.split()) and output.count("error:") == 1, (args, output)
        assert output.lstrip().startswith("error:"), output
        assert not out.exists() or not any(out.iterdir()), args
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, output = cli("train", "--data", text_file, "--out", taken, "--steps", "1")
    assert code == 2 and "not empty" in output and (taken / "notes.txt").read_text() == "mine", output
