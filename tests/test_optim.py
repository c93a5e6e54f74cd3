"""8-bit and paged optimizers against torch's, StableAdamW, SwitchBackLinear against nn.Linear."""
from __future__ import annotations

import io

import pytest
import torch

from lowbit.nn import StableEmbedding, SwitchBackLinear, to_switchback
from lowbit.optim import Adam8bit, AdamW8bit, Lion8bit, SGD8bit, StableAdamW
from lowbit.optim.state import dequantize_state, quantize_state


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))


def _train(model, opt, steps: int, seed: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(32, 96, generator=g), torch.randint(0, 10, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


PAIRS = [
    (torch.optim.Adam, Adam8bit, dict(lr=1e-3, weight_decay=0.01)),
    (torch.optim.AdamW, AdamW8bit, dict(lr=1e-3, weight_decay=0.05)),
    (torch.optim.SGD, SGD8bit, dict(lr=0.05, momentum=0.9, nesterov=True)),
]


@pytest.mark.parametrize("torch_cls,ours_cls,kw", PAIRS)
def test_first_step_equals_torch(torch_cls, ours_cls, kw):
    # From zero state the update uses the fresh fp32 moments: it is torch's, up to float rounding.
    a, b = _model(), _model()
    _train(a, torch_cls(a.parameters(), **kw), 1)
    _train(b, ours_cls(b.parameters(), **kw), 1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("torch_cls,ours_cls,kw", PAIRS)
def test_many_steps_stay_close_to_torch(torch_cls, ours_cls, kw):
    a, b = _model(), _model()
    la = _train(a, torch_cls(a.parameters(), **kw), 60)
    lb = _train(b, ours_cls(b.parameters(), **kw), 60)
    assert abs(lb[-1] - la[-1]) / la[-1] < 0.05
    for pa, pb in zip(a.parameters(), b.parameters()):
        moved = (pa - _model().state_dict()[[n for n, q in a.named_parameters() if q is pa][0]]).norm()
        assert (pa - pb).norm() < 0.1 * moved  # 8-bit state perturbs the path, not the destination


def test_state_is_8bit_and_small_tensors_stay_fp32():
    model = _model()
    opt = Adam8bit(model.parameters(), min_8bit_size=4096)
    _train(model, opt, 2)
    w, b = model[0].weight, model[0].bias  # 12288 and 128 elements
    assert opt.state[w]["exp_avg_codes"].dtype == torch.uint8 and opt.state[w]["exp_avg_codes"].numel() == w.numel()
    assert opt.state[w]["exp_avg_sq_absmax"].numel() == -(-w.numel() // 256)
    assert opt.state[b]["exp_avg"].dtype == torch.float32 and "exp_avg_codes" not in opt.state[b]
    # 2 moments x (1 byte a weight + one fp32 absmax per 256) for the big weight, 2 x fp32 for the rest
    assert opt.state_bytes() == 2 * (12288 + 4 * 48) + 2 * 4 * (128 + 1280 + 10)


def test_quantized_state_error_bound():
    x = torch.randn(10000) * torch.logspace(-4, 0, 10000)
    for signed in (True, False):
        v = x if signed else x.abs()
        codes, absmax = quantize_state(v, signed, 256)
        back = dequantize_state(codes, absmax, signed, 256, v.shape)
        # The dynamic map's widest gap is below 5% of the block absmax (its largest decade has 2^6 steps).
        assert ((back - v).abs() <= 0.05 * absmax.repeat_interleave(256)[:v.numel()] + 1e-12).all()


@pytest.mark.parametrize("cls", [Adam8bit, Lion8bit, StableAdamW])
def test_state_dict_round_trip_resumes_bit_identically(cls, tmp_path):
    a = _model()
    opt = cls(a.parameters(), lr=1e-3) if cls is not StableAdamW else cls(a.parameters(), lr=1e-3, state_bits=8)
    _train(a, opt, 5)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = _model(seed=7)
    b.load_state_dict(saved["model"])
    opt_b = type(opt)(b.parameters(), lr=1e-3) if cls is not StableAdamW else cls(b.parameters(), lr=1e-3, state_bits=8)
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.state[b[0].weight]["exp_avg_codes"].dtype == torch.uint8
    _train(a, opt, 5, seed=3)
    _train(b, opt_b, 5, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_paged_state_gives_identical_parameters(tmp_path):
    a, b = _model(), _model()
    opt_a = AdamW8bit(a.parameters())
    opt_b = AdamW8bit(b.parameters(), paged=True, page_dir=tmp_path)
    _train(a, opt_a, 8)
    _train(b, opt_b, 8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert all(set(st) == {"step"} for st in opt_b.state.values())  # nothing but counters in memory
    assert opt_b.state_bytes() == opt_a.state_bytes()
    sd = opt_b.state_dict()  # paged state is read back for saving
    assert torch.equal(sd["state"][0]["exp_avg_codes"], opt_a.state_dict()["state"][0]["exp_avg_codes"])
    # the state lives in an open file with no name: nothing is left behind, even by a killed process
    assert opt_b._store.nbytes() > 0 and not opt_b._store.path.exists()
    assert not any(tmp_path.iterdir())


def test_stable_adamw_clips_updates():
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = StableAdamW([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    p.grad = torch.full((1000,), 1e-3)
    opt.step()  # warm second moment: no clipping, Adam's first step moves each weight by lr
    torch.testing.assert_close(p.detach(), torch.full((1000,), -0.1), rtol=2e-3, atol=0)
    p.grad = torch.full((1000,), 10.0)  # a gradient spike far above the second moment
    before = p.detach().clone()
    opt.step()
    plain = torch.optim.AdamW([q := torch.nn.Parameter(torch.zeros(1000))], lr=0.1, betas=(0.9, 0.99), eps=1e-6,
                              weight_decay=0.0)
    q.grad = torch.full((1000,), 1e-3)
    plain.step()
    q.grad = torch.full((1000,), 10.0)
    q_before = q.detach().clone()
    plain.step()
    # The paper's rule: lr / max(1, RMS(g^2 / v_hat)) with v_hat the bias-corrected second moment.
    v_hat = (0.99 * 0.01 * 1e-6 + 0.01 * 100.0) / (1 - 0.99**2)
    rms = (100.0 / v_hat) ** 0.5
    assert rms > 1.2
    torch.testing.assert_close(p.detach() - before, (q.detach() - q_before) / rms, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("cls,kwargs,message", [
    (Adam8bit, dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (Adam8bit, dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (AdamW8bit, dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (Adam8bit, dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (AdamW8bit, dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (SGD8bit, dict(lr=-0.1, momentum=0.9), "Invalid learning rate: -0.1"),
    (SGD8bit, dict(momentum=-0.5), "Invalid momentum value: -0.5"),
])
def test_bad_arguments_raise_like_torch(cls, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        cls(_model().parameters(), **kwargs)
    torch_cls = {Adam8bit: torch.optim.Adam, AdamW8bit: torch.optim.AdamW, SGD8bit: torch.optim.SGD}[cls]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        torch_cls(_model().parameters(), **kwargs)


def test_switchback_gradients_match_linear_within_int8_error():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192)
    sb = SwitchBackLinear.from_linear(torch.nn.Linear(256, 192))
    sb.load_state_dict(lin.state_dict())
    x = torch.randn(4, 16, 256)
    x[..., 7] *= 20  # an outlier feature
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = lin(xa), sb(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)

    def rel(a, b):
        return float((a - b).detach().norm() / b.detach().norm())

    assert rel(yb, ya) < 0.03  # int8 forward
    assert rel(xb.grad, xa.grad) < 0.03  # int8 input gradient
    assert rel(sb.weight.grad, lin.weight.grad) < 1e-5  # weight gradient in float
    assert rel(sb.bias.grad, lin.bias.grad) < 1e-6
    assert rel(yb, ya) > 0  # it really ran in int8


def test_to_switchback_swaps_linears_and_keeps_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    params = [id(p) for p in model.parameters()]
    to_switchback(model)
    assert all(isinstance(model[i], SwitchBackLinear) for i in (0, 2))
    assert [id(p) for p in model.parameters()] == params


def test_stable_embedding_keeps_fp32_state():
    emb = StableEmbedding(5000, 16)
    opt = Adam8bit(emb.parameters())
    emb(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["exp_avg"].dtype == torch.float32
