"""Prompt sources and the deterministic, resumable prompt stream of a training run.

A source is a list of prompts, ``shapes:train`` / ``shapes:heldout`` (the fixed splits of the
shapes world), or a text file with one prompt per line (``file:PATH`` or just ``PATH``; a relative
path is looked up under the working directory, and in a config file also next to the config file,
see :func:`diffalign.config.resolve_config_paths`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffalign.errors import DiffalignError
from diffalign.paths import resolve_local


def load_prompts(source: str | list[str], key: str = "prompts", base: str | Path | None = None) -> list[str]:
    """The prompts of ``source``; ``key`` names the config key in error messages.

    A prompt file is looked up as given (relative paths against the working directory), then
    relative to ``base`` (a config file's directory) when given (:func:`diffalign.paths.resolve_local`).
    """
    if isinstance(source, list):
        prompts = [p.strip() for p in source if isinstance(p, str) and p.strip()]
        if not prompts:
            raise DiffalignError(f"{key} is an empty list; give at least one prompt")
        return prompts
    text = source.strip()
    if text.startswith("shapes:"):
        from diffalign.shapes import split_prompts

        return split_prompts(text.split(":", 1)[1])
    written = text[len("file:") :] if text.startswith("file:") else text
    path = resolve_local(written, base) or Path(written).expanduser()
    if path.is_dir():
        raise DiffalignError(f"{key}: prompt file {str(path)!r} is a directory; give a text file (one prompt per line)")
    if not path.is_file():
        where = "" if path.is_absolute() else f" under {Path.cwd()}"
        if base is not None and not path.is_absolute():
            where += f" nor under {base} (the config file's directory)"
        raise DiffalignError(
            f"{key}: prompt file {str(path)!r} does not exist{where}; give a text file (one prompt per line), "
            "shapes:train, shapes:heldout or a list"
        )
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise DiffalignError(f"{key}: cannot read prompt file {str(path)!r}: {err}") from None
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise DiffalignError(f"{key}: prompt file {str(path)!r} is empty; write one prompt per line")
    return prompts


def non_shapes_prompt(prompts: list[str]) -> str | None:
    """The first prompt that is not a shapes-world caption, or None if all are."""
    from diffalign.shapes import parse_caption

    for p in prompts:
        try:
            parse_caption(p)
        except DiffalignError:
            return p
    return None


def eval_prompts(prompts: list[str], n: int, seed: int = 0) -> list[str]:
    """A fixed subset of ``n`` prompts (all if ``n`` is 0 or too large), seeded, in a stable order."""
    if n <= 0 or n >= len(prompts):
        return list(prompts)
    idx = np.random.default_rng(seed).permutation(len(prompts))[:n]
    return [prompts[i] for i in sorted(idx)]


class PromptSampler:
    """Endless shuffled passes over a prompt list: pass ``e`` is a permutation seeded by (seed, e).

    The state is two integers (pass, position), so a resumed run draws exactly the prompts the
    uninterrupted run would have drawn. Every process draws the same global batch and keeps its slice.
    """

    def __init__(self, prompts: list[str], seed: int = 0) -> None:
        self.prompts, self.seed = list(prompts), seed
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))

    def next(self, n: int) -> list[str]:
        out: list[str] = []
        order = self._order()
        while len(out) < n:
            if self.position >= len(self.prompts):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            take = min(n - len(out), len(self.prompts) - self.position)
            out += [self.prompts[i] for i in order[self.position : self.position + take]]
            self.position += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_prompts"]) != len(self.prompts):
            raise DiffalignError(
                f"the checkpoint was written with {state['num_prompts']} training prompts, the config now gives "
                f"{len(self.prompts)}; resume with the same prompts.train"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
