"""What quantizing each layer alone costs: measured (KL to the full model) and predicted by cheap proxies.

For every linear layer inside the blocks and every candidate format, the layer alone is quantized and
- ``kl``: the mean KL divergence from the full-precision model's next-token distribution to the model's, over the
  calibration tokens (the model runs from the layer's block on, from the block's cached full-precision input);
- ``output``: the layer's output error on its calibration inputs, mean over tokens of ||(Q - W) x||^2;
- ``fisher``: 1/2 mean over tokens of (g . (Q - W) x)^2, g the gradient of the calibration loss with respect to the
  layer's output: the output error weighted by how much the loss cares (an empirical-Fisher estimate of the loss
  increase, as in Optimal Brain Surgeon and its successors), from one backward pass.
The embeddings (with a head tied to them) are a candidate group too, and an untied LM head another; both always
measured by KL (a forward each; the head's from its cached input). Each entry also holds the
bytes the layer takes in that format, which the allocation (``lowbit.analysis.allocate``) counts.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lowbit.calibrate.sequential import block_inputs, clip_tokens, find_blocks, output, with_hidden
from lowbit.eval.memory import memory_report
from lowbit.nn.base import is_linear_like, linear_weight, owner_of, replace_module

# The candidate formats of a block's linear layers, from 8 bits down (issue 19's list). Ternary is left out by
# default: post-training it costs SmolLM2-135M's perplexity x10^5 (docs/quality.md), for no plan to pick.
FORMATS = ("int8-weight", "nf4", "rtn4", "rtn4-g64", "rtn3", "rtn3-g64", "gptq4", "gptq4-g64", "gptq3", "gptq3-g64",
           "spqr3")
EMBEDDING_CANDIDATES = ("float32", "bfloat16", "int8", "int4")
HEAD_CANDIDATES = ("float32", "bfloat16", "int8-weight", "rtn4-g64")  # an LM head not tied to the embeddings
VERSION = 1  # of the measurement: a cached result of another version is measured again


@dataclass
class Sensitivity:
    """Per layer and format: bytes and costs; per embedding format: bytes and KL; the bytes nothing changes."""

    layers: dict[str, dict[str, dict]] = field(default_factory=dict)  # layer -> format -> {bytes, kl, output, fisher}
    embeddings: dict[str, dict] = field(default_factory=dict)  # format -> {bytes, kl} (a tied head included)
    head: dict[str, dict] = field(default_factory=dict)  # format -> {bytes, kl} of an untied LM head (else empty)
    fixed_bytes: int = 0  # norms, biases and anything else no candidate changes
    linear_params: int = 0  # weights of the candidate layers: bits/param = 8 x bytes / linear_params
    reference: dict = field(default_factory=dict)  # fp model: calibration loss, tokens, seconds
    key: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Sensitivity":
        return cls(**json.loads(text))


def fingerprint(model: nn.Module, calibration: torch.Tensor, formats: tuple[str, ...], kl) -> str:
    """A hash of the model's weights, the calibration tokens and the question asked: the cache key."""
    h = hashlib.sha256(f"v{VERSION} {formats} kl={kl} {type(model).__name__}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(calibration.numpy().tobytes())
    return h.hexdigest()[:24]


def measure_sensitivity(model: nn.Module, calibration: torch.Tensor, formats: tuple[str, ...] = FORMATS,
                        kl: bool = True, cache: Path | None = None, progress: bool = True,
                        kl_layers: set[str] | None = None) -> Sensitivity:
    """Sensitivity of every block linear layer to every format (and of the embeddings), cached in ``cache``.

    ``kl_layers``: measure the KL of these layers only (a sample, to check the proxies on), not of all."""
    from lowbit.nn import QuantEmbedding, QuantLinear
    from lowbit.plan import parse_format

    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise ValueError("this model is quantized already: measure the full-precision model's sensitivities")
    configs = {f: parse_format(f, "format") for f in formats}
    key = fingerprint(model, calibration, tuple(formats), kl if kl_layers is None else sorted(kl_layers))
    path = None if cache is None else Path(cache) / f"sensitivity-{key}.json"
    if path is not None and path.is_file():
        try:
            return Sensitivity.from_json(path.read_text())
        except (ValueError, TypeError):
            pass  # a damaged cache entry is measured again
    t0 = time.perf_counter()
    model.eval()
    run = _Runner(model, calibration)
    result = Sensitivity(key=key, reference={"loss": run.loss, "tokens": int(calibration.numel())})
    grads = run.output_gradients()
    bar = tqdm(total=len(run.blocks) * len(formats) + len(EMBEDDING_CANDIDATES),
               desc="sensitivity", disable=None if progress else True)
    for b, block in enumerate(run.blocks):
        linears = {n: m for n, m in block.named_modules() if is_linear_like(m)}
        inputs = run.layer_inputs(b, linears)
        for fmt, config in configs.items():
            for n, module in linears.items():
                name = f"{run.prefix}.{b}.{n}"
                x = inputs[n]
                q = _quantized(name, module, config, x)
                dw = q.dequantize().float() - linear_weight(module).float()
                dy = x @ dw.t()
                entry = {"bytes": _layer_bytes(q),
                         "output": float(dy.square().sum(1).mean()),
                         "fisher": float(0.5 * (dy * grads[name]).sum(1).square().mean())}
                if kl and (kl_layers is None or name in kl_layers):
                    replace_module(block, n, q)
                    try:
                        entry["kl"] = run.kl_from_block(b)
                    finally:
                        replace_module(block, n, module)
                result.layers.setdefault(name, {})[fmt] = entry
            bar.update(1)
        for n, module in linears.items():  # kept as it is: no cost, its float bytes
            w, name = linear_weight(module), f"{run.prefix}.{b}.{n}"
            measured = kl and (kl_layers is None or name in kl_layers)
            result.layers[name]["float32"] = {"bytes": w.numel() * w.element_size(), "output": 0.0, "fisher": 0.0,
                                              **({"kl": 0.0} if measured else {})}
    quantized = {id(m) for b in run.blocks for m in b.modules() if is_linear_like(m)}
    result.embeddings = _embedding_costs(model, run, bar)  # three forwards: measured always
    bar.close()
    result.linear_params = sum(linear_weight(m).numel() for b in run.blocks for m in b.modules() if is_linear_like(m))
    result.head = _head_costs(model, run)
    emb_bytes = result.embeddings.get("float32", {}).get("bytes", 0) + result.head.get("float32", {}).get("bytes", 0)
    result.fixed_bytes = memory_report(model)["total_bytes"] - emb_bytes - sum(
        linear_weight(m).numel() * linear_weight(m).element_size() for m in model.modules() if id(m) in quantized)
    result.reference["seconds"] = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(result.to_json())
        tmp.replace(path)
    return result


def _layer_bytes(layer: nn.Module) -> int:
    """Bytes of a quantized layer's stored weight (codes and constants), its bias excluded (it stays float32)."""
    return layer.stored_bits() // 8


def _quantized(name: str, module: nn.Module, config, x: torch.Tensor) -> nn.Module:
    """``module`` alone in ``config``'s format (GPTQ / SpQR from the Hessian of its full-precision inputs ``x``)."""
    from lowbit.calibrate.run import layer_quantizer
    from lowbit.registry import is_calibrated
    from lowbit.quantize import build_layer

    with torch.no_grad():
        if is_calibrated(config):
            xc = clip_tokens(x, config.token_clip) if config.token_clip else x
            return layer_quantizer(config)(name, module, 2 * xc.t() @ xc / xc.shape[0])
        return build_layer(module, config)


def _embedding_costs(model: nn.Module, run: "_Runner", bar) -> dict[str, dict]:
    from lowbit.embeddings import embedding_pair, quantize_embeddings

    emb, head, tied = embedding_pair(model)
    out = {}
    for fmt in EMBEDDING_CANDIDATES:
        if fmt == "float32":
            out[fmt] = {"bytes": emb.weight.numel() * emb.weight.element_size(), "kl": 0.0}
        else:
            quantize_embeddings(model, fmt)
            try:
                out[fmt] = {"bytes": model.get_input_embeddings().stored_bits() // 8, "kl": run.kl_from_block(0, embed=True)}
            finally:
                model.set_input_embeddings(emb)
                if tied:
                    model.set_output_embeddings(head)
        bar.update(1)
    return out


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _head_costs(model: nn.Module, run: "_Runner") -> dict[str, dict]:
    from lowbit.embeddings import embedding_pair
    from lowbit.plan import HALF, KEEP, parse_format
    from lowbit.nn.embedding import HalfLinear
    from lowbit.quantize import build_layer

    _, head, tied = embedding_pair(model)
    if head is None or tied or not is_linear_like(head):
        return {}
    w = linear_weight(head)
    out = {KEEP: {"bytes": w.numel() * w.element_size(), "kl": 0.0}}
    for fmt in HEAD_CANDIDATES[1:]:
        with torch.no_grad():
            q = HalfLinear.from_linear(head) if fmt == HALF else build_layer(head, parse_format(fmt))
        out[fmt] = {"bytes": q.stored_bits() // 8, "kl": run.kl_of_head(q)}
    return out


class _Runner:
    """The full-precision model's block inputs and next-token log-probabilities on the calibration tokens, and a
    forward from any block on (the blocks before it skipped, their cached outputs used instead)."""

    def __init__(self, model: nn.Module, calibration: torch.Tensor, chunk: int = 8):
        self.model, self.ids = model, calibration
        self.prefix, self.blocks = find_blocks(model)
        self.parent, self.attr = owner_of(model, self.prefix)
        with torch.no_grad():
            self.inputs = [block_inputs(model, self.blocks[0], calibration, chunk)]
            for block in self.blocks[:-1]:  # each block's full-precision input, per chunk
                self.inputs.append([with_hidden(a, k, output(block(*a, **k))) for a, k in self.inputs[-1]])
            self.chunks = [calibration[i:i + chunk] for i in range(0, len(calibration), chunk)]
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            self.head_inputs: list[torch.Tensor] = []
            hook = None if head is None else head.register_forward_pre_hook(
                lambda m, a: self.head_inputs.append(a[0].detach()))
            try:
                logits = [model(c, use_cache=False).logits.float() for c in self.chunks]
            finally:
                if hook is not None:
                    hook.remove()
        self.logp = [lg.log_softmax(-1) for lg in logits]
        self.loss = float(sum(torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), c[:, 1:].flatten(),
                                                                reduction="sum") for lg, c in zip(logits, self.chunks))
                          / sum(c[:, 1:].numel() for c in self.chunks))

    @torch.no_grad()
    def kl_from_block(self, b: int, embed: bool = False) -> float:
        """Mean KL(full model || this model) per token, the model run from block ``b`` (from the embeddings if
        ``embed``) on the full-precision inputs of block ``b``."""
        total, count = 0.0, 0
        blocks = self.blocks if embed else self.blocks[b:]
        for i, (chunk, logp) in enumerate(zip(self.chunks, self.logp)):
            hidden = _hidden_of(*self.inputs[b][i])

            def feed(module, args, kwargs, hidden=hidden):
                return with_hidden(args, kwargs, hidden)

            handle = None if embed else blocks[0].register_forward_pre_hook(feed, with_kwargs=True)
            setattr(self.parent, self.attr, nn.ModuleList(blocks))
            try:
                lq = self.model(chunk, use_cache=False).logits.float().log_softmax(-1)
            finally:
                setattr(self.parent, self.attr, self.blocks)
                if handle is not None:
                    handle.remove()
            total += float((logp.exp() * (logp - lq)).sum())
            count += logp.shape[0] * logp.shape[1]
        return total / count

    @torch.no_grad()
    def kl_of_head(self, head: nn.Module) -> float:
        """Mean KL(full model || this model) per token with ``head`` in place of the LM head (its inputs cached)."""
        total, count = 0.0, 0
        for x, logp in zip(self.head_inputs, self.logp):
            lq = head(x).float().log_softmax(-1)
            total += float((logp.exp() * (logp - lq)).sum())
            count += logp.shape[0] * logp.shape[1]
        return total / count

    def layer_inputs(self, b: int, linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Each linear layer's inputs [tokens, in] in block ``b`` of the full-precision model."""
        seen: dict[str, list] = {n: [] for n in linears}

        def record(name):
            def hook(module, args):
                seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
            return hook

        handles = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
        try:
            with torch.no_grad():
                for args, kwargs in self.inputs[b]:
                    self.blocks[b](*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return {n: torch.cat(v) for n, v in seen.items()}

    def output_gradients(self) -> dict[str, torch.Tensor]:
        """d(calibration loss, summed over tokens)/d(output) of every block linear layer, [tokens, out]."""
        grads: dict[str, list] = {}
        names = {m: f"{self.prefix}.{b}.{n}" for b, block in enumerate(self.blocks)
                 for n, m in block.named_modules() if is_linear_like(m)}

        def keep(module, args, out):
            name = names[module]
            out.register_hook(lambda g: grads.setdefault(name, []).append(g.detach().reshape(-1, g.shape[-1]).float()))

        handles = [m.register_forward_hook(keep) for m in names]
        flags = {p: p.requires_grad for p in self.model.parameters()}
        try:
            for p in flags:
                p.requires_grad_(False)
            emb = self.model.get_input_embeddings()
            for chunk in self.chunks:
                x = emb(chunk).detach().requires_grad_()
                logits = self.model(inputs_embeds=x, use_cache=False).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(),
                                                         reduction="sum")
                loss.backward()
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)
        return {n: torch.cat(v) for n, v in grads.items()}
