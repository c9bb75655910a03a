"""Built-in methods.  Importing this package registers each one (one import line per method)."""
from . import barlow_twins  # noqa: F401
from . import byol  # noqa: F401
from . import clip  # noqa: F401
from . import dino  # noqa: F401
from . import moco_v2  # noqa: F401
from . import moco_v3  # noqa: F401
from . import rotation  # noqa: F401
from . import simclr  # noqa: F401
from . import simsiam  # noqa: F401
from . import swav  # noqa: F401
from . import vicreg  # noqa: F401
