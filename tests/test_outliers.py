"""The emergent-feature detector: exactly the planted dimensions on a synthetic model; checked by brute force on the real one."""
import pytest
import torch
from torch import nn

from lowbit.analysis import ablate_dims, find_outliers, random_dims, token_windows
from lowbit.data import default_text

WIDTH, LAYERS, T = 32, 8, 400


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH)
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)


class Planted(nn.Module):
    """Each block's linear layer reads noise (|x| < 3) plus the planted values of that block."""

    def __init__(self, plants):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.plants = plants  # [LAYERS, T, WIDTH]
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x):
        return self.head(sum(blk.proj(x + self.plants[i]) for i, blk in enumerate(self.layers)))


def planted_model():
    g = torch.Generator().manual_seed(0)
    plants = torch.zeros(LAYERS, T, WIDTH)
    pos = lambda share: torch.randperm(T, generator=g)[: int(share * T)]
    plants[:, pos(0.30), 3] = 10.0      # all layers, 30% of positions: an outlier feature
    plants[:4, pos(0.10), 11] = -8.0    # half the layers, 10% of positions: an outlier feature
    plants[5, pos(0.50), 20] = 9.0      # one layer of eight (12.5% < 25%): not
    plants[:, pos(0.03), 27] = 12.0     # every layer but 3% of positions (< 6%): not
    plants[:, :, 5] = 5.5               # everywhere, but below the threshold: not
    plants[:2, pos(0.5), 30] = 7.0      # 2 of 8 layers = 25%, 50% of positions: an outlier (limits inclusive)
    noise = torch.randn(1, T, WIDTH, generator=g).clamp(-3, 3)
    noise[..., 5] *= 0.1  # 5.5 +- 0.3 stays below 6
    return Planted(plants).eval(), noise


def test_finds_exactly_the_planted_dimensions():
    model, x = planted_model()
    with torch.no_grad():
        report = find_outliers(model, [x])
    assert report.width == WIDTH and len(report.layers) == LAYERS and report.positions == T
    assert sorted(f["dim"] for f in report.features) == [3, 11, 30]
    by_dim = {f["dim"]: f for f in report.features}
    assert by_dim[3]["layer_share"] == 1.0 and by_dim[3]["position_share"] == pytest.approx(0.30)
    assert by_dim[11]["layers"] == 4 and by_dim[11]["max_abs"] == pytest.approx(8.0, abs=3)
    assert by_dim[30]["layer_share"] == 0.25
    # A higher threshold drops the weaker plants.
    strong = find_outliers(model, [x], threshold=9.5)
    assert [f["dim"] for f in strong.features] == [3]


def test_ablation_zeroes_only_the_given_dims():
    model, x = planted_model()
    seen = []
    hook = model.layers[0].proj.register_forward_hook(lambda m, a, out: seen.append(a[0].clone()))  # sees what forward saw
    with torch.no_grad(), ablate_dims(model, [3, 11]):
        model(x)
    model(x)
    hook.remove()
    zeroed, plain = seen
    assert (zeroed[..., [3, 11]] == 0).all() and torch.equal(zeroed[..., 4], plain[..., 4])
    assert plain[..., 3].abs().max() > 6  # the context manager restored the model
    r = random_dims(WIDTH, 2, [3, 11])
    assert len(r) == 2 and not set(r) & {3, 11}


def test_real_model_matches_brute_force(smollm):
    """Recompute the criteria from every recorded input with plain tensor code, independently of the detector."""
    model, tok = smollm
    windows = token_windows(tok, default_text(), tokens=512)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach().clone()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features == 576 and ".layers." in n]
    with torch.no_grad():
        model(windows[0])
        report = find_outliers(model, windows)
    for h in hooks:
        h.remove()
    x = torch.stack([t.reshape(-1, 576) for t in inputs.values()])  # [linear layers, positions, dims]
    block = [int(n.split(".layers.")[1].split(".")[0]) for n in inputs]
    hit = x.abs() >= 6
    per_block = torch.stack([hit[[i for i, b in enumerate(block) if b == k]].any(0).any(0) for k in sorted(set(block))])
    layer_share = per_block.float().mean(0)
    pos_share = hit.any(0).float().mean(0)
    expected = ((layer_share >= 0.25) & (pos_share >= 0.06)).nonzero().flatten().tolist()
    assert sorted(f["dim"] for f in report.features) == expected
    assert report.summary()["layers"] == 30
    assert expected, "SmolLM2-135M has at least one emergent outlier feature on this text"
