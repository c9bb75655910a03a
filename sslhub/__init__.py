"""sslhub: self-supervised learning, from recipe to Hub checkpoint to zero-shot, retrieval and k-NN."""
__version__ = "0.1.0"

from .loading import Encoder, LoadError, load_encoder  # noqa: E402

__all__ = ["load_encoder", "Encoder", "LoadError", "__version__"]
