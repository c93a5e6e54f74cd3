"""Training with low-bit state and int8 matmuls: fine-tune a trimmed SmolLM2-135M on the bundled text.

Part 1 (curves): the first ``--layers`` transformer blocks of SmolLM2-135M (embeddings frozen, tied LM head),
``--steps`` steps of next-token loss on random windows of the python-tutorial text, same seed for every run:
Adam (fp32 state) vs Adam8bit, and nn.Linear vs SwitchBackLinear (both with fp32 Adam). Prints final losses
(mean of the last 20 steps), optimizer state bytes and step times; plots the curves.
Part 2 (paged): in a child process capped with RLIMIT_AS just above what the model and its gradients need,
train an MLP whose fp32 Adam state does not fit: in-memory state fails, paged state completes.
Writes benchmarks/results/train.json and docs/img/train_curves.png.
Usage: python benchmarks/bench_train.py [--steps 150] [--layers 4] [--skip-curves] [--skip-paged]
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def trimmed_model(layers: int):
    from lowbit.app.models import load_default_model

    model, tok = load_default_model()
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.model.embed_tokens.weight.requires_grad_(False)  # tied to the LM head: frozen
    return model, tok


def windows(tok, steps: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    from lowbit.data import default_text

    ids = tok(default_text(), return_tensors="pt", verbose=False).input_ids[0]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq - 1, (steps, batch), generator=g)
    return torch.stack([torch.stack([ids[s:s + seq] for s in row.tolist()]) for row in starts])


def train(model, opt, data: torch.Tensor) -> tuple[list[float], list[float]]:
    losses, times = [], []
    model.train()
    for batch in data:
        t = time.perf_counter()
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return losses, times


def curves(args) -> dict:
    from lowbit.nn import to_switchback
    from lowbit.optim import Adam8bit

    base, tok = trimmed_model(args.layers)
    data = windows(tok, args.steps, args.batch, args.seq)
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    runs = {
        "Adam fp32 state, nn.Linear": lambda m: (m, torch.optim.Adam(trainable(m), lr=args.lr)),
        "Adam8bit, nn.Linear": lambda m: (m, Adam8bit(trainable(m), lr=args.lr)),
        "Adam fp32 state, SwitchBackLinear": lambda m: (to_switchback(m), torch.optim.Adam(trainable(m), lr=args.lr)),
    }
    out = {}
    for name, make in runs.items():
        torch.manual_seed(0)
        model, opt = make(copy.deepcopy(base))
        losses, times = train(model, opt, data)
        state = opt.state_bytes() if hasattr(opt, "state_bytes") else sum(
            t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")
        out[name] = {"losses": losses, "final_loss": statistics.mean(losses[-20:]), "state_bytes": state,
                     "step_s": statistics.median(times[1:]),
                     "trainable_params": sum(p.numel() for p in trainable(model))}
        print(f"  {name:<36} final loss {out[name]['final_loss']:.4f}  state {state / 2**20:7.1f} MiB  "
              f"step {out[name]['step_s']:.3f} s", flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        smooth = torch.tensor(r["losses"]).unfold(0, 10, 1).mean(1)
        ax.plot(range(10, len(r["losses"]) + 1), smooth, label=f"{name} (final {r['final_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title("SmolLM2-135M, first blocks, python-tutorial text")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


CHILD = r"""
import resource, sys, time, torch
sys.path.insert(0, {root!r})
from lowbit.optim import Adam8bit
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(4)])  # 67M params, 268 MB
x = torch.randn(8, 4096)
model(x).square().mean().backward()  # gradients exist; threads and allocator are warm
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize")) * 1024
cap = vm + {headroom_mb} * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
opt = {opt}
t = time.perf_counter()
try:
    for step in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    print("OK", round(time.perf_counter() - t, 2), opt.state_bytes() if hasattr(opt, "state_bytes") else 0, cap)
except (RuntimeError, MemoryError) as e:
    print("FAILED", type(e).__name__, str(e).splitlines()[0][:120], cap)
"""


def paged(args) -> dict:
    opts = {
        "torch Adam, fp32 state in memory": "torch.optim.Adam(model.parameters(), lr=1e-4)",
        "lowbit Adam8bit, fp32 state in memory": "Adam8bit(model.parameters(), lr=1e-4, state_bits=32)",
        "lowbit Adam8bit, 8-bit state in memory": "Adam8bit(model.parameters(), lr=1e-4)",
        "lowbit Adam8bit, fp32 state paged to disk": "Adam8bit(model.parameters(), lr=1e-4, state_bits=32, paged=True)",
        "lowbit Adam8bit, 8-bit state paged to disk": "Adam8bit(model.parameters(), lr=1e-4, paged=True)",
    }
    out = {}
    for name, opt in opts.items():
        code = CHILD.format(root=str(ROOT), headroom_mb=args.headroom_mb, opt=opt)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        line = (res.stdout.strip().splitlines() or [f"FAILED exit {res.returncode} {res.stderr.strip()[-200:]}"])[-1]
        out[name] = line
        print(f"  {name:<44} {line}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--headroom-mb", type=int, default=450, help="address space allowed past model + gradients")
    ap.add_argument("--skip-curves", action="store_true")
    ap.add_argument("--skip-paged", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from lowbit.eval.speed import machine

    print(f"machine: {machine()}")
    results = {}
    if not args.skip_curves:
        print(f"fine-tuning {args.layers} blocks, {args.steps} steps of {args.batch} x {args.seq} tokens:")
        results["curves"] = curves(args)
        r = results["curves"]
        ref = r["Adam fp32 state, nn.Linear"]
        for name in ("Adam8bit, nn.Linear", "Adam fp32 state, SwitchBackLinear"):
            print(f"  {name}: final loss {r[name]['final_loss'] / ref['final_loss'] - 1:+.2%} vs Adam fp32 / nn.Linear")
        print(f"  Adam8bit state: {1 - r['Adam8bit, nn.Linear']['state_bytes'] / ref['state_bytes']:.1%} less than fp32 Adam")
        plot(r, ROOT / "docs" / "img" / "train_curves.png")
    if not args.skip_paged:
        print(f"paged state under RLIMIT_AS = model + gradients + {args.headroom_mb} MB (fp32 Adam state needs 536 MB):")
        results["paged"] = paged(args)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    out = ROOT / "benchmarks" / "results" / "train.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
