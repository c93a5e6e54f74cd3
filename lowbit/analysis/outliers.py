"""Emergent outlier features: hidden dimensions with |x| >= 6 in the inputs of the linear layers.

The criteria of LLM.int8() (Dettmers et al., 2022, section 4): a hidden dimension is an outlier
feature if its magnitude reaches the threshold (6) in at least 25% of the layers and in at least 6%
of the sequence positions. Here a "layer" is a transformer block (``layers.N``, ``h.N``, ``layer.N``);
inside it we watch each distinct input tensor read by linear layers of the model's hidden width (the
attention input, shared by q, k and v; the attention output before o_proj; the MLP input). A
dimension counts for a layer if it reaches the threshold at any position in any watched input of
that block, and for a position if it reaches the threshold there in any watched input.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from lowbit.nn import QuantLinear
from lowbit.nn.base import is_linear_like


_BLOCK = re.compile(r"^((?:.*?\.)?(?:layers|layer|h|blocks)\.\d+)\.")


def _in_features(m: nn.Module) -> int | None:
    if isinstance(m, (nn.Linear, QuantLinear)):
        return m.in_features
    if is_linear_like(m):  # Conv1D stores [in, out]
        return m.weight.shape[0]
    return None


def hidden_linears(model: nn.Module, width: int | None = None) -> tuple[int, list[tuple[str, nn.Module]]]:
    """The hidden size (config's, else the commonest input width) and the linear layers that read it."""
    linears = [(n, m) for n, m in model.named_modules() if _in_features(m) is not None]
    if not linears:
        raise ValueError("the model has no linear layer to watch")
    if width is None:
        cfg = getattr(model, "config", None)
        width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if width is None:
        widths = [_in_features(m) for _, m in linears]
        width = max(set(widths), key=widths.count)
    chosen = [(n, m) for n, m in linears if _in_features(m) == width and not n.endswith("lm_head")]
    if any(_BLOCK.match(n) for n, _ in chosen):  # a pooler or head outside the blocks is not a layer
        chosen = [(n, m) for n, m in chosen if _BLOCK.match(n)]
    return width, chosen


@dataclass
class OutlierReport:
    """Per layer and dimension: positions at or above the threshold and the largest magnitude."""

    threshold: float
    width: int
    layers: list[str]  # each watched input, named by the first linear layer that reads it
    counts: torch.Tensor  # int64 [layers, width]: positions with |x| >= threshold
    max_abs: torch.Tensor  # float32 [layers, width]
    any_layer_positions: torch.Tensor  # int64 [width]: positions where some layer reaches the threshold
    positions: int
    min_layer_share: float = 0.25
    min_position_share: float = 0.06
    features: list[dict] = field(default_factory=list)

    def blocks(self) -> list[str]:
        """The transformer block of each watched input (the input's own name outside blocks)."""
        return [m.group(1) if (m := _BLOCK.match(n)) else n for n in self.layers]

    def block_hits(self) -> torch.Tensor:
        """bool [blocks, width]: the dimension reaches the threshold somewhere in the block."""
        blocks = self.blocks()
        order = list(dict.fromkeys(blocks))
        rows = torch.zeros(len(order), self.width, dtype=torch.bool)
        for i, b in enumerate(blocks):
            rows[order.index(b)] |= self.counts[i] > 0
        return rows

    def layer_share(self) -> torch.Tensor:
        return self.block_hits().float().mean(0)

    def position_share(self) -> torch.Tensor:
        return self.any_layer_positions.float() / max(self.positions, 1)

    def find(self) -> list[dict]:
        """The dimensions that meet all three criteria, largest magnitude first."""
        ls, ps, peak = self.layer_share(), self.position_share(), self.max_abs.amax(0)
        keep = (peak >= self.threshold) & (ls >= self.min_layer_share) & (ps >= self.min_position_share)
        dims = keep.nonzero().flatten().tolist()
        self.features = sorted(({"dim": d, "max_abs": float(peak[d]), "layer_share": float(ls[d]),
                                 "position_share": float(ps[d]), "layers": int(self.block_hits()[:, d].sum())}
                                for d in dims), key=lambda f: -f["max_abs"])
        return self.features

    def summary(self) -> dict:
        dims_any = int((self.counts.sum(0) > 0).sum())
        hits = self.block_hits()
        layers_hit = int(hits[:, [f["dim"] for f in self.features]].any(1).sum()) if self.features else 0
        return {"threshold": self.threshold, "layers": hits.shape[0], "watched_inputs": len(self.layers),
                "width": self.width, "positions": self.positions,
                "dims_reaching_threshold": dims_any, "outlier_features": len(self.features),
                "layers_with_outlier_features": layers_hit, "features": self.features,
                "max_abs": float(self.max_abs.max()) if self.max_abs.numel() else 0.0}


@contextmanager
def _hooks(modules: list[nn.Module], fn) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(fn) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def find_outliers(model: nn.Module, inputs: Iterable[torch.Tensor | dict], threshold: float = 6.0,
                  width: int | None = None, progress: bool = False) -> OutlierReport:
    """Feed each input (token ids, or keyword arguments) to the model, watch the hidden-width linear inputs."""
    width, linears = hidden_linears(model, width)
    names = {id(m): n for n, m in linears}
    layer_of: dict[int, int] = {}  # module id -> layer index, fixed during the first forward pass
    layers: list[str] = []
    counts: list[torch.Tensor] = []
    peaks: list[torch.Tensor] = []
    state = {"last": None, "any": None, "seen": set()}
    totals = {"positions": 0, "any": torch.zeros(width, dtype=torch.int64)}

    def hook(module, args):
        x = args[0]
        if id(module) not in layer_of:
            if x is not state["last"]:  # a new input tensor: a new layer (q, k and v share theirs)
                layers.append(names[id(module)])
                counts.append(torch.zeros(width, dtype=torch.int64))
                peaks.append(torch.zeros(width))
            layer_of[id(module)] = len(layers) - 1
        state["last"] = x
        idx = layer_of[id(module)]
        if idx in state["seen"]:
            return
        state["seen"].add(idx)
        a = x.detach().reshape(-1, width).abs().float()
        hit = a >= threshold
        counts[idx] += hit.sum(0)
        peaks[idx] = torch.maximum(peaks[idx], a.amax(0))
        state["any"] = hit if state["any"] is None else state["any"] | hit

    with _hooks([m for _, m in linears], hook):
        for batch in tqdm(inputs, desc="outliers", disable=None if progress else True, leave=False):
            model(**batch) if isinstance(batch, dict) else model(batch)
            if state["any"] is not None:
                totals["any"] += state["any"].sum(0)
                totals["positions"] += state["any"].shape[0]
            state.update(last=None, any=None, seen=set())
    if not layers:
        raise ValueError("no linear layer of the hidden width ran: nothing to analyse")
    report = OutlierReport(threshold, width, layers, torch.stack(counts), torch.stack(peaks), totals["any"], totals["positions"])
    report.find()
    return report


def token_windows(tokenizer, text: str, tokens: int = 4096, window: int = 512) -> list[torch.Tensor]:
    """The first ``tokens`` tokens of ``text`` as [1, window] id tensors."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0][:tokens]
    return [ids[i:i + window].unsqueeze(0) for i in range(0, ids.numel(), window) if ids[i:i + window].numel() > 1]


@contextmanager
def ablate_dims(model: nn.Module, dims: list[int], width: int | None = None) -> Iterator[None]:
    """Within the block, the given hidden dimensions are zeroed in the input of every hidden-width linear layer."""
    width, linears = hidden_linears(model, width)
    index = torch.tensor(sorted(dims), dtype=torch.long)

    def zero(module, args):
        x = args[0].clone()
        x[..., index] = 0
        return (x, *args[1:])

    with _hooks([m for _, m in linears], zero):
        yield


def random_dims(width: int, count: int, exclude: list[int], seed: int = 0) -> list[int]:
    """``count`` dimensions drawn without replacement from those not in ``exclude``."""
    pool = torch.tensor([d for d in range(width) if d not in set(exclude)])
    perm = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))
    return sorted(pool[perm[:count]].tolist())
