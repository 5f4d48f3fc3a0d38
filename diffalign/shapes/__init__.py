"""The embedded shapes world: generator, captions, fixed prompt splits and the exact gold verifier."""

from diffalign.shapes.splits import SPLIT_VERSION, sample_prompts, split_prompts, split_specs
from diffalign.shapes.world import (
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    WORLD_VERSION,
    Group,
    SceneSpec,
    parse_caption,
    render,
)

__all__ = [
    "COLORS",
    "IMAGE_SIZE",
    "SHAPES",
    "SPLIT_VERSION",
    "WORLD_VERSION",
    "Group",
    "SceneSpec",
    "parse_caption",
    "render",
    "sample_prompts",
    "split_prompts",
    "split_specs",
]
