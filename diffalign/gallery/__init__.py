"""Seeing results: captioned grids, training-curve plots and the ``diffalign gallery`` HTML page.

- :mod:`diffalign.gallery.grids`: numbered PNGs and captioned image grids (every grid diffalign writes);
- :mod:`diffalign.gallery.rundir`: what a ``diffalign train`` run directory holds, read with one-line errors;
- :mod:`diffalign.gallery.plots`: matplotlib PNGs of metrics.jsonl / eval.jsonl, several runs per axis;
- :mod:`diffalign.gallery.page`: the self-contained static HTML page;
- :mod:`diffalign.gallery.cli`: the ``diffalign gallery`` and ``diffalign plot`` subcommands.
"""

from diffalign.gallery.grids import (
    GridLayout,
    captioned_grid,
    grid,
    image_name,
    save_grid,
    save_images,
    slug,
    to_pil,
)

__all__ = ["GridLayout", "captioned_grid", "grid", "image_name", "save_grid", "save_images", "slug", "to_pil"]
