"""What the training runs share (`lowbit finetune`, `lowbit train`): deterministic batches, held-out perplexity,
atomic checkpoint folders and the loss plot."""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch


def batch_at(train: torch.Tensor, step: int, cfg) -> torch.Tensor:
    """Batch ``step``: random windows drawn from a generator seeded by (seed, step), so a resumed run sees the
    same batches as an uninterrupted one."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, train.numel() - cfg.seq, (cfg.batch,), generator=g)
    return torch.stack([train[s:s + cfg.seq].long() for s in starts.tolist()])  # a corpus' ids are uint16


@torch.no_grad()
def heldout_perplexity(model, ids: torch.Tensor, window: int, max_tokens: int) -> float:
    """exp(mean NLL) over non-overlapping windows of the held-out tokens; with more than ``max_tokens`` of them, over
    about ``max_tokens`` tokens in windows spread evenly across all of them (a corpus' held-out ids run source by
    source: its first tokens are one source)."""
    was_training = model.training
    model.eval()
    n = ids.numel()
    if n > max_tokens + 1:
        starts = torch.linspace(0, n - window - 2, max(1, max_tokens // window)).long().tolist() if n > window + 2 \
            else [0]
    else:
        starts = range(0, n - 1, window)
    nll, count = 0.0, 0
    for start in starts:
        chunk = ids[start:start + window + 1].long().unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1]).logits[0].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    model.train(was_training)
    return math.exp(nll / count)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` at ``final``; a crash leaves either folder whole (or ``final``.old)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="loss per step")
    k = max(1, len(losses) // 20)
    if len(losses) >= k:
        smooth = torch.tensor(losses).unfold(0, k, 1).mean(1)
        ax.plot(range(k, len(losses) + 1), smooth.tolist(), lw=2, label=f"mean of {k} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_checkpoint(out: Path, state: dict, progress: dict, also: Callable[[Path], None] | None = None) -> None:
    """out/checkpoint/: ``state`` (tensors, torch.save), ``progress`` (JSON) and whatever ``also(folder)`` writes,
    replaced atomically."""
    tmp = out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if also is not None:
        also(tmp)
    torch.save(state, tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps(progress))
    replace_dir(tmp, out / "checkpoint")


def read_checkpoint(out: Path) -> tuple[dict, dict] | None:
    """(progress, state) from out/checkpoint, or None without one."""
    ck = out / "checkpoint"
    if not (ck / "progress.json").is_file():
        return None
    return json.loads((ck / "progress.json").read_text()), torch.load(ck / "state.pt", weights_only=True)


def resume_threads(recorded: int | None) -> None:
    """Go on with the thread count a run started with: float sums split over another number of threads round
    differently, and the run would not resume bit-identically."""
    if recorded and recorded != torch.get_num_threads():
        warnings.warn(f"resuming with {recorded} threads, as this run started (not {torch.get_num_threads()}): "
                      "results depend on the thread count", stacklevel=3)
        torch.set_num_threads(recorded)
