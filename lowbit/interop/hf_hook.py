"""Register lowbit with a library the moment that library's module is imported, without importing it.

transformers' quantizer registry (``transformers.quantizers.auto``) pulls in torch.distributed and sympy, about
2.5 s, and peft costs seconds more: ``import lowbit`` should pay for neither when neither is used. Every path that
uses one imports its module first, and this hook imports lowbit's registering module right after it.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps ``target``'s loader so that ``registrar`` is imported right after it runs."""

    def __init__(self, target: str, registrar: str) -> None:
        self.target, self.registrar = target, registrar

    def find_spec(self, name, path, target=None):
        if name != self.target:
            return None
        spec = self._spec_after_me(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            # Gone only once the module ran: a find_spec that only asks whether it exists (transformers probes
            # peft so) must not use the hook up.
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            # If importing the registrar is what loaded the target, the registrar is still half made here and
            # registers itself when it finishes.
            if self.registrar not in sys.modules:
                importlib.import_module(self.registrar)

        spec.loader.exec_module = exec_module
        return spec

    def _spec_after_me(self, name, path, target):
        """The spec the finders after this one give (the module's own, as if this hook were not there)."""
        finders = sys.meta_path[sys.meta_path.index(self) + 1:] if self in sys.meta_path else sys.meta_path
        for finder in finders:
            find = getattr(finder, "find_spec", None)
            spec = None if find is None else find(name, path, target)
            if spec is not None:
                return spec
        return None


def register_when_imported(target: str, registrar: str) -> None:
    """Import ``registrar`` (a module that registers lowbit as it is imported) now if module ``target`` is loaded,
    else right after ``target`` loads."""
    if target in sys.modules:
        importlib.import_module(registrar)
    elif not any(isinstance(f, _AfterImport) and (f.target, f.registrar) == (target, registrar) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(target, registrar))


# The module each library loads before it can use lowbit -> the lowbit module that registers with it on import.
INTEGRATIONS = {
    "transformers.quantizers.auto": "lowbit.interop.hf",  # from_pretrained opens quant_method "lowbit" checkpoints
    "peft": "lowbit.train.lora",  # PEFT's LoRA wraps lowbit layers (get_peft_model, PeftModel.from_pretrained)
}


def register_integrations() -> None:
    """Register lowbit with transformers and PEFT: with each now if it is loaded, else when it loads."""
    for target, registrar in INTEGRATIONS.items():
        register_when_imported(target, registrar)
