"""Moved to ``sslhub.inference.zeroshot`` (use ``from sslhub import ZeroShotClassifier``); this name keeps old imports working, with a warning."""
import importlib
import sys
import warnings

warnings.warn("sslhub.zeroshot moved to sslhub.inference.zeroshot (from sslhub import ZeroShotClassifier)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("sslhub.inference.zeroshot")
