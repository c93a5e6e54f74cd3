"""Register lowbit with transformers as soon as transformers' quantizer registry exists, without importing it.

The registry (``transformers.quantizers.auto``) pulls in torch.distributed and sympy: about 2.5 s that
``import lowbit`` should not pay when no transformers model is loaded. Every path that loads one imports the
registry first, and this hook registers lowbit the moment it does.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_REGISTRY = "transformers.quantizers.auto"


class _AfterRegistryLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the registry module's loader so that lowbit registers right after it runs."""

    def find_spec(self, name, path, target=None):
        if name != _REGISTRY:
            return None
        sys.meta_path.remove(self)  # once; and so that find_spec below sees the normal finders
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            # Importing lowbit.interop.hf registers lowbit. If that import is what loaded the registry, the module
            # is still half made here and registers itself when it finishes.
            if "lowbit.interop.hf" not in sys.modules:
                import lowbit.interop.hf  # noqa: F401

        spec.loader.exec_module = exec_module
        return spec


def register_with_transformers() -> None:
    """Register now if transformers' registry is loaded, else when it loads."""
    if _REGISTRY in sys.modules:
        import lowbit.interop.hf  # noqa: F401 - registers on import
    elif not any(isinstance(f, _AfterRegistryLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterRegistryLoads())
