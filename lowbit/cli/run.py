"""lowbit run: try a model, as a user types it: its answer streamed token by token, then prefill and decode speed."""
from __future__ import annotations

import sys
import time
from typing import Optional

import typer

from lowbit.cli.common import (THREADS_HELP, MODEL_HELP, UserError, app, ensure_kernels, err, friendly, load, setup,
                               use_threads)


@app.command()
@friendly
def run(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: Optional[str] = typer.Argument(None, help="what to say (none: a chat, one turn a line from stdin)"),
    method: str = typer.Option("fp32", "--method", "-m", help="quantize on the fly first (fp32: as loaded; "
                                                              "`lowbit methods` lists them)"),
    max_new_tokens: int = typer.Option(256, help="the longest answer, in tokens"),
    sample: bool = typer.Option(False, "--sample/--greedy", help="sample the answer (default: greedy)"),
    temperature: float = typer.Option(1.0, help="sampling temperature (with --sample)"),
    top_k: Optional[int] = typer.Option(None, help="sample among the k most likely tokens"),
    top_p: Optional[float] = typer.Option(None, help="sample among the most likely tokens of this total probability"),
    seed: Optional[int] = typer.Option(None, help="the sampling seed (the same seed, the same answer)"),
    raw: bool = typer.Option(False, "--raw", help="give the text to the model as it is, without the chat template"),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Run MODEL on a prompt and stream its answer, then print prefill and decode tokens/s.

    Example: lowbit run smollm2-135m "The capital of France is"
             lowbit run smollm2-135m --method nf4            (a chat: type a line, Ctrl-D to end)
    """
    setup()
    import torch

    import lowbit
    from lowbit.app.methods import LOADED, apply_method, check_method, needs_calibration

    check_method(method)
    if needs_calibration(method):
        raise UserError(f"{method} needs calibration: quantize it once with lowbit quantize, then run the checkpoint")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    use_threads(threads)
    ensure_kernels()
    m, tok = load(model, native=method in LOADED)
    if method not in ("fp32", *LOADED):
        apply_method(m, method, progress=False)
    chat = not raw and bool(getattr(tok, "chat_template", None))
    options = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                   top_p=top_p, generator=None if seed is None else torch.Generator().manual_seed(seed))
    lowbit.generate(m, torch.tensor([[0]]), max_new_tokens=0, **{k: v for k, v in options.items()
                                                                 if k != "max_new_tokens"})  # options checked now
    from lowbit.decode import decode_path  # the CLI imports torch and lowbit only once a command runs


    err.print(f"[dim]decode: {decode_path(m)}[/]")
    if prompt is not None:
        _turn(m, tok, [{"role": "user", "content": prompt}] if chat else prompt, options)
        return
    history: list[dict] = []
    while True:
        if sys.stdin.isatty():
            err.print("[bold]>[/] ", end="")
        line = sys.stdin.readline()
        if not line:
            return
        if not line.strip():
            continue
        if chat:
            history.append({"role": "user", "content": line.strip()})
            history.append({"role": "assistant", "content": _turn(m, tok, history, options)})
        else:
            _turn(m, tok, line.rstrip("\n"), options)


def _turn(model, tok, conversation, options: dict) -> str:
    """Stream the model's continuation of ``conversation`` (chat messages, or plain text) to stdout; its text."""
    import lowbit

    if isinstance(conversation, str):
        ids = tok(conversation, return_tensors="pt").input_ids
    else:
        ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UserError("the prompt has no tokens")
    new: list[int] = []
    shown, times = "", []
    start = time.perf_counter()

    def show(token) -> None:
        nonlocal shown
        times.append(time.perf_counter())
        new.append(int(token[0]))
        # Decoded whole each time: a character may take several tokens, and a token may end only part of one.
        text = tok.decode(new, skip_special_tokens=True)
        if text.startswith(shown) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    lowbit.generate(model, ids, on_token=show, **options)
    text = tok.decode(new, skip_special_tokens=True)
    sys.stdout.write(text[len(shown):] + "\n")
    sys.stdout.flush()
    prefill = ids.shape[1] / (times[0] - start)
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    err.print(f"[dim]prefill {ids.shape[1]} tokens at {prefill:.0f} tok/s (first token after "
              f"{times[0] - start:.2f} s), decode {len(times) - 1} tokens at {decode:.1f} tok/s[/]")
    return text
