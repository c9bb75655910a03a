"""sslhub: self-supervised learning, from recipe to Hub checkpoint to zero-shot, retrieval and k-NN.

The inference API is importable from here (as open_clip's is)::

    from sslhub import load_encoder, ZeroShotClassifier, build_index, load_index

``import sslhub`` loads the inference side only, never the training side (recipes, methods, trainer);
the rest of the API is imported on first use (FAISS itself only when an index is built or loaded).
"""
from sslhub._version import __version__
from sslhub.errors import SslhubError
from sslhub.inference.load import load_encoder
from sslhub.inference.loaders.base import Encoder, LoadError

# name → module, imported when the name is first used (PEP 562)
_LAZY = {
    "ZeroShotClassifier": "sslhub.inference.zeroshot",
    "PrototypeClassifier": "sslhub.inference.zeroshot",
    "check_labels": "sslhub.inference.zeroshot",
    "Index": "sslhub.inference.retrieval",
    "build_index": "sslhub.inference.retrieval",
    "load_index": "sslhub.inference.retrieval",
    "push_to_hub": "sslhub.publish.push",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sslhub' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "load_encoder", "Encoder", "LoadError", "SslhubError", *_LAZY]
