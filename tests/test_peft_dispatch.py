"""PEFT adapters load onto lowbit models after `import lowbit` alone: each case runs in a fresh interpreter, so that
nothing (lowbit.train above all) was imported before, as in a process that only serves an adapter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from test_checkpoint import IDS, logits, tiny_llama

peft = pytest.importorskip("peft")
from lowbit.train import LoraQuantLinear  # noqa: E402 - this process makes the adapter, as `lowbit finetune` does

ROOT = Path(__file__).resolve().parent.parent

# Loads the adapter onto the tiny model quantized here to NF4 and saves the logits on the saved ids.
ONTO_QUANTIZED = """
import sys
from pathlib import Path

import torch
{imports}
import peft
import transformers

root = Path(sys.argv[1])
model = lowbit.quantize(transformers.LlamaForCausalLM.from_pretrained(root / "fp32"), lowbit.NF4Config(), progress=False)
model = peft.PeftModel.from_pretrained(model, root / "adapter").eval()
with torch.no_grad():
    torch.save(model(torch.load(root / "ids.pt")).logits, sys.argv[2])
"""

# Opens the adapter alone: peft reads the base's folder (a lowbit checkpoint) from adapter_config.json.
AUTO_PEFT = """
import sys
from pathlib import Path

import torch
import lowbit
from peft import AutoPeftModelForCausalLM

root = Path(sys.argv[1])
model = AutoPeftModelForCausalLM.from_pretrained(root / "adapter").eval()
with torch.no_grad():
    torch.save(model(torch.load(root / "ids.pt")).logits, sys.argv[2])
"""


def run_fresh(code: str, *args: str) -> str:
    """Run ``code`` in a new interpreter; its stdout (the test fails on a nonzero exit, with its stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A folder with the tiny model in fp32, its NF4 lowbit checkpoint, a LoRA adapter (nonzero B) on q_proj and
    v_proj made on that checkpoint, and the ids; and the logits of the adapted and of the bare model."""
    import transformers

    root = tmp_path_factory.mktemp("peft_dispatch")
    fp32 = tiny_llama()
    fp32.save_pretrained(root / "fp32")
    lowbit.save(lowbit.quantize(fp32, lowbit.NF4Config(), progress=False), root / "base")
    # Opened by path, so that the adapter's base_model_name_or_path names the checkpoint folder.
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base").eval()
    torch.manual_seed(1)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(base, config).eval()
    for m in model.modules():  # a trained-looking adapter, not the all-zero B of a fresh one
        if isinstance(m, LoraQuantLinear):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    model.save_pretrained(root / "adapter")
    torch.save(IDS, root / "ids.pt")
    with model.disable_adapter():
        bare = logits(model)
    return {"root": root, "adapted": logits(model), "bare": bare}


def loaded_logits(saved: dict, code: str) -> torch.Tensor:
    out = saved["root"] / "got.pt"
    out.unlink(missing_ok=True)
    run_fresh(code, str(saved["root"]), str(out))
    return torch.load(out)


# What the serving process imports before peft.PeftModel.from_pretrained: lowbit alone; peft first (registered at once
# by `import lowbit`); peft only looked for first (transformers asks importlib whether peft exists), then imported.
IMPORTS = {"lowbit": "import lowbit", "peft_first": "import peft\nimport lowbit",
           "peft_probed_first": "import lowbit\nimport importlib.util\nassert importlib.util.find_spec('peft')"}


@pytest.mark.parametrize("order", IMPORTS)
def test_import_lowbit_is_enough_for_peft_model_from_pretrained(saved, order):
    assert not torch.equal(saved["adapted"], saved["bare"])  # the adapter changes the output: its loading shows
    got = loaded_logits(saved, ONTO_QUANTIZED.format(imports=IMPORTS[order]))
    assert torch.equal(got, saved["adapted"])


def test_auto_peft_model_opens_an_adapter_made_on_a_lowbit_checkpoint(saved):
    config = json.loads((saved["root"] / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == saved["root"] / "base"
    got = loaded_logits(saved, AUTO_PEFT)
    assert torch.equal(got, saved["adapted"])


def test_import_lowbit_alone_imports_neither_peft_nor_the_transformers_registry():
    out = run_fresh("import json, sys\nimport lowbit\n"
                    "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'peft'\n"
                    "    or m.startswith(('transformers.quantizers', 'lowbit.train', 'lowbit.interop.hf')))))")
    # lowbit.interop.hf_hook is the hook itself; lowbit.interop.hf and lowbit.train are what it imports later.
    assert json.loads(out.strip().splitlines()[-1]) == ["lowbit.interop.hf_hook"]
