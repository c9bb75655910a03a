"""Built-in methods. Importing this package (or anything in it) registers each one: one import line per method."""
from sslhub.methods import (
    barlow_twins,  # noqa: F401
    byol,  # noqa: F401
    clip,  # noqa: F401
    cpc,  # noqa: F401
    dino,  # noqa: F401
    jigsaw,  # noqa: F401
    mae,  # noqa: F401
    moco_v2,  # noqa: F401
    moco_v3,  # noqa: F401
    relative_position,  # noqa: F401
    rotation,  # noqa: F401
    simmim,  # noqa: F401
    simclr,  # noqa: F401
    simsiam,  # noqa: F401
    swav,  # noqa: F401
    vicreg,  # noqa: F401
)
from sslhub.methods.registry import get_method, list_methods, register_method

__all__ = ["get_method", "list_methods", "register_method"]
