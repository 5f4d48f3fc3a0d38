"""The TRL side of benchmarks/bench_trl.py: TRL 0.11.4's AlignPropTrainer or DDPOTrainer on a local pipeline.

Runs in TRL's own venv (``make venv-trl``), started by bench_trl.py, and imports nothing of diffalign. It
builds the trainer with the settings given on the command line, calls ``trainer.step(epoch, global_step)``
``--updates`` times (AlignProp: one optimizer update each; DDPO: one epoch each, sampling then PPO), times
each call, and prints one JSON line: the seconds of every call, the process's peak RSS (``VmHWM``) and the
settings TRL actually used (its config as a dict).

    .venv-trl/bin/python benchmarks/trl_side.py --method alignprop --model runs/bench-trl/pipe --updates 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def vm_hwm_mb() -> float:
    """This process's peak resident set (``VmHWM`` of /proc/self/status) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=["alignprop", "ddpo"], required=True)
    p.add_argument("--model", required=True, help="diffusers StableDiffusionPipeline directory")
    p.add_argument("--prompts", required=True, help="JSON list of training prompts")
    p.add_argument("--updates", type=int, default=3, help="trainer.step calls (AlignProp updates / DDPO epochs)")
    p.add_argument("--steps", type=int, default=20, help="DDIM sampling steps T")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-batches", type=int, default=2, help="DDPO: sampling batches per epoch")
    p.add_argument("--train-batch", type=int, default=4, help="DDPO: PPO minibatch size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--logdir", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import trl
    from brightness_reward import trl_reward_fn
    from trl import DefaultDDPOStableDiffusionPipeline

    prompts = json.loads(args.prompts)
    rng = random.Random(args.seed)

    def prompt_fn():
        return rng.choice(prompts), {}

    common = dict(
        num_epochs=args.updates,
        save_freq=10**9,  # no accelerator.save_state() inside the timed steps
        mixed_precision="no",  # fp32 on CPU, as diffalign
        sample_num_steps=args.steps,
        sample_eta=args.eta,
        sample_guidance_scale=args.guidance,
        train_learning_rate=args.lr,
        log_with=None,
        seed=args.seed,
        project_kwargs={"project_dir": args.logdir, "logging_dir": args.logdir},
        logdir=args.logdir,
    )
    pipe = DefaultDDPOStableDiffusionPipeline(args.model, use_lora=True)
    pipe.set_progress_bar_config(disable=True)
    if args.method == "alignprop":
        from trl import AlignPropConfig, AlignPropTrainer

        config = AlignPropConfig(
            **common,
            train_batch_size=args.batch,
            train_gradient_accumulation_steps=1,
            # full chain: fixed truncation at step 0 detaches no UNet output; every UNet call is checkpointed
            # (rgb_with_grad's gradient_checkpoint=True, TRL's default)
            truncated_backprop_rand=False,
            truncated_backprop_timestep=0,
        )
        trainer = AlignPropTrainer(config, trl_reward_fn, prompt_fn, pipe)
    else:
        from trl import DDPOConfig, DDPOTrainer

        config = DDPOConfig(
            **common,
            sample_batch_size=args.batch,
            sample_num_batches_per_epoch=args.num_batches,
            train_batch_size=args.train_batch,
            train_gradient_accumulation_steps=1,
        )
        trainer = DDPOTrainer(config, trl_reward_fn, prompt_fn, pipe)

    pipe.set_progress_bar_config(disable=True)  # the trainers turn on a per-timestep bar; diffalign runs without one
    seconds, global_step = [], 0
    for epoch in range(args.updates):
        t0 = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        seconds.append(time.perf_counter() - t0)
        print(f"trl {args.method}: step {epoch + 1}/{args.updates} {seconds[-1]:.2f} s", file=sys.stderr, flush=True)
    unet_params = sum(p.numel() for p in pipe.sd_pipeline.unet.parameters())
    trainable = sum(p.numel() for p in pipe.sd_pipeline.unet.parameters() if p.requires_grad)
    settings = {k: v for k, v in vars(config).items() if k.startswith(("sample_", "train_", "truncated_", "mixed_"))}
    import diffusers
    import peft
    import transformers

    versions = {
        "trl": trl.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    out = {
        "seconds": seconds,
        "peak_rss_mb": vm_hwm_mb(),
        "unet_params": unet_params,
        "trainable_params": trainable,
        "settings": settings,
        "versions": versions,
        "pid": os.getpid(),
    }
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
