"""lowbit train: a small LLaMA-style model from scratch in fp32, bf16 or BitNet b1.58, resumable, with held-out perplexity."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import THREADS_HELP, UserError, app, console, friendly, setup, use_threads, out_path


@app.command()
@friendly
def train(
    data: list[Path] = typer.Option(..., "--data", help="UTF-8 text files (repeat --data; the first 90% of their "
                                    "text trains, the rest is held out), or a corpus folder built by "
                                    "scripts/build_corpus.py (its own split and tokenizer)"),
    size: str = typer.Option("tiny", help="micro (0.2M), mini (0.5M), tiny (1M), small (5M) or base (20M "
                             "non-embedding parameters)"),
    width: float = typer.Option(1.0, help="hidden and MLP widths times this (2: a b1.58 model as wide as small "
                                "ternary models want)"),
    arch: str = typer.Option("llama", help="llama | gemma3 (scaled embedding, (1 + w) norms, GELU MLP)"),
    bits: str = typer.Option("1.58", help="weights: 32 (fp32), 16 (bf16 compute) or 1.58 (BitNet b1.58 ternary)"),
    steps: int = typer.Option(500, help="optimizer steps"),
    batch: int = typer.Option(16, help="sequences per step"),
    seq: int = typer.Option(256, help="tokens per sequence (and the model's context length)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (default 2e-3; 4e-3 for 1.58)"),
    schedule: Optional[str] = typer.Option(None, help="cosine | two-stage (default: two-stage for 1.58, else cosine)"),
    warmup: Optional[int] = typer.Option(None, help="warm-up steps (default: a tenth of --steps, at most 100)"),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay on matrices"),
    clip: float = typer.Option(1.0, help="clip the gradient norm to this (0: no clipping)"),
    dropout: float = typer.Option(0.0, help="dropout on attention and on each block's residual branches"),
    optimizer: str = typer.Option("adamw", help="adamw | adamw8bit (lowbit's 8-bit state)"),
    vocab: int = typer.Option(4096, help="BPE vocabulary trained on the text"),
    tokenizer: Optional[Path] = typer.Option(None, help="use this saved tokenizer folder instead of training one"),
    eval_every: int = typer.Option(100, help="held-out perplexity every N steps"),
    save_every: int = typer.Option(100, help="save the model and a checkpoint every N steps (a rerun resumes)"),
    out_arg: str = typer.Option("lowbit-model", "--out", "-o", metavar="PATH",
                                help="folder for the model, its tokenizer, "
                                     "checkpoint/, loss.png and summary.json"),
    seed: int = typer.Option(0, help="seed of the initialisation and the batches"),
    precision: Optional[str] = typer.Option(None, help="compute dtype: fp32 | bf16 (autocast; the default for --bits "
                                            "16) | fp16 (autocast with loss scaling); weights stay fp32"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the training step: about a minute to "
                                  "compile, then faster steps (benchmarks/bench_train_speed.py)"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Train a small LLaMA-style (or Gemma3) model from scratch on --data; a rerun with the same --out resumes.

    Example: lowbit train --size tiny --bits 1.58 --data notes.txt --steps 500 --out my-bitnet
    """
    setup()
    out = out_path(out_arg)
    from lowbit.train.pretrain import TrainConfig, run

    from lowbit.train import corpus

    for path in data:
        if not path.exists():
            raise UserError(f"--data {path}: not found")
        if not path.is_file() and not corpus.is_corpus(path):
            raise UserError(f"--data {path}: neither a text file nor a built corpus folder (one with corpus.json)")
    tokens = None
    if any(corpus.is_corpus(p) for p in data):
        if len(data) > 1:
            raise UserError("--data: a corpus folder is used alone (it holds its own tokenizer and split)")
        if tokenizer is not None:
            raise UserError("--tokenizer: a corpus folder brings its own tokenizer; leave --tokenizer out")
        try:
            tokens = corpus.load(data[0])
        except corpus.CorpusError as e:
            raise UserError(str(e)) from None
        vocab = len(tokens[0])
    cfg = TrainConfig(size=size, arch=arch, width=width, bits=bits, steps=steps, batch=batch, seq=seq, lr=lr,
                      warmup=warmup, schedule=schedule, weight_decay=weight_decay, clip=clip or None, dropout=dropout,
                      optimizer=optimizer, vocab=vocab, eval_every=eval_every, save_every=save_every, seed=seed,
                      compile=compile_, precision=precision)
    cfg.check()
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        if not (tokenizer / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {tokenizer}: no tokenizer.json there")
        tok = AutoTokenizer.from_pretrained(tokenizer)
    use_threads(threads)
    text = None if tokens else "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in data)
    s = run(text, out, cfg, tokenizer=tok, tokens=tokens)
    saved = f" (saved {'packed ternary' if cfg.bits == '1.58' else 'bf16'}: {s['heldout_ppl_saved']:.3f})" \
        if "heldout_ppl_saved" in s else ""
    console.print(f"{cfg.size} model ({s['non_embedding_params'] / 1e6:.2f}M non-embedding parameters), "
                  f"{cfg.bits}-bit weights: held-out perplexity [bold]{s['heldout_ppl']:.3f}[/]{saved} after "
                  f"{s['step']} steps, {s['tokens_seen']:,} tokens, {s['tokens_seen'] / s['train_seconds']:.0f} tokens/s")
    console.print(f"written: {out} (lowbit.load('{out}'), lowbit eval {out}), {out / 'loss.png'}, {out / 'summary.json'}")
