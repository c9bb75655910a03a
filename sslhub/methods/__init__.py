"""Built-in methods.  Importing this package registers each one (one import line per method)."""
from . import clip  # noqa: F401
from . import rotation  # noqa: F401
from . import simclr  # noqa: F401
