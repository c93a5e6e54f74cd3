"""lowbit: quantize large language models to 8, 4, 3 and 1.58 bits and measure what it costs."""
__version__ = "0.1.0"

from lowbit.checkpoint import CheckpointError, load, load_tokenizer, save  # noqa: E402
from lowbit.config import GPTQConfig, Int8Config, IntConfig, NF4Config, SpQRConfig, TernaryConfig, config_from_dict, config_from_json  # noqa: E402
from lowbit.eval.memory import memory_report  # noqa: E402
from lowbit.quantize import quantize  # noqa: E402

__all__ = ["CheckpointError", "load", "load_tokenizer", "save", "GPTQConfig", "Int8Config", "IntConfig", "NF4Config", "SpQRConfig", "TernaryConfig", "config_from_dict", "config_from_json", "memory_report", "quantize"]
