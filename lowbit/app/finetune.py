"""QLoRA fine-tuning as the `lowbit finetune` command runs it: split a text, train LoRA adapters on a frozen (low-bit)
base with deterministic batches, checkpoint atomically, resume bit-identically, report held-out perplexity."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lowbit.train.loop import (batch_at, heldout_perplexity, plot_losses, read_checkpoint,  # noqa: F401 (benchmarks)
                               resume_threads, write_checkpoint)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FinetuneError(ValueError):
    """Bad input or a run that cannot go on (one line for the user)."""


@dataclass
class FinetuneConfig:
    method: str = "nf4"  # any quantization method name of `lowbit quantize`, or fp32 (plain LoRA)
    rank: int = 16
    alpha: float | None = None  # default 2 * rank
    steps: int = 200
    batch: int = 4
    seq: int = 256
    lr: float = 2e-4
    heldout: float = 0.1  # the last 10% of the text's tokens are held out
    optimizer: str = "paged-adamw8bit"  # or adamw8bit, adamw
    loftq: bool = False
    loftq_iters: int = 2
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    eval_tokens: int = 8192
    eval_every: int = 0  # held-out perplexity every N steps too (0: before and after only)
    patience: int = 0  # stop once this many evaluations in a row did not improve on the best; keep the best adapter
    save_every: int = 50
    seed: int = 0
    checkpointing: bool = True
    parallel: str = "ddp"  # how several processes (torchrun) share the work: ddp or fsdp (lowbit.train.distributed)

    def check(self) -> None:
        if self.steps < 1:
            raise FinetuneError(f"--steps must be >= 1, got {self.steps}")
        if self.eval_every < 0 or self.patience < 0:
            raise FinetuneError("--eval-every and --patience must be >= 0")
        if self.patience and not self.eval_every:
            raise FinetuneError("--patience counts evaluations: give --eval-every too")
        if self.rank < 1:
            raise FinetuneError(f"--rank must be >= 1, got {self.rank}")
        if self.batch < 1 or self.seq < 2:
            raise FinetuneError("--batch must be >= 1 and --seq >= 2")
        if not 0 < self.heldout < 1:
            raise FinetuneError(f"--heldout must be in (0, 1), got {self.heldout}")
        if self.optimizer not in ("paged-adamw8bit", "adamw8bit", "adamw"):
            raise FinetuneError(f"--optimizer must be paged-adamw8bit, adamw8bit or adamw, got {self.optimizer!r}")
        if self.loftq and self.method not in ("nf4", "fp4", "int4"):
            raise FinetuneError("--loftq needs a 4-bit method (nf4, fp4, int4)")
        from lowbit.train.distributed import PARALLEL

        if self.parallel not in PARALLEL:
            raise FinetuneError(f"--parallel must be {' or '.join(PARALLEL)}, got {self.parallel!r}")


def split_tokens(ids: torch.Tensor, heldout: float, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (1 - heldout) of the tokens to train on, the rest held out; refuses texts too short for either."""
    cut = int(ids.numel() * (1 - heldout))
    train, held = ids[:cut], ids[cut:]
    if train.numel() < seq + 1:
        raise FinetuneError(f"the training part of the text has {train.numel()} tokens, fewer than one training "
                            f"sequence ({seq} + 1): give a longer text or a smaller --seq")
    if held.numel() < 2:
        raise FinetuneError("the held-out part of the text has fewer than 2 tokens: give a longer text")
    return train, held


def build_model(spec: str, cfg: FinetuneConfig):
    """(peft model, tokenizer): the base quantized by ``cfg.method``, prepared, with fresh or LoftQ adapters."""
    import peft

    import lowbit
    from lowbit.app.methods import apply_method, check_method, method_config, needs_calibration
    from lowbit.app.models import load_model

    check_method(cfg.method)
    if needs_calibration(cfg.method):
        raise FinetuneError(f"{cfg.method} needs calibration data: quantize with `lowbit quantize` first and fine-tune "
                            "the checkpoint with --method fp32")
    model, tok = load_model(spec)
    torch.manual_seed(cfg.seed)
    lora_config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or 2 * cfg.rank, target_modules=cfg.targets,
                                  lora_dropout=0.0)
    if cfg.loftq:
        from lowbit.train import loftq

        model = loftq(model, method_config(cfg.method), lora_config, cfg.loftq_iters, progress=False)
        lowbit.prepare_for_training(model.get_base_model(), cfg.checkpointing)  # leaves the adapters trainable
        return model, tok
    if cfg.method != "fp32":
        apply_method(model, cfg.method, progress=False)
    if any(isinstance(m, lowbit.nn.QuantLinear) for m in model.modules()):
        lowbit.prepare_for_training(model, cfg.checkpointing)
    else:  # plain LoRA on a full-precision base
        model.requires_grad_(False)
        model.enable_input_require_grads()
        if cfg.checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        return peft.get_peft_model(model, lora_config), tok
    except ValueError as e:  # PEFT: target modules that match nothing
        raise FinetuneError(str(e).splitlines()[0]) from None


def make_optimizer(params, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    from lowbit.optim import AdamW8bit

    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    return AdamW8bit(params, lr=cfg.lr, weight_decay=0.0, paged=cfg.optimizer == "paged-adamw8bit")


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, model, opt, step: int, losses: list[float], extra: dict) -> None:
    """out/checkpoint/: adapter (PEFT format), optimizer state and progress, replaced atomically."""
    write_checkpoint(out, {"optimizer": opt.state_dict(), "adapter": _adapter_state(model)},
                     {"step": step, "losses": losses, **extra}, also=lambda tmp: model.save_pretrained(tmp / "adapter"))


def load_adapter(model, adapter: dict[str, torch.Tensor], where: Path) -> None:
    """Copy saved adapter tensors (``_adapter_state``'s form) into ``model``; one line if they belong elsewhere."""
    params = dict(model.named_parameters())
    if set(adapter) != {n for n, p in params.items() if p.requires_grad}:
        raise FinetuneError(f"{where} holds an adapter for another model, method or rank: use another --out")
    with torch.no_grad():
        for name, value in adapter.items():
            if params[name].shape != value.shape:
                raise FinetuneError(f"{where}: adapter tensor {name} has shape {tuple(value.shape)}, this run "
                                    f"{tuple(params[name].shape)} (another --rank?): use another --out")
            params[name].copy_(value)


def load_checkpoint(out: Path, model, opt) -> tuple[int, list[float], dict]:
    """Restore adapter and optimizer from out/checkpoint; (step, losses, extra) or (0, [], {}) without one."""
    ck = out / "checkpoint"
    saved = read_checkpoint(out)
    if saved is None:
        return 0, [], {}
    progress, state = saved
    load_adapter(model, state["adapter"], ck)
    opt.load_state_dict(state["optimizer"])
    return progress["step"], progress["losses"], {k: v for k, v in progress.items() if k not in ("step", "losses")}


def run(spec: str, text: str, out: Path, cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Fine-tune adapters on ``text`` and write out/adapter, out/loss.png, out/summary.json; resume from out/.
    Returns the summary."""
    return train(spec, text, out, cfg, progress)[0]


def train(spec: str, text: str, out: Path, cfg: FinetuneConfig, progress: bool = True):
    """``run``, returning (summary, the trained PEFT model, the held-out token ids).

    Under torchrun each process trains on its rows of every batch (``cfg.parallel``: DDP, or FSDP with the
    quantized base sharded); rank 0 writes the checkpoints and the results."""
    from lowbit.eval.memory import peak_rss_bytes
    from lowbit.train.distributed import Processes, held_bytes

    cfg.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} exists and is not a folder")
    procs = Processes.from_env(cfg.parallel)
    try:
        procs.rows(cfg.batch)
    except ValueError as e:
        raise FinetuneError(f"--batch: {e}") from None
    model, tok = build_model(spec, cfg)
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[0]
    train, held = split_tokens(ids, cfg.heldout, cfg.seq)
    params = [p for p in model.parameters() if p.requires_grad]
    net = _parallel(model, params, procs)  # what the steps call: the model, or torch's DDP / FSDP around it
    model_bytes = held_bytes(model)  # this process's share: all of it, or about 1/N of the base under FSDP
    opt = make_optimizer(params, cfg)
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
    procs.barrier()
    step, losses, extra = load_checkpoint(out, model, opt)
    older = {"eval_every": 0, "patience": 0}  # fields added since: what older runs used
    if step and {**older, **extra.get("config", {}), "steps": cfg.steps} != asdict(cfg):  # more --steps may extend a run
        raise FinetuneError(f"{out}/checkpoint was written with other settings ({extra.get('config')}): use another --out")
    if step and extra.get("processes", 1) != procs.world:
        raise FinetuneError(f"{out}/checkpoint was written by {extra.get('processes', 1)} process(es), this run has "
                            f"{procs.world}: resume with --nproc {extra.get('processes', 1)} (or use another --out)")
    procs.agree(step)  # every process resumes from the same checkpoint
    if step == 0:
        extra = {"config": asdict(cfg), "ppl_before": heldout_perplexity(net, held, cfg.seq, cfg.eval_tokens),
                 "train_seconds": 0.0, "threads": torch.get_num_threads(), "processes": procs.world, "evals": []}
    else:
        resume_threads(extra.get("threads"))
    net.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="fine-tuning", disable=None if progress and procs.main else True,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    step_times = []  # this process's steps only (a resumed run does not know the earlier ones)
    best_file = out / "best-adapter.pt"  # the best evaluation's adapter, when --patience stops at the best
    while step < cfg.steps and not extra.get("stopped_at"):
        t_step = time.perf_counter()
        batch = batch_at(train, step, cfg)[procs.rows(cfg.batch)]
        loss = net(batch, labels=batch).loss
        mean_loss = procs.mean(loss.detach())  # the single-process loss of the whole batch; every process sees it
        if not torch.isfinite(mean_loss):
            bar.close()
            saved = out / "checkpoint" / "progress.json"
            kept = (f"the last checkpoint (step {json.loads(saved.read_text())['step']}) is in {out}/checkpoint"
                    if saved.exists() else "no checkpoint was written yet")
            raise FinetuneError(f"the loss became {mean_loss.item()} at step {step + 1}: stopped ({kept}; try a lower --lr)")
        loss.backward()
        if procs.parallel == "fsdp":
            procs.average_gradients(params)  # the adapters live outside FSDP's shards (DDP averages its own)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(mean_loss.item())
        step_times.append(time.perf_counter() - t_step)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if cfg.eval_every and step % cfg.eval_every == 0:
            t_eval = time.perf_counter()
            extra.setdefault("evals", []).append({"step": step, "ppl": heldout_perplexity(net, held, cfg.seq,
                                                                                          cfg.eval_tokens)})
            net.train()
            t0 += time.perf_counter() - t_eval  # evaluations are not training time
            bar.set_postfix(loss=f"{losses[-1]:.3f}", heldout_ppl=f"{extra['evals'][-1]['ppl']:.3f}")
            ppls = [e["ppl"] for e in extra["evals"]]
            best = ppls.index(min(ppls))
            if cfg.patience and best == len(ppls) - 1 and procs.main:
                tmp = best_file.with_suffix(".tmp")
                torch.save(_adapter_state(model), tmp)
                tmp.replace(best_file)
            if cfg.patience and len(ppls) - 1 - best >= cfg.patience:
                extra["stopped_at"] = step
        if step % cfg.save_every == 0 or step == cfg.steps or extra.get("stopped_at") == step:
            extra["train_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if procs.main:
                save_checkpoint(out, model, opt, step, losses, extra)
            procs.barrier()
    bar.close()
    best = min(extra.get("evals", []), key=lambda e: e["ppl"], default=None)
    if cfg.patience and best_file.is_file():  # the best evaluation's adapter is the result (already scored)
        load_adapter(model, torch.load(best_file, weights_only=True), best_file)
    ppl_after = best["ppl"] if cfg.patience and best else heldout_perplexity(net, held, cfg.seq, cfg.eval_tokens)
    memory = procs.gather({"model_bytes": model_bytes, "peak_rss_bytes": peak_rss_bytes()})
    summary = {"model": spec, **extra, "ppl_after": ppl_after, "steps": step,
               "best_step": best["step"] if best else step,
               "final_loss": losses[-1], "losses": losses,
               "train_tokens": train.numel(), "heldout_tokens": min(held.numel(), cfg.eval_tokens),
               "trainable_params": sum(p.numel() for p in params),
               "step_seconds": extra["train_seconds"] / max(1, step), "step_times": step_times,
               "process_memory": memory}
    if procs.main:
        model.save_pretrained(out / "adapter")
        plot_losses(losses, out / "loss.png", f"{spec}, {cfg.method}, rank {cfg.rank}")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    procs.barrier()
    return summary, model, held


def _parallel(model, params: list, procs):
    """The module the training steps call: torch's DistributedDataParallel around the model, the model sharded in
    place by FSDP's fully_shard, or the model itself in a single process."""
    if procs.world == 1:
        return model
    if procs.parallel == "fsdp":
        return procs.shard(model, params)
    from torch.nn.parallel import DistributedDataParallel

    # The quantized base is the same on every process (each quantized it from the same weights): it is not
    # broadcast before each forward; only the adapters' gradients are averaged.
    return DistributedDataParallel(model, forward_sync_buffers=False)
