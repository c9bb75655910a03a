"""Prompt templates for zero-shot classification (``"{}"`` is replaced by the class name).

- ``imagenet``: the 80 templates of Radford et al. 2021 (CLIP, https://arxiv.org/abs/2103.00020),
  as published in OpenAI's CLIP repository and used by open_clip and CLIP_benchmark.
- ``imagenet-simple``: the 7-template subset open_clip ships as SIMPLE_IMAGENET_TEMPLATES.
- ``cifar``: the 18 CIFAR-10/100 templates of the same source.
- ``default``: one template, ``"a photo of a {}."``.
"""
from __future__ import annotations

from typing import Sequence, Union

from sslhub.errors import InputError

IMAGENET_TEMPLATES = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)

IMAGENET_SIMPLE_TEMPLATES = (
    'itap of a {}.',
    'a bad photo of the {}.',
    'a origami {}.',
    'a photo of the large {}.',
    'a {} in a video game.',
    'art of the {}.',
    'a photo of the small {}.',
)

CIFAR_TEMPLATES = (
    'a photo of a {}.',
    'a blurry photo of a {}.',
    'a black and white photo of a {}.',
    'a low contrast photo of a {}.',
    'a high contrast photo of a {}.',
    'a bad photo of a {}.',
    'a good photo of a {}.',
    'a photo of a small {}.',
    'a photo of a big {}.',
    'a photo of the {}.',
    'a blurry photo of the {}.',
    'a black and white photo of the {}.',
    'a low contrast photo of the {}.',
    'a high contrast photo of the {}.',
    'a bad photo of the {}.',
    'a good photo of the {}.',
    'a photo of the small {}.',
    'a photo of the big {}.',
)

DEFAULT_TEMPLATES = ("a photo of a {}.",)

TEMPLATE_SETS = {
    "default": DEFAULT_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES,
    "imagenet-simple": IMAGENET_SIMPLE_TEMPLATES,
    "cifar": CIFAR_TEMPLATES,
}


def resolve_templates(templates: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """A set name (``default``, ``imagenet``, ``imagenet-simple``, ``cifar``) or the user's own list."""
    if templates is None:
        return DEFAULT_TEMPLATES
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        if "{}" in templates:
            return (templates,)
        raise InputError(f"unknown template set {templates!r}: use one of {', '.join(TEMPLATE_SETS)} "
                         "or a list of strings containing '{}'")
    out = tuple(templates)
    if not out:
        raise InputError("templates: the list is empty")
    bad = [t for t in out if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise InputError(f"templates: {bad[0]!r} has no '{{}}' where the class name goes")
    return out
