"""lowbit finetune: LoRA adapters on a frozen low-bit model (QLoRA), resumable, with held-out perplexity."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import THREADS_HELP, MODEL_HELP, UserError, app, check_writable_dir, console, friendly, setup, use_threads, out_path


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
    eval_every: int = typer.Option(0, help="held-out perplexity every N steps as well (0: before and after only)"),
    patience: int = typer.Option(0, help="stop once N evaluations in a row (--eval-every) did not improve on the "
                                 "best, and keep the best adapter (0: run all --steps)"),
    save_every: int = typer.Option(50, help="checkpoint every N steps (a rerun with the same --out resumes)"),
    out_arg: str = typer.Option("lowbit-finetune", "--out", "-o", metavar="PATH",
                                help="folder for the adapter, loss.png, summary.json"),
    seed: int = typer.Option(0, help="seed of the batches and the adapters' initialisation"),
    checkpointing: bool = typer.Option(True, "--checkpointing/--no-checkpointing", help="gradient checkpointing"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    nproc: int = typer.Option(1, help="processes, started by torchrun (gloo, CPUs): each takes its rows of every "
                                      "batch; the same losses as one process"),
    parallel: str = typer.Option("ddp", help="ddp (each process holds the model) | fsdp (torch's fully_shard: the "
                                              "quantized base is split over the processes)"),
) -> None:
    """Fine-tune LoRA adapters on MODEL quantized by --method, on the text in --data; resumes from --out.

    Example: lowbit finetune smollm2-135m --data notes.txt --steps 200 --out my-adapter
    (on 2 processes: add --nproc 2 --parallel fsdp, or run torchrun --nproc_per_node 2 -m lowbit finetune ...)
    """
    setup()
    out = out_path(out_arg)
    from lowbit.app.finetune import FinetuneConfig, run

    if not data.is_file():
        raise UserError(f"data file not found: {data}")
    cfg = FinetuneConfig(method=method, rank=rank, steps=steps, batch=batch, seq=seq, lr=lr, optimizer=optimizer,
                         loftq=loftq, targets=[t.strip() for t in targets.split(",") if t.strip()],
                         eval_tokens=eval_tokens, eval_every=eval_every, patience=patience, save_every=save_every,
                         seed=seed, checkpointing=checkpointing, parallel=parallel)
    cfg.check()
    check_writable_dir(out)
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        if batch % nproc:
            raise UserError(f"--batch {batch} must split evenly over --nproc {nproc} processes")
        raise typer.Exit(_torchrun(nproc, threads))
    rank0 = os.environ.get("RANK", "0") == "0"
    if threads is None and "WORLD_SIZE" in os.environ and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])  # the launcher's share of the cores, not all idle ones
    use_threads(threads)
    s = run(model, data.read_text(encoding="utf-8", errors="replace"), out, cfg)  # FinetuneError: one line, exit 2
    if not rank0:
        return
    best = f" (best at step {s['best_step']}, kept)" if patience and s.get("evals") else ""
    console.print(f"held-out perplexity {s['ppl_before']:.3f} -> [bold]{s['ppl_after']:.3f}[/]{best} after "
                  f"{s['steps']} steps "
                  f"({s['trainable_params'] / 1e6:.2f}M trainable parameters, {s['step_seconds']:.2f} s/step)")
    console.print(f"written: {out / 'adapter'}, {out / 'loss.png'}, {out / 'summary.json'}  "
                  f"(use it: lowbit eval {model} --method {method} --adapter {out / 'adapter'})")


def _torchrun(nproc: int, threads: Optional[int]) -> int:
    """Run this same command under torchrun on ``nproc`` processes (without --nproc); its exit code."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cores = threads or max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(cores)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "lowbit"]
    return subprocess.call(cmd + args, env=env)
