"""Moved to ``sslhub.inference.retrieval`` (use ``from sslhub import build_index, load_index``); this name keeps old imports working, with a warning."""
import importlib
import sys
import warnings

warnings.warn("sslhub.retrieval moved to sslhub.inference.retrieval (from sslhub import build_index, load_index)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("sslhub.inference.retrieval")
