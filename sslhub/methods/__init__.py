"""Built-in methods.  Importing this package registers each one (one import line per method)."""
from . import clip, rotation, simclr  # noqa: F401
