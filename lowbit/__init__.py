"""lowbit: quantize large language models to 8, 4, 3 and 1.58 bits and measure what it costs."""
from lowbit.version import __version__  # noqa: F401

from lowbit.checkpoint import CheckpointError, load, load_tokenizer, save  # noqa: E402
from lowbit.config import GPTQConfig, Int8Config, IntConfig, NF4Config, SpQRConfig, TernaryConfig, config_from_json  # noqa: E402
from lowbit.decode import generate  # noqa: E402
from lowbit.eval.memory import memory_report  # noqa: E402
from lowbit.quantize import quantize  # noqa: E402
from lowbit.embeddings import quantize_embeddings  # noqa: E402
from lowbit.plan import Plan  # noqa: E402
from lowbit.nn.ggml import BlockConfig  # noqa: E402
from lowbit.calibrate.gptq_blocks import GPTQBlockConfig  # noqa: E402
from lowbit.rotation import rotate  # noqa: E402
# lowbit.config_from_dict rebuilds any saved quantization, a Plan included
from lowbit.plan import quantization_from_dict as config_from_dict  # noqa: E402
from lowbit.stream import quantize_checkpoint  # noqa: E402
from lowbit.interop.bitsandbytes import quiet_kernel_notice  # noqa: E402
from lowbit.interop.hf_hook import register_integrations  # noqa: E402

# From here on AutoModelForCausalLM.from_pretrained(dir) opens lowbit checkpoints and PEFT adapters load onto lowbit
# models, without lowbit.train imported.
register_integrations()
# bitsandbytes' notice that an optional kernel package could not be fetched, printed when lowbit.train, peft or
# transformers imports it, reads like a lowbit failure: dropped (a logging filter; bitsandbytes is not imported).
quiet_kernel_notice()



def __getattr__(name: str):
    # Training needs peft; import it only when asked for.
    if name == "prepare_for_training":
        from lowbit.train import prepare_for_training

        return prepare_for_training
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


__all__ = ["prepare_for_training", "CheckpointError", "load", "load_tokenizer", "save", "BlockConfig", "GPTQBlockConfig", "GPTQConfig", "Int8Config", "IntConfig", "NF4Config", "SpQRConfig", "TernaryConfig", "config_from_dict", "config_from_json", "generate", "memory_report", "quantize", "quantize_checkpoint", "quantize_embeddings", "Plan", "rotate"]
