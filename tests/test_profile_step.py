"""benchmarks/profile_step.py: the profile of a step runs and its shares add up (no timing asserted)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_trl  # noqa: E402
import profile_step  # noqa: E402


def test_kind_of_groups_forward_and_backward_kernels():
    assert profile_step.kind_of("aten::mkldnn_convolution") == "convolution"
    assert profile_step.kind_of("aten::convolution_backward") == "convolution"
    assert profile_step.kind_of("aten::addmm") == "matmul"
    assert profile_step.kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert profile_step.kind_of("aten::native_group_norm_backward") == "normalization"
    assert profile_step.kind_of("aten::silu_backward") == "activation"
    assert profile_step.kind_of("aten::add_") == "element-wise"
    assert profile_step.kind_of("aten::empty") == "rest"


def test_profiles_an_alignprop_step_of_the_tiny_pipeline(tmp_path):
    pipe = bench_trl.prepare_pipeline("tiny", tmp_path / "pipe")
    args = argparse.Namespace(steps=2, eta=1.0, guidance=5.0, batch=2, updates=3, lr_alignprop=1e-3)
    cfg = bench_trl.diffalign_config("alignprop", pipe, args, tmp_path / "unused")
    path = tmp_path / "ap.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = profile_step.main([str(path), "--steps", "3", "--threads", "1", "--json", str(tmp_path / "p.json")])
    assert report["method"] == "alignprop" and report["profiled_steps"] == 2
    assert report["seconds_per_step"] > 0
    shares = report["share_by_kind"]
    assert shares["convolution"] > 0 and shares["matmul"] > 0
    assert abs(sum(shares.values()) - report["share_in_aten_ops"]) < 1e-9
    rss = report["rss_mb"]
    assert rss["after_imports"] > 50 and rss["peak"] >= rss["before_first_step"] > 0
    assert json.loads((tmp_path / "p.json").read_text())["method"] == "alignprop"
