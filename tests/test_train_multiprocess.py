"""``accelerate launch --multi_gpu --num_processes 2`` on CPU (two gloo processes): prompts sharded,
rewards aggregated over both processes, only the main process writes.

(``accelerate launch --cpu --num_processes 2`` starts a single process: accelerate's simple launcher
runs multi-process CPU jobs only through mpirun, so ``--multi_gpu`` is the flag that gives torchrun
processes, which fall back to the gloo backend without GPUs.)"""

from __future__ import annotations

import json

import pytest
from train_fixtures import launch_two_processes, tiny_config, write_config

from diffalign.prompts import PromptSampler, load_prompts


def test_two_processes_shard_prompts_and_aggregate(tmp_path, sd_dir):
    pytest.importorskip("accelerate")
    out, rec = tmp_path / "run", tmp_path / "rec"
    rec.mkdir()
    cfg = tiny_config(
        sd_dir, out, "draft_k", reward={"rewards": [f"train_fixtures:Recording:dir={rec}"]}, eval={"every": 0}
    )
    path = write_config(tmp_path / "cfg.yaml", cfg)
    proc = launch_two_processes(path, module="pg_probe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished 3 steps") == 1  # only the main process reports
    # each process destroyed its gloo group before exiting (one left to the interpreter's exit can abort it)
    assert proc.stdout.count("process group left: False") == 2, proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # one file, no duplicated lines
    calls = {p.stem: [json.loads(x) for x in p.read_text().splitlines()] for p in rec.iterdir()}
    assert len(calls) == 2 and all(len(c) == 3 for c in calls.values())  # both processes trained 3 steps
    batch = cfg["sample"]["batch_size"]
    stream = PromptSampler(load_prompts("shapes:train"), seed=0)  # the global prompt stream of the run
    for step, m in enumerate(metrics):
        values = [v for c in calls.values() for v in c[step]["values"]]
        assert m["samples"] == 2 * batch == len(values)
        assert m["reward"] == pytest.approx(sum(values) / len(values), abs=1e-7)
        everyone = stream.next(2 * batch)  # each process trained on its own half of the global batch
        assert sorted(c[step]["prompts"] for c in calls.values()) == sorted([everyone[:batch], everyone[batch:]])
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and evals[0]["n_images"] == 4
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
