"""8-bit blockwise optimizers (Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization") and
StableAdamW (Wortsman et al., 2023, "Stable and low-precision training for large-scale vision-language models").

Each step dequantizes a parameter's state to fp32, updates it and the parameter as the torch optimizer of the
same name would, and quantizes the state back (dynamic signed map for first moments, unsigned for second
moments, absmax per block). Tensors under ``min_8bit_size`` elements, and parameters marked ``optim_bits = 32``
(``lowbit.nn.StableEmbedding``), keep fp32 state. ``paged=True`` keeps all state in a file and reads one
parameter's state at a time, so the state never has to fit in memory.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterable

import torch

from lowbit.optim.state import PagedStore, dequantize_state, quantize_state


class LowbitOptimizer(torch.optim.Optimizer):
    """Base: state storage (8-bit or fp32, in memory or paged); subclasses define ``STATES`` and ``_update``."""

    STATES: tuple[tuple[str, bool], ...] = ()  # (state name, signed)

    def __init__(self, params: Iterable, defaults: dict, state_bits: int = 8, blocksize: int = 256,
                 min_8bit_size: int = 4096, paged: bool = False, page_dir: str | os.PathLike | None = None) -> None:
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {state_bits!r}")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
            raise ValueError(f"blocksize must be a positive integer (256 or 2048 are usual), got {blocksize!r}")
        super().__init__(params, defaults)
        self.state_bits, self.blocksize, self.min_8bit_size = state_bits, blocksize, min_8bit_size
        self._store = PagedStore(page_dir) if paged else None

    def quantized(self, p: torch.Tensor) -> bool:
        """Whether this parameter's state is kept in 8 bits."""
        return self.state_bits == 8 and p.numel() >= self.min_8bit_size and getattr(p, "optim_bits", 8) != 32

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _keys(self, p: torch.Tensor) -> list[tuple[str, str, bool]]:
        """(key, state name, signed) of every stored tensor of p's state."""
        if self.quantized(p):
            return [(f"{n}_{part}", n, s) for n, s in self.STATES for part in ("codes", "absmax")]
        return [(n, n, s) for n, s in self.STATES]

    def _get(self, p: torch.Tensor, key: str) -> torch.Tensor | None:
        if self._store is None:
            return self.state[p].get(key)
        k = f"{id(p)}.{key}"
        return self._store.get(k) if k in self._store else None

    def _put(self, p: torch.Tensor, key: str, t: torch.Tensor) -> None:
        if self._store is None:
            self.state[p][key] = t
        else:
            self._store.put(f"{id(p)}.{key}", t)

    def _read(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, signed in self.STATES:
            if self.quantized(p):
                codes = self._get(p, f"{name}_codes")
                out[name] = (torch.zeros(p.shape) if codes is None else
                             dequantize_state(codes, self._get(p, f"{name}_absmax"), signed, self.blocksize, p.shape))
            else:
                t = self._get(p, name)
                out[name] = torch.zeros(p.shape) if t is None else t
        return out

    def _write(self, p: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        for name, signed in self.STATES:
            if self.quantized(p):
                codes, absmax = quantize_state(values[name], signed, self.blocksize)
                self._put(p, f"{name}_codes", codes)
                self._put(p, f"{name}_absmax", absmax)
            else:
                self._put(p, name, values[name])

    def state_bytes(self) -> int:
        """Bytes of optimizer state (codes, absmax, fp32 tensors; the step counters left out)."""
        if self._store is not None:
            return self._store.nbytes()
        return sum(t.numel() * t.element_size() for st in self.state.values() for k, t in st.items() if k != "step")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                state["step"] = state.get("step", torch.tensor(0.0)) + 1
                values = self._read(p)
                grad = p.grad.float()
                if group.get("maximize", False):
                    grad = -grad
                pf = p.detach().float() if p.dtype != torch.float32 else p.detach()
                self._update(pf, grad, values, group, int(state["step"]))
                if pf is not p:
                    p.copy_(pf)
                self._write(p, values)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, s: dict[str, torch.Tensor], group: dict, step: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        sd = super().state_dict()
        if self._store is not None:  # paged state is read back from its file
            for i, p in enumerate(self._params()):
                if i in sd["state"]:
                    sd["state"][i].update({key: self._get(p, key) for key, _, _ in self._keys(p)})
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to the parameter's dtype (uint8 codes too): keep the saved tensors as they are.
        saved = {i: {k: v.clone() for k, v in st.items() if k != "step"} for i, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = self._params()
        for i, st in saved.items():
            p = params[i]
            for key, t in st.items():
                if self._store is None:
                    self.state[p][key] = t
                else:
                    self.state[p].pop(key, None)
                    self._put(p, key, t)


def _check_adam_args(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """The checks (and messages) of torch.optim.Adam."""
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class Adam8bit(LowbitOptimizer):
    """torch.optim.Adam with 8-bit blockwise state (L2 weight decay added to the gradient)."""

    STATES = (("exp_avg", True), ("exp_avg_sq", False))
    DECOUPLED = False

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False, state_bits: int = 8,
                 blocksize: int = 256, min_8bit_size: int = 4096, paged: bool = False,
                 page_dir: str | os.PathLike | None = None) -> None:
        _check_adam_args(lr, betas, eps, weight_decay)
        if amsgrad:
            raise NotImplementedError(f"{type(self).__name__} has no amsgrad variant")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize),
                         state_bits, blocksize, min_8bit_size, paged, page_dir)

    def _update(self, p, grad, s, group, step):
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if wd and not self.DECOUPLED:
            grad = grad.add(p, alpha=wd)
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        lr = lr / self._clip(grad, v, bc2, eps)
        if wd and self.DECOUPLED:
            p.mul_(1 - lr * wd)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)

    def _clip(self, grad, v, bc2, eps) -> float:
        return 1.0


class AdamW8bit(Adam8bit):
    """torch.optim.AdamW with 8-bit blockwise state (decoupled weight decay, default 0.01)."""

    DECOUPLED = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, **kwargs) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


class StableAdamW(AdamW8bit):
    """AdamW with update clipping (StableAdamW): each tensor's learning rate is divided by max(1, RMS) of
    grad^2 / max(v_hat, eps^2), which damps the updates when the second moment lags the gradients. fp32 state
    by default; ``state_bits=8`` for 8-bit state."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-6,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, state_bits: int = 32, **kwargs) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, state_bits=state_bits, **kwargs)

    def _clip(self, grad, v, bc2, eps) -> float:
        rms = float((grad.square() / (v / bc2).clamp(min=eps * eps)).mean().sqrt())
        return max(1.0, rms)


class Lion8bit(LowbitOptimizer):
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") with 8-bit blockwise momentum."""

    STATES = (("exp_avg", True),)

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, state_bits: int = 8, blocksize: int = 256,
                 min_8bit_size: int = 4096, paged: bool = False, page_dir: str | os.PathLike | None = None) -> None:
        _check_adam_args(lr, betas, 0.0, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize), state_bits,
                         blocksize, min_8bit_size, paged, page_dir)

    def _update(self, p, grad, s, group, step):
        b1, b2 = group["betas"]
        m = s["exp_avg"]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(torch.sign(m * b1 + grad * (1 - b1)), alpha=-group["lr"])
        m.lerp_(grad, 1 - b2)


class SGD8bit(LowbitOptimizer):
    """torch.optim.SGD with momentum, its momentum buffer in 8 bits."""

    STATES = (("momentum_buffer", True),)

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False, state_bits: int = 8,
                 blocksize: int = 256, min_8bit_size: int = 4096, paged: bool = False,
                 page_dir: str | os.PathLike | None = None) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if momentum == 0:
            raise ValueError("SGD8bit keeps a momentum buffer: momentum must be > 0 (use torch.optim.SGD without it)")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize), state_bits, blocksize, min_8bit_size,
                         paged, page_dir)

    def _update(self, p, grad, s, group, step):
        if group["weight_decay"]:
            grad = grad.add(p, alpha=group["weight_decay"])
        buf = s["momentum_buffer"]
        if step == 1:
            buf.copy_(grad)
        else:
            buf.mul_(group["momentum"]).add_(grad, alpha=1 - group["dampening"])
        p.add_(grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf, alpha=-group["lr"])
