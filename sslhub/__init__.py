"""sslhub: self-supervised learning, from recipe to Hub checkpoint to zero-shot, retrieval and k-NN.

The inference API is importable from here (as open_clip's is)::

    from sslhub import load_encoder, ZeroShotClassifier, build_index, load_index

``import sslhub`` loads the inference side only, never the training side (recipes, methods, trainer);
names that need an optional extra (FAISS for ``build_index`` / ``load_index``) are imported on first use.
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
_EXTRA = {"sslhub.inference.retrieval": "retrieval"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sslhub' has no attribute {name!r}")
    import importlib

    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        extra = _EXTRA.get(module)
        if extra is None or (e.name or "").startswith("sslhub"):
            raise
        raise ModuleNotFoundError(f"sslhub.{name} needs {e.name!r}: pip install 'sslhub[{extra}]'", name=e.name) from e
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "load_encoder", "Encoder", "LoadError", "SslhubError", *_LAZY]
