"""Moved to ``sslhub.train.trainer`` (use ``from sslhub.train.trainer import train``); this name keeps old imports working, with a warning."""
import importlib
import sys
import warnings

warnings.warn("sslhub.trainer moved to sslhub.train.trainer (from sslhub.train.trainer import train)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("sslhub.train.trainer")
