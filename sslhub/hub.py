"""Moved to ``sslhub.publish.push`` (use ``from sslhub import push_to_hub``); this name keeps old imports working, with a warning."""
import importlib
import sys
import warnings

warnings.warn("sslhub.hub moved to sslhub.publish.push (from sslhub import push_to_hub)", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("sslhub.publish.push")
