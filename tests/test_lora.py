"""LoRA adapters on lowbit layers through PEFT: wrapping, training, PEFT's adapter format, the Trainer."""
from __future__ import annotations

import json

import pytest
import torch

import lowbit
from test_checkpoint import logits, tiny_llama

peft = pytest.importorskip("peft")
from lowbit.train import LoraQuantLinear  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def qlora_model(seed: int = 0):
    torch.manual_seed(seed)
    model = lowbit.quantize(tiny_llama(), lowbit.NF4Config(), progress=False)
    return lowbit.prepare_for_training(model)


def lora(model, r: int = 8):
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))


def test_get_peft_model_wraps_lowbit_layers_and_trains_only_adapters():
    model = lora(qlora_model())
    wrapped = [m for m in model.modules() if isinstance(m, LoraQuantLinear)]
    layers = model.base_model.model.model.layers
    assert len(wrapped) == len(TARGETS) * len(layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    q = layers[0].self_attn.q_proj
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == len(layers) * 8 * sum(
        m.in_features + m.out_features for m in (q.base_layer, layers[0].self_attn.v_proj.base_layer, layers[0].mlp.down_proj.base_layer))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    with torch.no_grad():
        start = logits(model)
    assert torch.equal(start, logits(model.get_base_model()))  # lora_B starts at zero: the base model's output
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3))
    losses = []
    model.train()
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the quantized base did not move


def test_adapter_saves_in_peft_format_and_loads_to_identical_logits(tmp_path):
    model = lora(qlora_model())
    for m in model.modules():  # a trained-looking adapter, not the all-zero B of a fresh one
        if isinstance(m, LoraQuantLinear):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    model.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
    loaded = peft.PeftModel.from_pretrained(qlora_model(), tmp_path / "adapter")
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(logits(model), logits(loaded))


def test_trainer_runs_steps_with_gradient_checkpointing(tmp_path):
    import transformers

    model = lora(qlora_model())
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
                                          activation_checkpointing=True, use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    out = trainer.train()
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    assert model.base_model.model.is_activation_checkpointing


def test_bad_targets_and_unquantized_models_are_refused():
    with pytest.raises(ValueError, match="Target modules"):
        peft.get_peft_model(qlora_model(), peft.LoraConfig(r=4, target_modules=["no_such_proj"]))
    with pytest.raises(ValueError, match="quantize it first"):
        lowbit.prepare_for_training(tiny_llama())
    with pytest.raises(ValueError, match="positive integer"):
        peft.get_peft_model(qlora_model(), peft.LoraConfig(r=0, target_modules=TARGETS))


def random_adapters(model, seed: int = 5):
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoraQuantLinear):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)


def test_merge_to_full_precision_keeps_the_logits_and_requantize_is_close(tmp_path):
    from lowbit.nn import Linear4bit
    from lowbit.train import merge_and_requantize, merge_to_full_precision

    model = lora(qlora_model())
    with torch.no_grad():
        untouched = logits(model)
    # Zero adapters: W + 0 re-quantizes to the same codes; only the double-quantized absmax is coded anew.
    requantized = merge_and_requantize(lora(qlora_model()))
    assert not any(isinstance(m, LoraQuantLinear) for m in requantized.modules())
    with torch.no_grad():
        assert (logits(requantized) - untouched).abs().max() < 1e-2 * untouched.abs().max()
    random_adapters(model)
    model.eval()
    with torch.no_grad():
        adapted = logits(model)
    dense = merge_to_full_precision(model)
    assert isinstance(dense.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(logits(dense), adapted, rtol=1e-4, atol=1e-4)
    model = lora(qlora_model())
    random_adapters(model)
    back = merge_and_requantize(model)
    assert isinstance(back.model.layers[0].self_attn.q_proj, Linear4bit)
    with torch.no_grad():
        requant = logits(back)
    # Re-quantizing moves the merged weights by at most half an NF4 step: far less than the adapter changed.
    assert (requant - adapted).abs().mean() < 0.5 * (adapted - untouched).abs().mean()


def test_loftq_starts_closer_to_full_precision_than_plain_quantization():
    from lowbit.train import loftq

    torch.manual_seed(0)
    fp = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)}
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    model = loftq(fp, lowbit.NF4Config(), config, iters=2, progress=False)
    plain = lowbit.quantize(tiny_llama(), lowbit.NF4Config(), progress=False)
    for name, m in model.get_base_model().named_modules():
        if isinstance(m, LoraQuantLinear):
            w = weights[name]
            with_adapter = m.base_layer.dequantize() + m.get_delta_weight("default")
            plain_error = (w - plain.get_submodule(name).dequantize()).norm()
            assert (w - with_adapter).norm() < 0.9 * plain_error, name
    lowbit.prepare_for_training(model.get_base_model())  # freezes the base, leaves the attached adapters trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
