"""lowbit finetune: LoRA adapters on a frozen low-bit model (QLoRA), resumable, with held-out perplexity."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import THREADS_HELP, MODEL_HELP, UserError, app, check_writable_dir, console, friendly, setup, use_threads


@app.command()
@friendly
def finetune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", help="a UTF-8 text file: its first 90% trains, the rest is held out"),
    method: str = typer.Option("nf4", "--method", "-m", help="how to quantize the frozen base (nf4, fp4, int4, int8, "
                               "int8-weight, ternary, ...; fp32: plain LoRA)"),
    rank: int = typer.Option(16, help="LoRA rank"),
    steps: int = typer.Option(200, help="optimizer steps"),
    batch: int = typer.Option(4, help="sequences per step"),
    seq: int = typer.Option(256, help="tokens per sequence"),
    lr: float = typer.Option(2e-4, help="learning rate"),
    optimizer: str = typer.Option("paged-adamw8bit", help="paged-adamw8bit | adamw8bit | adamw"),
    loftq: bool = typer.Option(False, "--loftq", help="start the adapters at the quantization residual (LoftQ)"),
    targets: str = typer.Option(",".join(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
                                help="comma-separated module names to adapt"),
    eval_tokens: int = typer.Option(8192, help="held-out tokens to score before and after"),
    save_every: int = typer.Option(50, help="checkpoint every N steps (a rerun with the same --out resumes)"),
    out: Path = typer.Option(Path("lowbit-finetune"), "--out", "-o", help="folder for the adapter, loss.png, summary.json"),
    seed: int = typer.Option(0, help="seed of the batches and the adapters' initialisation"),
    checkpointing: bool = typer.Option(True, "--checkpointing/--no-checkpointing", help="gradient checkpointing"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Fine-tune LoRA adapters on MODEL quantized by --method, on the text in --data; resumes from --out.

    Example: lowbit finetune smollm2-135m --data notes.txt --steps 200 --out my-adapter
    """
    setup()
    from lowbit.app.finetune import FinetuneConfig, run

    if not data.is_file():
        raise UserError(f"data file not found: {data}")
    cfg = FinetuneConfig(method=method, rank=rank, steps=steps, batch=batch, seq=seq, lr=lr, optimizer=optimizer,
                         loftq=loftq, targets=[t.strip() for t in targets.split(",") if t.strip()],
                         eval_tokens=eval_tokens, save_every=save_every, seed=seed, checkpointing=checkpointing)
    cfg.check()
    check_writable_dir(out)
    use_threads(threads)
    s = run(model, data.read_text(encoding="utf-8", errors="replace"), out, cfg)  # FinetuneError: one line, exit 2
    console.print(f"held-out perplexity {s['ppl_before']:.3f} -> [bold]{s['ppl_after']:.3f}[/] after {s['steps']} steps "
                  f"({s['trainable_params'] / 1e6:.2f}M trainable parameters, {s['step_seconds']:.2f} s/step)")
    console.print(f"written: {out / 'adapter'}, {out / 'loss.png'}, {out / 'summary.json'}  "
                  f"(use it: lowbit eval {model} --method {method} --adapter {out / 'adapter'})")
