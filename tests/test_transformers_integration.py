"""lowbit as a transformers quantization method (issue 15 item 1): quantize while from_pretrained reads the weights,
save_pretrained / lowbit.save folders that both loaders open to identical logits, the tokenizer at the top of the
folder, and one clear error for a lowbit entry this version cannot read."""
import copy
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, pipeline)

import lowbit

IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def _tiny(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    if arch == "gpt2":  # Conv1D layers, weights stored [in, out]
        return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False))  # biased q/k/v, an untied head


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# Every config from_pretrained can apply (GPTQ and SpQR need calibration data).
CONFIGS = {"nf4": lambda: lowbit.NF4Config(), "fp4-bf16": lambda: lowbit.NF4Config(quant_type="fp4", compute_dtype=torch.bfloat16),
           "int4": lambda: lowbit.NF4Config(quant_type="int4"), "int8": lambda: lowbit.Int8Config(),
           "int8-weight": lambda: lowbit.Int8Config(weight_only=True), "rtn3": lambda: lowbit.IntConfig(bits=3, group_size=32),
           "ternary": lambda: lowbit.TernaryConfig()}


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def fp_folder(request, tmp_path_factory):
    model = _tiny(request.param).eval()
    path = tmp_path_factory.mktemp(request.param) / "fp"
    model.save_pretrained(path)
    return path, model


@pytest.mark.filterwarnings("ignore:ternary weights made post-training")
@pytest.mark.parametrize("name", CONFIGS)
def test_from_pretrained_quantizes_as_lowbit_quantize_does(tmp_path, fp_folder, name):
    path, fp = fp_folder
    expected_model = lowbit.quantize(copy.deepcopy(fp), CONFIGS[name](), progress=False)
    expected = logits(expected_model)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=CONFIGS[name]())
    layer_types = {type(m).__name__ for m in model.modules() if isinstance(m, lowbit.nn.QuantLinear)}
    assert layer_types == {type(m).__name__ for m in expected_model.modules() if isinstance(m, lowbit.nn.QuantLinear)}
    assert torch.equal(logits(model), expected)
    assert model.lowbit_config == CONFIGS[name]()
    # save_pretrained: both loaders open it.
    model.save_pretrained(tmp_path / "hf")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")), expected)
    assert torch.equal(logits(lowbit.load(tmp_path / "hf")), expected)
    # lowbit.save: both loaders open it.
    lowbit.save(model, tmp_path / "lb")
    assert torch.equal(logits(lowbit.load(tmp_path / "lb")), expected)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "lb")
    assert torch.equal(logits(again), expected)
    assert again.lowbit_config == CONFIGS[name]()


def test_quantize_on_load_never_holds_the_full_precision_model(tmp_path, fp_folder, monkeypatch):
    # Each weight is quantized as it is read: at no point do two full-precision linear weights live in lowbit layers'
    # places. Counted where transformers hands a read weight to lowbit.
    from lowbit.interop import hf

    path, _ = fp_folder
    seen, alive = [], []
    real = hf.LowbitQuantize.convert

    def counting(self, input_dict, model=None, full_layer_name=None, **kw):
        out = real(self, input_dict, model=model, full_layer_name=full_layer_name, **kw)
        float_linears = [n for n, m in model.named_modules()
                         if isinstance(m, (torch.nn.Linear,)) and not m.weight.is_meta and n in self.hf_quantizer.targets]
        alive.append(len(float_linears))
        seen.append(full_layer_name)
        return out

    monkeypatch.setattr(hf.LowbitQuantize, "convert", counting)
    AutoModelForCausalLM.from_pretrained(path, quantization_config=lowbit.NF4Config())
    assert seen and max(alive) == 0


def test_calibrated_configs_say_what_to_do(fp_folder):
    path, _ = fp_folder
    with pytest.raises(ValueError, match="needs calibration data"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=lowbit.GPTQConfig())


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(format_version=99), "format 99.*upgrade lowbit"),
    (lambda q: q.pop("format_version"), "format_version is missing"),
    (lambda q: q.update(layers=[]), "layers must be an object"),
    (lambda q: next(iter(q["layers"].values())).update(type="os.system"), "not a lowbit layer"),
    (lambda q: q.update(config={"method": "4bit", "blocksize": 0}), "blocksize"),
])
def test_a_lowbit_entry_this_version_cannot_read_is_one_clear_error(tmp_path, edit, message):
    model = lowbit.quantize(_tiny("llama"), lowbit.NF4Config(), progress=False)
    lowbit.save(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    edit(cfg["quantization_config"])
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "ck" / "lowbit.json").unlink()  # as a save_pretrained folder: transformers' path alone
    with pytest.raises(lowbit.CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    proc = subprocess.run([sys.executable, "-m", "lowbit", "eval", str(tmp_path / "ck"), "--tokens", "16"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1 and re.search(message, " ".join(proc.stderr.split())), proc.stderr


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from lowbit.app.models import _converted_dir, load_default_model

    load_default_model()  # makes the fp32 folder once
    return _converted_dir()


def test_smollm2_through_from_pretrained_pipeline_and_tokenizer(tmp_path, smollm):
    model = AutoModelForCausalLM.from_pretrained(smollm, quantization_config=lowbit.NF4Config())
    tok = AutoTokenizer.from_pretrained(smollm)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    reference = lowbit.quantize(AutoModelForCausalLM.from_pretrained(smollm).eval(), lowbit.NF4Config(), progress=False)
    assert torch.equal(logits(model, ids), logits(reference, ids))
    lowbit.save(model, tmp_path / "ck", tokenizer=tok)
    assert (tmp_path / "ck" / "tokenizer.json").is_file()  # at the top, where AutoTokenizer looks
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "ck")
    assert tok2("The capital of France is").input_ids == ids[0].tolist()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert torch.equal(logits(loaded, ids), logits(reference, ids))
    out = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, reference.generate(ids, max_new_tokens=6, do_sample=False))
    text = pipeline("text-generation", model=str(tmp_path / "ck"), max_new_tokens=6, do_sample=False)(
        "The capital of France is")[0]["generated_text"]
    assert text == tok.decode(out[0], skip_special_tokens=True)
    assert "Paris" in text
    # An old-layout checkpoint (tokenizer in a folder of its own) still gives its tokenizer.
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "ck", old)
    (old / "tok-folder").mkdir()
    tok.save_pretrained(old / "tok-folder")
    manifest = json.loads((old / "lowbit.json").read_text())
    manifest["tokenizer"] = "tok-folder"
    (old / "lowbit.json").write_text(json.dumps(manifest))
    assert lowbit.load_tokenizer(old)("The capital of France is").input_ids == ids[0].tolist()


def test_import_lowbit_registers_without_loading_transformers_registry(tmp_path):
    # The registry costs ~2.5 s to import; lowbit registers the moment something else imports it.
    lowbit.save(lowbit.quantize(_tiny("llama"), lowbit.NF4Config(), progress=False), tmp_path / "ck")
    script = f"""
import sys, lowbit
assert "transformers.quantizers.auto" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ck')!r})
print(type(model.model.layers[0].mlp.up_proj).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Linear4bit"]
    # Importing the integration module itself first (it loads the registry, which calls back into it) registers too.
    direct = ("import lowbit, lowbit.interop.hf\nfrom transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
              "print('lowbit' in AUTO_QUANTIZER_MAPPING)")
    proc = subprocess.run([sys.executable, "-c", direct], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.split() == ["True"], proc.stderr


@pytest.mark.parametrize("config", [lowbit.GPTQConfig(bits=4, group_size=32, n_samples=4, seq_len=16),
                                    lowbit.SpQRConfig(n_samples=4, seq_len=16)], ids=["gptq", "spqr"])
def test_calibrated_checkpoints_open_in_transformers(tmp_path, config):
    calibration = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    model = lowbit.quantize(_tiny("llama").eval(), config, progress=False, calibration=calibration)
    lowbit.save(model, tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.lowbit_config == config
