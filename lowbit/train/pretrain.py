"""Training small LLaMA-style (or Gemma3) models from scratch (`lowbit train`): fp32, bf16 or BitNet b1.58 weights,
in fp32, bf16 or fp16 compute, a BPE tokenizer trained on the text (or a built corpus), deterministic batches,
atomic checkpoints that resume bit-identically, held-out perplexity as it goes, and the result saved where
lowbit.load and transformers read it."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from lowbit.train.bitnet import pack_bitnet, to_bitnet
from lowbit.train.loop import batch_at, heldout_perplexity, plot_losses, read_checkpoint, resume_threads, write_checkpoint
from lowbit.train.model import ARCHS, SIZES, build_model, non_embedding_params, residual_dropout
from lowbit.train.schedule import SCHEDULES, schedule_at
from lowbit.train.tokenizer import train_tokenizer

BITS = ("32", "16", "1.58")
PRECISIONS = ("fp32", "bf16", "fp16")  # the compute dtype of the forward and backward (weights stay fp32)
DEFAULT_LR = {"32": 2e-3, "16": 2e-3, "1.58": 4e-3}  # b1.58 wants a higher rate (Ma et al. 2024, training tips)


class TrainError(ValueError):
    """Bad input or a run that cannot go on (one line for the user)."""


@dataclass
class TrainConfig:
    size: str = "tiny"
    arch: str = "llama"  # or "gemma3"
    width: float = 1.0  # hidden and MLP widths times this (heads keep their width)
    bits: str = "1.58"  # "32" fp32, "16" bf16 autocast on fp32 master weights, "1.58" BitNet b1.58
    steps: int = 500
    batch: int = 16
    seq: int = 256
    lr: float | None = None  # default DEFAULT_LR[bits]
    warmup: int | None = None  # default: a tenth of the steps, at most 100
    schedule: str | None = None  # default: two-stage for 1.58, cosine otherwise
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # or adamw8bit (lowbit's blockwise 8-bit state)
    clip: float | None = 1.0  # None: no clipping
    dropout: float = 0.0  # on attention probabilities and on each block's two residual branches, in training
    vocab: int = 4096
    heldout: float = 0.1  # the last 10% of the text is held out
    eval_every: int = 100
    eval_tokens: int = 16384  # held-out tokens scored during training (the final score uses all)
    save_every: int = 100
    seed: int = 0
    compile: bool = False  # torch.compile the forward (and so the backward): faster steps after a minute's compile
    precision: str | None = None  # autocast: fp32 (none), bf16, or fp16 with loss scaling; default bf16 for bits 16

    def __post_init__(self) -> None:
        self.bits = {"1.6": "1.58", "b1.58": "1.58", "fp32": "32", "bf16": "16"}.get(str(self.bits), str(self.bits))
        self.lr = DEFAULT_LR.get(self.bits, 2e-3) if self.lr is None else self.lr
        self.warmup = min(100, self.steps // 10) if self.warmup is None else self.warmup
        self.schedule = self.schedule or ("two-stage" if self.bits == "1.58" else "cosine")
        self.precision = self.precision or ("bf16" if self.bits == "16" else "fp32")

    def check(self) -> None:
        if self.size not in SIZES:
            raise TrainError(f"unknown --size {self.size!r}: one of {', '.join(SIZES)}")
        if self.arch not in ARCHS:
            raise TrainError(f"unknown --arch {self.arch!r}: one of {', '.join(ARCHS)}")
        if self.bits not in BITS:
            raise TrainError(f"--bits must be 32, 16 or 1.58, got {self.bits!r}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.bits == "16" and self.precision != "bf16":
            raise TrainError("--bits 16 trains with bf16 autocast: leave --precision out (or give bf16)")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise TrainError(f"--optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        for name in ("steps", "batch", "eval_every", "save_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq < 2:
            raise TrainError(f"--seq must be >= 2, got {self.seq}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.weight_decay < 0 or self.warmup < 0:
            raise TrainError("--lr must be positive, --weight-decay and --warmup non-negative")
        if self.clip is not None and not self.clip > 0:
            raise TrainError(f"--clip must be positive (or off), got {self.clip}")
        if not 0 <= self.dropout < 1:
            raise TrainError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.25 <= self.width <= 8:
            raise TrainError(f"--width must be in [0.25, 8], got {self.width}")
        if not 0 < self.heldout < 1:
            raise TrainError(f"heldout must be in (0, 1), got {self.heldout}")


def split_text(text: str, heldout: float) -> tuple[str, str]:
    """(training text, held-out text): the cut at the first line break after (1 - heldout) of the characters."""
    cut = int(len(text) * (1 - heldout))
    nl = text.find("\n", cut)
    cut = nl + 1 if 0 <= nl < len(text) - 1 else cut
    return text[:cut], text[cut:]


def prepare_data(text: str, cfg: TrainConfig, tokenizer=None):
    """(tokenizer, training ids, held-out ids); trains the tokenizer on the training text unless given one."""
    if not text.strip():
        raise TrainError("the training text is empty")
    train_text, held_text = split_text(text, cfg.heldout)
    tok = tokenizer if tokenizer is not None else train_tokenizer(train_text, cfg.vocab)
    train = torch.tensor(tok(train_text, verbose=False).input_ids, dtype=torch.long)
    held = torch.tensor(tok(held_text, verbose=False).input_ids, dtype=torch.long)
    if train.numel() < cfg.seq + 1:
        raise TrainError(f"the training text has {train.numel()} tokens, fewer than one sequence ({cfg.seq} + 1): "
                         "give a longer text or a smaller --seq")
    if held.numel() < 2:
        raise TrainError("the held-out part of the text has fewer than 2 tokens: give a longer text")
    return tok, train, held


def make_model(cfg: TrainConfig, tok):
    model = build_model(cfg.size, len(tok), cfg.seq, tok.bos_token_id, tok.eos_token_id, cfg.seed, cfg.arch,
                        cfg.width)
    if cfg.dropout:
        residual_dropout(model, cfg.dropout)
    return to_bitnet(model) if cfg.bits == "1.58" else model


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only (not on norm gains)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw8bit":
        from lowbit.optim import AdamW8bit

        return AdamW8bit(groups, lr=cfg.lr, betas=(0.9, 0.95))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)  # one kernel: 2.5x faster here


def inference_model(model, cfg: TrainConfig):
    """A copy of ``model`` as it is saved: packed ternary for 1.58, bf16 for 16, as is for 32."""
    out = copy.deepcopy(model).eval()
    if cfg.bits == "1.58":
        return pack_bitnet(out)
    return out.to(torch.bfloat16) if cfg.bits == "16" else out


def save_model(out: Path, model, tok, cfg: TrainConfig):
    """Save ``model`` as ``inference_model`` makes it into ``out``; returns that saved form."""
    import lowbit

    saved = inference_model(model, cfg)
    lowbit.save(saved, out, tokenizer=tok)
    return saved


def load_state(out: Path, model, opt, scaler=None) -> dict | None:
    """Restore latent weights and optimizer state from out/checkpoint; its progress, or None without one."""
    saved = read_checkpoint(out)
    if saved is None:
        return None
    progress, state = saved
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise TrainError(f"{out / 'checkpoint'} holds another model (size, arch or bits): use another --out") from None
    opt.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return progress


def check_out(out: Path) -> None:
    """Refuse an --out that is a file or a folder of something else before any work."""
    from lowbit.checkpoint import MANIFEST, check_target

    if out.is_dir() and (out / "checkpoint" / "progress.json").is_file() and not (out / MANIFEST).is_file():
        return  # a run stopped after its first checkpoint state but before its first model save
    check_target(out)


def _autocast(cfg: TrainConfig):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


def make_scaler(cfg: TrainConfig):
    """fp16's dynamic loss scaling (its gradients underflow without it); None for the other precisions."""
    return torch.amp.GradScaler("cpu") if cfg.precision == "fp16" else None


def train_step(forward, model, opt: torch.optim.Optimizer, batch: torch.Tensor, cfg: TrainConfig,
               scaler=None) -> torch.Tensor:
    """One optimizer step on ``batch``: the loss by ``forward`` (``model`` or its torch.compile), backward,
    clipping, the optimizer (through ``scaler``, fp16's loss scaling, when given); returns the loss (a non-finite
    loss takes no step)."""
    with _autocast(cfg):
        loss = forward(batch, labels=batch).loss
    if torch.isfinite(loss):
        if scaler is None:
            loss.backward()
            if cfg.clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
        else:  # unscale before clipping; the scaler skips the step when a gradient overflowed
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if cfg.clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            scaler.step(opt)
            scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def data_fingerprint(train: torch.Tensor, held: torch.Tensor) -> str:
    """A hash of the token ids (both parts, and so of the tokenizer that made them): a run resumes on its own data."""
    h = hashlib.sha256()
    for ids in (train, held):
        h.update(str(ids.numel()).encode())
        h.update(ids.to(torch.int32).numpy().tobytes())
    return h.hexdigest()[:16]


def run(text: str | None, out: str | Path, cfg: TrainConfig, tokenizer=None, progress: bool = True,
        tokens: tuple | None = None, on_save: Callable[[int, torch.nn.Module], None] | None = None) -> dict:
    """Train on ``text`` (or on ``tokens``: a built corpus' (tokenizer, training ids, held-out ids), from
    lowbit.train.corpus.load) into ``out`` (model, tokenizer, checkpoint/, loss.png, summary.json); resumes from
    ``out``. ``on_save(step, saved model)`` runs after each save (a study's snapshots). Returns the summary."""
    cfg.check()
    out = Path(out)
    check_out(out)
    tok, train, held = tokens if tokens is not None else prepare_data(text, cfg, tokenizer)
    if train.numel() < cfg.seq + 1 or held.numel() < 2:
        raise TrainError(f"{train.numel()} training and {held.numel()} held-out tokens: too few for --seq {cfg.seq}")
    fingerprint = data_fingerprint(train, held)
    model = make_model(cfg, tok)
    opt = make_optimizer(model, cfg)
    scaler = make_scaler(cfg)
    state = load_state(out, model, opt, scaler)
    if state is not None:
        older = {"arch": "llama", "width": 1.0, "dropout": 0.0,  # fields added since: what older runs used
                 "precision": "bf16" if state["config"].get("bits") == "16" else "fp32"}
        # more --steps may extend a run; --compile changes the speed, not the step
        if {**older, **state["config"], "steps": cfg.steps, "compile": cfg.compile} != asdict(cfg):
            raise TrainError(f"{out}/checkpoint was written with other settings ({state['config']}): use another --out")
        if state.get("data", fingerprint) != fingerprint:
            raise TrainError(f"{out}/checkpoint was trained on other data (another text, corpus or tokenizer): "
                             "use another --out")
        resume_threads(state["threads"])
    else:
        state = {"config": asdict(cfg), "step": 0, "losses": [], "evals": [], "train_seconds": 0.0,
                 "tokens_seen": 0, "threads": torch.get_num_threads(), "data": fingerprint}
    step = state["step"]
    forward = torch.compile(model) if cfg.compile else model  # ``model`` itself is what is saved and scored
    tokens_per_step = cfg.batch * cfg.seq
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"training {cfg.size} b{cfg.bits}", disable=None if progress else True,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    saved = None  # the saved form of the model at the last step, once this process saved it
    while step < cfg.steps:
        lr_factor, wd_factor = schedule_at(step, cfg.steps, cfg.warmup, cfg.schedule)
        for group, wd in zip(opt.param_groups, (cfg.weight_decay, 0.0)):
            group["lr"], group["weight_decay"] = cfg.lr * lr_factor, wd * wd_factor
        loss = train_step(forward, model, opt, batch_at(train, step, cfg), cfg, scaler)
        if not torch.isfinite(loss):
            bar.close()
            raise TrainError(f"the loss became {loss.item()} at step {step + 1}: stopped (last checkpoint at step "
                             f"{state['step'] if (out / 'checkpoint').exists() else 'none'}; try a lower --lr)")
        step += 1
        state["losses"].append(loss.item())
        state["tokens_seen"] += tokens_per_step
        elapsed = state["train_seconds"] + time.perf_counter() - t0
        bar.update(1)
        postfix = {"loss": f"{state['losses'][-1]:.3f}", "tok/s": f"{state['tokens_seen'] / max(elapsed, 1e-9):.0f}"}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with _autocast(cfg):
                ppl = heldout_perplexity(model, held, cfg.seq, cfg.eval_tokens)
            state["evals"].append({"step": step, "tokens": state["tokens_seen"], "ppl": ppl})
        if state["evals"]:
            postfix["held-out ppl"] = f"{state['evals'][-1]['ppl']:.2f}"
        bar.set_postfix(postfix)
        if step % cfg.save_every == 0 or step == cfg.steps:
            state["train_seconds"] += time.perf_counter() - t0
            state["step"] = step
            saved = save_model(out, model, tok, cfg)  # the model first: a checkpoint never points past a saved model
            extra = {} if scaler is None else {"scaler": scaler.state_dict()}
            write_checkpoint(out, {"model": model.state_dict(), "optimizer": opt.state_dict(), **extra}, state)
            if on_save is not None:
                on_save(step, saved)
            t0 = time.perf_counter()
    bar.close()
    state["train_tokens"] = train.numel()
    return finish(out, model, tok, held, cfg, state, saved)


def finish(out: Path, model, tok, held: torch.Tensor, cfg: TrainConfig, state: dict, saved=None) -> dict:
    """Score the trained model (and ``saved``, its saved form, made again if not given) on all held-out tokens;
    write loss.png and summary.json."""
    with _autocast(cfg):
        ppl = heldout_perplexity(model, held, cfg.seq, held.numel())
    summary = {**{k: v for k, v in state.items() if k != "losses"}, "size": cfg.size, "bits": cfg.bits,
               "params": sum(p.numel() for p in model.parameters()), "non_embedding_params": non_embedding_params(model),
               "heldout_tokens": held.numel(), "heldout_ppl": ppl,
               "final_loss": state["losses"][-1] if state["losses"] else None, "vocab": len(tok),
               "losses": state["losses"]}
    if cfg.bits != "32":  # the saved form (packed ternary or bf16) scored too: what a user of --out gets
        saved = saved if saved is not None else inference_model(model, cfg)
        summary["heldout_ppl_saved"] = heldout_perplexity(saved, held, cfg.seq, held.numel())
        summary["saved_loss_rel_diff"] = abs(math.log(summary["heldout_ppl_saved"]) - math.log(ppl)) / math.log(ppl)
    plot_losses(state["losses"], out / "loss.png", f"{cfg.size} model, {cfg.bits}-bit weights, from scratch")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
