"""lowbit train: a small LLaMA-style model from scratch in fp32, bf16 or BitNet b1.58, resumable, with held-out perplexity."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import THREADS_HELP, UserError, app, console, friendly, setup, use_threads, out_path


@app.command()
@friendly
def train(
    data: Path = typer.Option(..., "--data", help="a UTF-8 text file: its first 90% trains, the rest is held out"),
    size: str = typer.Option("tiny", help="tiny (1M), small (5M) or base (20M non-embedding parameters)"),
    bits: str = typer.Option("1.58", help="weights: 32 (fp32), 16 (bf16 compute) or 1.58 (BitNet b1.58 ternary)"),
    steps: int = typer.Option(500, help="optimizer steps"),
    batch: int = typer.Option(16, help="sequences per step"),
    seq: int = typer.Option(256, help="tokens per sequence (and the model's context length)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (default 2e-3; 4e-3 for 1.58)"),
    schedule: Optional[str] = typer.Option(None, help="cosine | two-stage (default: two-stage for 1.58, else cosine)"),
    warmup: Optional[int] = typer.Option(None, help="warm-up steps (default: a tenth of --steps, at most 100)"),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay on matrices"),
    optimizer: str = typer.Option("adamw", help="adamw | adamw8bit (lowbit's 8-bit state)"),
    vocab: int = typer.Option(4096, help="BPE vocabulary trained on the text"),
    tokenizer: Optional[Path] = typer.Option(None, help="use this saved tokenizer folder instead of training one"),
    eval_every: int = typer.Option(100, help="held-out perplexity every N steps"),
    save_every: int = typer.Option(100, help="save the model and a checkpoint every N steps (a rerun resumes)"),
    out_arg: str = typer.Option("lowbit-model", "--out", "-o", metavar="PATH",
                                help="folder for the model, its tokenizer, "
                                     "checkpoint/, loss.png and summary.json"),
    seed: int = typer.Option(0, help="seed of the initialisation and the batches"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Train a small LLaMA-style model from scratch on the text in --data; a rerun with the same --out resumes.

    Example: lowbit train --size tiny --bits 1.58 --data notes.txt --steps 500 --out my-bitnet
    """
    setup()
    out = out_path(out_arg)
    from lowbit.train.pretrain import TrainConfig, run

    if not data.is_file():
        raise UserError(f"data file not found: {data}")
    cfg = TrainConfig(size=size, bits=bits, steps=steps, batch=batch, seq=seq, lr=lr, warmup=warmup, schedule=schedule,
                      weight_decay=weight_decay, optimizer=optimizer, vocab=vocab, eval_every=eval_every,
                      save_every=save_every, seed=seed)
    cfg.check()
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        if not (tokenizer / "tokenizer.json").is_file():
            raise UserError(f"--tokenizer {tokenizer}: no tokenizer.json there")
        tok = AutoTokenizer.from_pretrained(tokenizer)
    use_threads(threads)
    s = run(data.read_text(encoding="utf-8", errors="replace"), out, cfg, tokenizer=tok)
    saved = f" (saved {'packed ternary' if cfg.bits == '1.58' else 'bf16'}: {s['heldout_ppl_saved']:.3f})" \
        if "heldout_ppl_saved" in s else ""
    console.print(f"{cfg.size} model ({s['non_embedding_params'] / 1e6:.2f}M non-embedding parameters), "
                  f"{cfg.bits}-bit weights: held-out perplexity [bold]{s['heldout_ppl']:.3f}[/]{saved} after "
                  f"{s['step']} steps, {s['tokens_seen']:,} tokens, {s['tokens_seen'] / s['train_seconds']:.0f} tokens/s")
    console.print(f"written: {out} (lowbit.load('{out}'), lowbit eval {out}), {out / 'loss.png'}, {out / 'summary.json'}")
