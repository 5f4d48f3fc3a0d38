"""diffalign vs TRL 0.11.4: seconds per update and peak RSS of AlignProp and DDPO on one tiny SD 1.x pipeline.

One pipeline directory (``save_pretrained``; both venvs load it), one reward (mean brightness,
``benchmarks/brightness_reward.py``: a python function for TRL, a ``module:Class`` plug-in for diffalign),
the same settings on both sides, and every training run in its own subprocess, ONE AT A TIME, with
``--threads`` torch threads (two torch processes at once slow each other 15-20x on 2 cores):

- AlignProp: TRL's ``AlignPropTrainer`` vs ``diffalign train`` with ``alignprop.truncation: none`` (full chain,
  every UNet call checkpointed on both sides); seconds per optimizer update.
- DDPO: TRL's ``DDPOTrainer`` vs ``diffalign train`` with ``train.method: ddpo``; seconds per epoch (sampling
  ``--num-batches`` x ``--batch`` trajectories, then one PPO pass over them).

Time: the median over the updates after the first ``--warmup`` (lazy initialisation). Memory: the
whole process's peak RSS (``ru_maxrss`` of that child alone, from ``os.wait4``; this process never imports
torch, since a child's ``ru_maxrss`` also covers the RSS it had before ``exec``, its parent's; the TRL side
also reports its own ``VmHWM`` as a check; as root the page cache is dropped before every child, since the
mapped pages of the same shared libraries vary with it: ``--page-cache``). Both sides also get
the two other figures of issue 19 item 3, measured in the same run: diffalign's no-grad sampler
against the plain diffusers pipeline call for the same images, and the peak RSS of differentiable
sampling at 50 vs 10 steps with checkpointing (``benchmarks/bench_sampling.py``'s measurement).
``--compile`` adds a third side, ``diffalign-compiled``: the same diffalign runs with ``model.compile: true``
(torch.compile of the UNet; the first, untimed update compiles; its seconds are reported).

    make venv-trl                                        # TRL 0.11.4 in .venv-trl (once)
    python benchmarks/bench_trl.py --out runs/bench-trl  # on an otherwise idle machine
    python benchmarks/bench_trl.py --out runs/bench-trl --compile   # also with model.compile: true
    python benchmarks/bench_trl.py --sides diffalign --model tiny --updates 1 --steps 2   # smoke, no TRL

Writes OUT/bench_trl.json and OUT/bench_trl.md (a Markdown block for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
REWARD_PLUGIN = "benchmarks.brightness_reward:Brightness"
# Shapes-world captions (the pipelines' tokenizer knows their words); drawn at random on both sides.
PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle and a yellow circle",
    "three purple circles",
    "a blue square and a red triangle",
    "two yellow triangles",
    "a green circle and two red squares",
    "one purple square",
]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # TRL's DefaultDDPOStableDiffusionPipeline LoRA


def default_trl_python() -> Path:
    """``$DIFFALIGN_TRL_PYTHON``, else ``.venv-trl/bin/python`` of this checkout."""
    env = os.environ.get("DIFFALIGN_TRL_PYTHON")
    return Path(env) if env else ROOT / ".venv-trl" / "bin" / "python"


# ------------------------------------------------------------------------------------------ the pipeline
def prepare_pipeline(model: str, cache: Path) -> Path:
    """The benchmark's pipeline directory: built once into ``cache`` and reused (a marker names its source).

    ``shapes``: assets/shapes-sd (the demo's pipeline: 64 px images, 16x16x4 latents, a 3-level UNet and a
    3-layer CLIP text encoder); ``tiny``: tests/tiny.py's random SD pipeline (16 px images, 8x8 latents),
    for smoke runs; anything else: a diffusers SD 1.x directory, re-saved. The tokenizer folder also gets
    ``vocab.json`` and ``merges.txt``, which TRL's transformers 4.46 needs for ``CLIPTokenizer``.
    """
    marker = cache / "bench_pipe.json"
    if marker.is_file() and json.loads(marker.read_text()).get("source") == model:
        return cache
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    from diffusers import StableDiffusionPipeline

    from diffalign.shapes.tokenizer import build_tokenizer_files

    if model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import build_sd

        pipe = build_sd(cache / "_build")
    else:
        src = ROOT / "assets" / "shapes-sd" if model == "shapes" else Path(model)
        pipe = StableDiffusionPipeline.from_pretrained(str(src), safety_checker=None, requires_safety_checker=False)
    pipe.save_pretrained(cache)
    files = build_tokenizer_files(cache / "_build" / "tok_files")
    ids = json.loads((files / "vocab.json").read_text())
    probe = pipe.tokenizer("a red circle").input_ids
    if len(ids) != len(pipe.tokenizer) or probe[1] != ids.get("a</w>"):
        raise SystemExit(f"bench_trl: {model}'s tokenizer is not the shapes tokenizer; pass a shapes pipeline")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(files / name, cache / "tokenizer" / name)
    shutil.rmtree(cache / "_build", ignore_errors=True)
    unet = sum(p.numel() for p in pipe.unet.parameters())
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    marker.write_text(json.dumps({"source": model, "unet_params": unet, "image_size": size}))
    return cache


# --------------------------------------------------------------------------------------------- processes
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# set by main() from --page-cache: drop the kernel's page cache before every child
PAGE_CACHE = {"drop": False}


def drop_page_cache() -> bool:
    """Write back and drop the kernel's clean page cache (root only); True when it was dropped.

    Why: a child's RSS counts the pages of its shared libraries that are mapped into it, and how many pages one
    fault maps depends on how the page cache holds the file (large folios after pip wrote it, single pages after
    a cold read). Measured here: ``import torch`` of one torch 2.14.1 wheel peaked at 662 MB from one venv and
    507 MB from another, identical files, until the cache was dropped; then 504-507 MB from both. Dropping it
    before every child puts both venvs in the same state."""
    if os.geteuid() != 0 or not os.access(DROP_CACHES, os.W_OK):
        return False
    os.sync()
    DROP_CACHES.write_text("3\n")
    return True


def run_child(cmd: list[str], log: Path, threads: int, cwd: Path = ROOT) -> tuple[int, float, float]:
    """Run ``cmd`` alone (stdout+stderr to ``log``); return its exit code, wall seconds and peak RSS (MiB).

    With ``--page-cache drop`` the page cache is dropped first (:func:`drop_page_cache`)."""
    if PAGE_CACHE["drop"]:
        drop_page_cache()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024


def timed(seconds: list[float], warmup: int) -> dict:
    """Median (and min, max) of the per-update seconds after the first ``warmup`` (all when none remain)."""
    later = seconds[warmup:] or seconds
    return {
        "seconds": statistics.median(later),
        "seconds_min": min(later),
        "seconds_max": max(later),
        "timed": len(later),
        "all_seconds": [round(s, 4) for s in seconds],
    }


def diffalign_config(method: str, pipe: Path, args: argparse.Namespace, out: Path) -> dict:
    """The diffalign config matching TRL's settings for ``method``."""
    cfg: dict = {
        "model": {
            "pretrained": str(pipe),
            "device": "cpu",
            "gradient_checkpointing": True,
            "lora": {"rank": 4, "alpha": 4.0, "target_modules": LORA_TARGETS, "init": "gaussian"},
        },
        "sample": {"steps": args.steps, "eta": args.eta, "guidance_scale": args.guidance, "batch_size": args.batch},
        "train": {
            "method": method,
            "steps": args.updates,
            "weight_decay": 1e-4,
            "adam_eps": 1e-8,
            "max_grad_norm": 1.0,
            "gradient_accumulation_steps": 1,
            "mixed_precision": "no",
            "seed": 0,
        },
        "reward": {"rewards": [REWARD_PLUGIN]},
        "prompts": {"train": PROMPTS, "eval": PROMPTS[:1]},
        # evaluation runs only before and after training (untimed), as small as it goes
        "eval": {"every": 0, "num_prompts": 1, "seeds": [0], "batch_size": 1, "gold": "off"},
        "checkpoint": {"output_dir": str(out), "every": 0, "keep": 1},
        "log": {"progress": False, "sample_every": 0},
    }
    if method == "alignprop":
        cfg["train"]["lr"] = args.lr_alignprop
        cfg["alignprop"] = {"truncation": "none", "loss": "neg", "loss_coeff": 1.0}
    else:
        cfg["train"]["lr"] = args.lr_ddpo
        cfg["sample"]["num_batches"] = args.num_batches
        cfg["ddpo"] = {
            "clip_range": 1e-4,
            "adv_clip_max": 5.0,
            "inner_epochs": 1,
            "timestep_fraction": 1.0,
            "train_batch_size": args.train_batch,
            "per_prompt_stat_tracking": False,
            "cfg": True,
        }
    return cfg


def run_diffalign(method: str, pipe: Path, args: argparse.Namespace, compiled: bool = False) -> dict:
    """``diffalign train`` of the matching config in a subprocess: per-update seconds and peak RSS.
    ``compiled``: the same config with ``model.compile: true`` (its first update, untimed, compiles)."""
    import yaml

    name = f"diffalign-compiled-{method}" if compiled else f"diffalign-{method}"
    run = args.out / name
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    cfg = diffalign_config(method, pipe, args, run)
    if compiled:
        cfg["model"] |= {"compile": True, "compile_backend": args.compile_backend, "compile_mode": args.compile_mode}
    cfg_path = args.out / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "diffalign", "train", "--config", str(cfg_path), "--output-dir", str(run)]
    log = args.out / f"{name}.log"
    rc, wall, rss = run_child(cmd, log, args.threads)
    if rc != 0:
        raise SystemExit(f"bench_trl: diffalign {method} exited {rc}; see {log}")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    seconds = [json.loads(line)["time"]["step_seconds"] for line in lines if line.strip()]
    return {**timed(seconds, args.warmup), "peak_rss_mb": round(rss, 1), "wall_seconds": round(wall, 1)}


def run_trl(method: str, pipe: Path, args: argparse.Namespace) -> dict:
    """benchmarks/trl_side.py in TRL's venv: per-update seconds, peak RSS, TRL's settings and versions."""
    logdir = args.out / f"trl-{method}"
    if logdir.exists():
        shutil.rmtree(logdir)
    logdir.mkdir(parents=True)
    cmd = [str(args.trl_python), str(HERE / "trl_side.py"), "--method", method, "--model", str(pipe)]
    cmd += ["--prompts", json.dumps(PROMPTS), "--updates", str(args.updates), "--steps", str(args.steps)]
    cmd += ["--eta", str(args.eta), "--guidance", str(args.guidance), "--batch", str(args.batch)]
    cmd += ["--num-batches", str(args.num_batches), "--train-batch", str(args.train_batch)]
    cmd += ["--lr", str(args.lr_alignprop if method == "alignprop" else args.lr_ddpo)]
    cmd += ["--threads", str(args.threads), "--logdir", str(logdir)]
    log = args.out / f"trl-{method}.log"
    rc, wall, rss = run_child(cmd, log, args.threads, cwd=logdir)
    if rc != 0:
        raise SystemExit(f"bench_trl: TRL {method} exited {rc}; see {log}")
    child = json.loads(log.read_text().strip().splitlines()[-1])
    return {
        **timed(child["seconds"], args.warmup),
        "peak_rss_mb": round(rss, 1),
        "vm_hwm_mb": round(child["peak_rss_mb"], 1),
        "wall_seconds": round(wall, 1),
        "trl_settings": child["settings"],
        "versions": child["versions"],
    }


# the libraries each side's training process imports before it loads a pipeline: the process-wide floor
# under its peak RSS (torch alone is about 500 MB here), measured as the peak RSS of a child that only imports
FLOOR_IMPORTS = {
    "trl": "import torch, accelerate, peft, trl; "
    "from diffusers import StableDiffusionPipeline; from transformers import CLIPTextModel",
    "diffalign": "import torch, accelerate, peft, diffalign.trainer, diffalign.methods; "
    "from diffusers import StableDiffusionPipeline; from transformers import CLIPTextModel",
}


def run_floor(side: str, args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a child of ``side``'s venv that imports that side's libraries and exits."""
    python = str(args.trl_python) if side == "trl" else sys.executable
    log = args.out / f"floor-{side}.log"
    rc, _, rss = run_child([python, "-c", FLOOR_IMPORTS[side]], log, args.threads)
    if rc != 0:
        raise SystemExit(f"bench_trl: the import floor of {side} exited {rc}; see {log}")
    return round(rss, 1)


# -------------------------------------------------------------------------------- sampler and memory
def sampler_child(pipe_dir: str, batch: int, steps: int, eta: float, guidance: float, repeats: int) -> dict:
    """In this process: diffalign's no-grad sampler (the evaluator's ``generate_images``) and the plain
    diffusers pipeline call drawing the same images (same per-image generators), alternated; medians."""
    import torch

    from diffalign.config import SampleConfig
    from diffalign.evaluation import PipelineSampler, generate_images, generator_seed
    from diffalign.pipelines import draw_images, load_pipeline

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = load_pipeline(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    items = [(i, 0) for i in range(batch)]
    seeds = [generator_seed(0, i) for i in range(batch)]
    sample = SampleConfig(steps=steps, eta=eta, guidance_scale=guidance, batch_size=batch)

    def ours() -> torch.Tensor:
        with torch.no_grad():
            return generate_images(PipelineSampler(pipe, sample), prompts, items, eta, batch)

    def theirs() -> torch.Tensor:
        return draw_images(pipe, prompts, seeds, steps=steps, guidance=guidance, eta=eta)

    a, b = ours(), theirs()  # warm-up, and the images compared
    t_ours, t_pipe = [], []
    for _ in range(repeats):
        for fn, acc in ((ours, t_ours), (theirs, t_pipe)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return {
        "ours_seconds": statistics.median(t_ours),
        "pipeline_seconds": statistics.median(t_pipe),
        "ratio": statistics.median(t_ours) / statistics.median(t_pipe),
        "max_abs_pixel_diff": float((a - b).abs().max()),
        "repeats": repeats,
    }


def run_sampler(pipe: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_sampler", str(pipe), "--batch", str(args.batch), "--steps", str(args.steps)]
    cmd += ["--sampler-eta", str(args.sampler_eta), "--guidance", str(args.guidance), "--repeats", str(args.repeats)]
    log = args.out / "sampler.log"
    rc, _, _ = run_child(cmd, log, args.threads)
    if rc != 0:
        raise SystemExit(f"bench_trl: the sampler comparison exited {rc}; see {log}")
    return {**json.loads(log.read_text().strip().splitlines()[-1]), "batch": args.batch, "steps": args.steps}


def run_sampling_memory(pipe: Path, size: int, args: argparse.Namespace) -> dict:
    """bench_sampling.py's measurement (full chain, checkpointing on) at each of ``--memory-steps``, one
    process each; whole-process peak RSS from ``os.wait4``."""
    rows = {}
    for steps in args.memory_steps:
        cmd = [sys.executable, str(HERE / "bench_sampling.py"), "--model", str(pipe), "--batch", str(args.batch)]
        cmd += ["--size", str(size), "--_one", f"{steps},1"]
        log = args.out / f"sampling-{steps}.log"
        rc, _, rss = run_child(cmd, log, args.threads)
        if rc != 0:
            raise SystemExit(f"bench_trl: bench_sampling.py at {steps} steps exited {rc}; see {log}")
        rows[str(steps)] = {**json.loads(log.read_text().strip().splitlines()[-1]), "peak_rss_mb": round(rss, 1)}
    lo, hi = (str(s) for s in (min(args.memory_steps), max(args.memory_steps)))
    return {"by_steps": rows, "ratio": rows[hi]["peak_rss_mb"] / rows[lo]["peak_rss_mb"], "pair": [int(hi), int(lo)]}


# ------------------------------------------------------------------------------------------------ report
def settings_rows(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(setting, TRL 0.11.4 config, diffalign config) for the Markdown table."""
    return [
        (
            "LoRA",
            "r=4, alpha 4, gaussian init, to_q/to_k/to_v/to_out.0 (TRL's fixed choice)",
            "`model.lora`: rank 4, alpha 4, init gaussian, same targets",
        ),
        (
            "sampler",
            f"DDIM, `sample_num_steps={args.steps}`, `sample_eta={args.eta}`, `sample_guidance_scale={args.guidance}`",
            f"`sample.steps={args.steps}`, `sample.eta={args.eta}`, `sample.guidance_scale={args.guidance}`",
        ),
        (
            "AlignProp batch",
            f"`train_batch_size={args.batch}`, `train_gradient_accumulation_steps=1`",
            f"`sample.batch_size={args.batch}`, `train.gradient_accumulation_steps=1`",
        ),
        (
            "AlignProp gradient",
            "full chain: `truncated_backprop_rand=False`, `truncated_backprop_timestep=0`; "
            "every UNet call checkpointed (`rgb_with_grad`'s default); VAE decode not checkpointed",
            "`alignprop.truncation: none`, `model.gradient_checkpointing: true` (UNet calls and the VAE decode)",
        ),
        (
            "AlignProp loss / optimizer",
            f"`10 - mean(r)`; AdamW lr {args.lr_alignprop}, wd 1e-4, clip 1",
            f"`loss: neg`, `loss_coeff: 1`; AdamW lr {args.lr_alignprop}, wd 1e-4, clip 1",
        ),
        (
            "DDPO epoch",
            f"`sample_batch_size={args.batch}` x `sample_num_batches_per_epoch={args.num_batches}`, "
            f"`train_batch_size={args.train_batch}`, `train_num_inner_epochs=1`, `train_timestep_fraction=1.0`, "
            "`train_cfg=True`, clip 1e-4, adv clip 5, no per-prompt stats",
            f"`sample.batch_size={args.batch}`, `sample.num_batches={args.num_batches}`, "
            f"`ddpo.train_batch_size={args.train_batch}`, `inner_epochs: 1`, `timestep_fraction: 1.0`, `cfg: true`, "
            "same clips, `per_prompt_stat_tracking: false`",
        ),
        ("DDPO optimizer", f"AdamW lr {args.lr_ddpo}, wd 1e-4, clip 1", f"AdamW lr {args.lr_ddpo}, wd 1e-4, clip 1"),
        ("precision, device", '`mixed_precision="no"` (fp32), CPU', "`train.mixed_precision: no`, CPU"),
        ("reward", "`brightness_reward.trl_reward_fn`", f"`{REWARD_PLUGIN}`"),
    ]


def markdown(report: dict, args: argparse.Namespace) -> str:
    lines = [f"Command: `{report['command']}`", ""]
    cache = "page cache dropped before every run" if report.get("page_cache_dropped") else "page cache kept"
    lines += [
        f"Pipeline: {report['pipeline']}; {report['threads']} torch thread(s); {report['machine']}; {cache}.",
        "",
    ]
    lines += ["| method | figure | TRL 0.11.4 | diffalign | ours / TRL | target |", "|---|---|---|---|---|---|"]
    for method, unit in (("alignprop", "s / update"), ("ddpo", "s / epoch")):
        r = report["methods"].get(method, {})
        if "trl" in r and "diffalign" in r:
            lines.append(
                f"| {method} | {unit} | {r['trl']['seconds']:.2f} | {r['diffalign']['seconds']:.2f} | "
                f"{r['time_ratio']:.2f} | <= 0.7 |"
            )
            lines.append(
                f"| {method} | peak RSS MB | {r['trl']['peak_rss_mb']:.0f} | {r['diffalign']['peak_rss_mb']:.0f} | "
                f"{r['rss_ratio']:.2f} | <= 0.8 |"
            )
        if "trl" in r and "diffalign-compiled" in r:
            c = r["diffalign-compiled"]
            lines.append(
                f"| {method}, `model.compile: true` | {unit} (first, compiling: {c['all_seconds'][0]:.0f} s) | "
                f"{r['trl']['seconds']:.2f} | {c['seconds']:.2f} | {r['compiled_time_ratio']:.2f} | <= 0.7 |"
            )
            lines.append(
                f"| {method}, `model.compile: true` | peak RSS MB | {r['trl']['peak_rss_mb']:.0f} | "
                f"{c['peak_rss_mb']:.0f} | {r['compiled_rss_ratio']:.2f} | <= 0.8 |"
            )
    floor = report.get("import_floor_mb", {})
    if len(floor) == 2:
        lines += ["", "| import floor (peak RSS MB of a process that only imports) | TRL 0.11.4 | diffalign |"]
        lines += [
            "|---|---|---|",
            f"| torch, diffusers, transformers, peft, accelerate and the trainer | "
            f"{floor['trl']:.0f} | {floor['diffalign']:.0f} |",
        ]
        for method in ("alignprop", "ddpo"):
            r = report["methods"].get(method, {})
            if "trl" in r and "diffalign" in r:
                lines.append(
                    f"| {method}: peak above the floor | {r['trl']['peak_rss_mb'] - floor['trl']:.0f} | "
                    f"{r['diffalign']['peak_rss_mb'] - floor['diffalign']:.0f} |"
                )
                lines.append(f"| {method}: 0.8 x TRL's peak, the target | {0.8 * r['trl']['peak_rss_mb']:.0f} | |")
    s = report.get("sampler")
    if s:
        lines += ["", "| figure | baseline | diffalign | ratio | target |", "|---|---|---|---|---|"]
        lines.append(
            f"| no-grad sampling, {s['batch']} images x {s['steps']} steps (s) | diffusers pipeline call "
            f"{s['pipeline_seconds']:.2f} | {s['ours_seconds']:.2f} | {s['ratio']:.2f} | <= 1.05 |"
        )
    m = report.get("sampling_memory")
    if m:
        hi, lo = m["pair"]
        lines.append(
            f"| differentiable sampling peak RSS (MB), checkpointing | {lo} steps "
            f"{m['by_steps'][str(lo)]['peak_rss_mb']:.0f} | {hi} steps {m['by_steps'][str(hi)]['peak_rss_mb']:.0f} "
            f"| {m['ratio']:.2f} | <= 1.2 |"
        )
    lines += ["", "| setting | TRL 0.11.4 | diffalign |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in settings_rows(args)]
    return "\n".join(lines) + "\n"


def print_table(report: dict) -> None:
    print(f"{'method':<10} {'side':<18} {'s/update':>9} {'min':>7} {'max':>7} {'peak RSS MB':>12}")
    for method, r in report["methods"].items():
        for side in ("trl", "diffalign", "diffalign-compiled"):
            if side in r:
                x = r[side]
                print(
                    f"{method:<10} {side:<18} {x['seconds']:9.2f} {x['seconds_min']:7.2f} {x['seconds_max']:7.2f} "
                    f"{x['peak_rss_mb']:12.0f}"
                )
        if "time_ratio" in r:
            print(f"{method:<10} {'ours/TRL':<18} {r['time_ratio']:9.2f} {'':>7} {'':>7} {r['rss_ratio']:12.2f}")
        if "compiled_time_ratio" in r:
            t, m = r["compiled_time_ratio"], r["compiled_rss_ratio"]
            print(f"{method:<10} {'compiled/TRL':<18} {t:9.2f} {'':>7} {'':>7} {m:12.2f}")
    for side, mb in report.get("import_floor_mb", {}).items():
        print(f"import floor ({side}): {mb:.0f} MB peak RSS of a process that only imports its libraries")
    if report.get("sampler"):
        s = report["sampler"]
        print(
            f"sampler: ours {s['ours_seconds']:.3f} s, diffusers pipeline {s['pipeline_seconds']:.3f} s, "
            f"ratio {s['ratio']:.2f} (max pixel diff {s['max_abs_pixel_diff']:.2g})"
        )
    if report.get("sampling_memory"):
        m = report["sampling_memory"]
        hi, lo = m["pair"]
        print(f"differentiable sampling peak RSS, checkpointing: {hi} / {lo} steps = {m['ratio']:.2f}")


def versions_here() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "diffusers", "transformers", "peft", "accelerate")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-trl")
    p.add_argument("--model", default="shapes", help="shapes (assets/shapes-sd), tiny (tests/tiny.py) or a directory")
    p.add_argument("--cache", type=Path, default=None, help="pipeline directory to build or reuse (OUT/pipe-MODEL)")
    p.add_argument("--trl-python", type=Path, default=default_trl_python())
    p.add_argument("--sides", choices=["both", "diffalign", "trl"], default="both")
    p.add_argument("--methods", nargs="+", choices=["alignprop", "ddpo"], default=["alignprop", "ddpo"])
    p.add_argument("--updates", type=int, default=6, help="AlignProp updates / DDPO epochs per run")
    p.add_argument("--warmup", type=int, default=1, help="first updates not timed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps T")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-batches", type=int, default=2, help="DDPO sampling batches per epoch (TRL's default)")
    p.add_argument("--train-batch", type=int, default=4, help="DDPO PPO minibatch")
    p.add_argument("--lr-alignprop", type=float, default=1e-3, help="TRL's AlignProp default")
    p.add_argument("--lr-ddpo", type=float, default=3e-4, help="TRL's DDPO default")
    p.add_argument(
        "--compile", action="store_true", help="also run diffalign with model.compile: true (side diffalign-compiled)"
    )
    p.add_argument("--compile-backend", default="inductor", help="model.compile_backend of the compiled side")
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "max-autotune-no-cudagraphs"],
        help="model.compile_mode of the compiled side",
    )
    p.add_argument("--no-extras", action="store_true", help="skip the sampler and sampling-memory figures")
    p.add_argument(
        "--page-cache",
        default="auto",
        choices=["auto", "drop", "keep"],
        help="drop the kernel's page cache before every child (needs root): the peak RSS of the same shared "
        "libraries depends on how the cache holds them; auto = drop when root",
    )
    p.add_argument("--sampler-eta", type=float, default=0.0, help="eta of the sampler comparison")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each sampler")
    p.add_argument("--memory-steps", type=int, nargs=2, default=[10, 50])
    p.add_argument("--_sampler", help=argparse.SUPPRESS)
    p.add_argument("--_prepare", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._prepare:
        print(prepare_pipeline(args._prepare, args.cache))
        return {}
    if args._sampler:
        r = sampler_child(args._sampler, args.batch, args.steps, args.sampler_eta, args.guidance, args.repeats)
        print(json.dumps(r))
        return r
    if args.updates < 1:
        raise SystemExit("bench_trl: --updates must be >= 1")
    sides = ["trl", "diffalign"] if args.sides == "both" else [args.sides]
    if args.compile and args.sides != "trl":
        sides.append("diffalign-compiled")
    if "trl" in sides and not args.trl_python.is_file():
        raise SystemExit(f"bench_trl: no TRL venv at {args.trl_python}: run make venv-trl or pass --trl-python")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    PAGE_CACHE["drop"] = args.page_cache != "keep" and drop_page_cache()  # auto: wherever it can be dropped
    if args.page_cache == "drop" and not PAGE_CACHE["drop"]:
        raise SystemExit("bench_trl: --page-cache drop needs root (writes /proc/sys/vm/drop_caches); use auto or keep")
    # built in a child: this process stays free of torch, because a child's ru_maxrss starts from the RSS of
    # the process it was forked from (the kernel carries the pre-exec peak over), which would floor every figure
    cache = (args.cache or args.out / f"pipe-{args.model}").resolve()
    rc, _, _ = run_child(
        [sys.executable, __file__, "--_prepare", args.model, "--cache", str(cache)], args.out / "pipe.log", 1
    )
    if rc != 0:
        raise SystemExit(f"bench_trl: building the pipeline exited {rc}; see {args.out / 'pipe.log'}")
    pipe = cache
    info = json.loads((pipe / "bench_pipe.json").read_text())
    report: dict = {
        "command": " ".join(["python", "benchmarks/bench_trl.py", *(argv if argv is not None else sys.argv[1:])]),
        "pipeline": f"{args.model} ({pipe}), UNet {info['unet_params'] / 1e6:.2f} M parameters, "
        f"{info['image_size']} px images",
        "pipeline_dir": str(pipe),
        "unet_params": info["unet_params"],
        "image_size": info["image_size"],
        "threads": args.threads,
        "page_cache_dropped": PAGE_CACHE["drop"],
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "versions": {"diffalign_venv": versions_here()},
        "settings": {
            k: getattr(args, k)
            for k in ("updates", "warmup", "steps", "eta", "guidance", "batch", "num_batches", "train_batch")
        }
        | {"lr_alignprop": args.lr_alignprop, "lr_ddpo": args.lr_ddpo, "reward": REWARD_PLUGIN},
        "methods": {},
    }
    for method in args.methods:  # one process at a time
        r = report["methods"][method] = {}
        for side in sides:
            print(f"bench_trl: {side} {method} ...", flush=True)
            if side == "trl":
                r[side] = run_trl(method, pipe, args)
            else:
                r[side] = run_diffalign(method, pipe, args, compiled=side == "diffalign-compiled")
        if "trl" in r:
            report["versions"]["trl_venv"] = r["trl"]["versions"]
        for side, prefix in (("diffalign", ""), ("diffalign-compiled", "compiled_")):
            if "trl" in r and side in r:
                r[f"{prefix}time_ratio"] = r[side]["seconds"] / r["trl"]["seconds"]
                r[f"{prefix}rss_ratio"] = r[side]["peak_rss_mb"] / r["trl"]["peak_rss_mb"]
    report["import_floor_mb"] = {side: run_floor(side, args) for side in ("trl", "diffalign") if side in sides}
    if not args.no_extras:
        print("bench_trl: sampler vs diffusers pipeline ...", flush=True)
        report["sampler"] = run_sampler(pipe, args)
        print("bench_trl: differentiable sampling memory ...", flush=True)
        report["sampling_memory"] = run_sampling_memory(pipe, info["image_size"], args)
    (args.out / "bench_trl.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "bench_trl.md").write_text(markdown(report, args))
    print_table(report)
    print(f"bench_trl: {args.out / 'bench_trl.json'}, {args.out / 'bench_trl.md'}")
    return report


if __name__ == "__main__":
    main()
