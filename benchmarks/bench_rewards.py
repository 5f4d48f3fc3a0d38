"""CPU time per image of every reward on the tiny test backbones (1 thread).

Builds the tiny random models of ``tests/rewards_fixtures.py`` in a temporary directory, loads each
reward through ``get_reward`` and times ``reward(images, prompts)`` (and forward + backward for the
differentiable ones) on 64x64 shapes renders. Times are process CPU time (``time.process_time``),
robust to other jobs on the machine. The tiny models measure the overhead of the reward code
(preprocessing, tokenising, JPEG encoding, the verifier), not the speed of the real backbones.

    python benchmarks/bench_rewards.py [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def specs(root: Path) -> dict[str, str]:
    """Build the tiny models under ``root``; return reward name -> spec."""
    import torch
    from PIL import Image
    from rewards_fixtures import (
        aesthetic_head_state,
        make_dinov2_dir,
        make_hps,
        make_imagereward,
        make_open_clip_dir,
        make_pickscore_dir,
        textured_image,
    )

    oc = make_open_clip_dir(root / "open_clip")
    head = root / "head.pth"
    torch.save(aesthetic_head_state(32), head)
    arch, ckpt, _ = make_hps(root / "hps")
    ps = make_pickscore_dir(root / "pickscore")
    dino = make_dinov2_dir(root / "dino")
    refs = root / "refs"
    refs.mkdir()
    Image.fromarray(textured_image(64, 64)).save(refs / "a.png")
    ir = make_imagereward(root / "imagereward")
    return {
        "clip_score": f"clip_score:model=local-dir:{oc}",
        "shapes_clip": f"shapes_clip:model=local-dir:{oc}",
        "aesthetic": f"aesthetic:clip_model=local-dir:{oc},head={head}",
        "hps": f"hps:model=local-dir:{arch},checkpoint={ckpt}",
        "pickscore": f"pickscore:model={ps},processor={ps}",
        "imagereward": f"imagereward:model={ir.model_dir},tokenizer={ir.tokenizer_dir}",
        "dino_similarity": f"dino_similarity:model={dino},references={refs}",
        "jpeg_compressibility": "jpeg_compressibility",
        "jpeg_incompressibility": "jpeg_incompressibility",
        "saturation": "saturation",
        "shapes_gold": "shapes_gold",
    }


def cpu_ms_per_image(fn, repeats: int, batch: int) -> float:
    """Median process CPU time of ``fn()`` over ``repeats`` runs, in ms per image (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    times.sort()
    return 1000.0 * times[len(times) // 2] / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from rewards_fixtures import SHAPES_CAPTIONS, shapes_batch

    from reward_models import get_reward

    captions = [SHAPES_CAPTIONS[i % len(SHAPES_CAPTIONS)] for i in range(args.batch)]
    images, prompts = shapes_batch(captions, size=64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in specs(Path(tmp)).items():
            t0 = time.process_time()
            reward = get_reward(spec)
            load_s = time.process_time() - t0
            fwd = cpu_ms_per_image(lambda r=reward: r(images, prompts), args.repeats, args.batch)
            bwd = None
            if reward.differentiable:

                def step(r=reward) -> None:
                    x = images.clone().requires_grad_(True)
                    r(x, prompts).sum().backward()

                bwd = cpu_ms_per_image(step, args.repeats, args.batch)
            params = sum(p.numel() for p in reward.parameters())
            rows.append((name, reward.differentiable, params, load_s, fwd, bwd))
    print(f"batch {args.batch} x 3x64x64, 1 thread, median of {args.repeats}; CPU ms per image")
    print("| reward | differentiable | params | load s | forward ms/img | fwd+bwd ms/img |")
    print("|---|---|---|---|---|---|")
    for name, diff, params, load_s, fwd, bwd in rows:
        bwd_text = f"{bwd:.2f}" if bwd is not None else "-"
        print(f"| {name} | {'yes' if diff else 'no'} | {params / 1e6:.2f} M | {load_s:.2f} | {fwd:.2f} | {bwd_text} |")


if __name__ == "__main__":
    main()
