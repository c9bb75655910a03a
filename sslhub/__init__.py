"""sslhub: self-supervised learning, from recipe to Hub checkpoint to zero-shot, retrieval and k-NN.

The inference API is importable from here (as open_clip's is)::

    from sslhub import load_encoder, ZeroShotClassifier, build_index, load_index

``import sslhub`` itself imports no torch, no training side (recipes, methods, trainer) and nothing else heavy,
so ``sslhub --help`` answers at once: each name of the API imports its module on first use (PEP 562; FAISS
itself only when an index is built or loaded). Once timm is imported too, in either order, sslhub's
CIFAR-stem architectures (``resnet18_cifar`` …) are registered with it, so plain ``timm.create_model`` loads
those exports.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from sslhub._version import __version__
from sslhub.errors import SslhubError

# name → module, imported when the name is first used (PEP 562)
_LAZY = {
    "load_encoder": "sslhub.inference.load",
    "Encoder": "sslhub.inference.loaders.base",
    "LoadError": "sslhub.inference.loaders.base",
    "ZeroShotClassifier": "sslhub.inference.zeroshot",
    "PrototypeClassifier": "sslhub.inference.zeroshot",
    "check_labels": "sslhub.inference.zeroshot",
    "Index": "sslhub.inference.retrieval",
    "build_index": "sslhub.inference.retrieval",
    "load_index": "sslhub.inference.retrieval",
    "push_to_hub": "sslhub.publish.push",
}
_TIMM_ARCHS = "sslhub.models.backbone"  # registers the CIFAR-stem architectures with timm when imported


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """A post-import hook: imports ``_TIMM_ARCHS`` right after timm's own module has run, then uninstalls itself.

    It finds timm with the other finders and wraps that spec's ``exec_module``; a mere lookup
    (``importlib.util.find_spec("timm")``, as libraries do to see what is installed) changes nothing.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module  # the loader is this spec's own (a new one per lookup)

            def exec_then_register(module):
                exec_module(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                importlib.import_module(_TIMM_ARCHS)

            spec.loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    importlib.import_module(_TIMM_ARCHS)
else:
    sys.meta_path.insert(0, _AfterTimmImport())


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sslhub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "SslhubError", *_LAZY]
