"""D3PO (diffalign/methods/d3po.py; spec §5.1): pairs share their initial noise and their trained timesteps,
the loss is log 2 at the reference, validation, tiny CLI runs of ``d3po`` and of ``d3po_human`` on pairs
written by ``diffalign prefs --pairs`` and labelled with ``diffalign label`` (terminal and HTML), and
one-line errors for bad label files. The loss against hand-computed values: tests/test_pref_losses.py."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from test_ddpo_rollouts import FakeCtx
from train_fixtures import tiny_config, write_config

from diffalign.cli import main
from diffalign.config import DiffalignConfig, TrainConfig
from diffalign.errors import DiffalignError
from diffalign.methods import PromptBatch
from diffalign.methods.d3po import D3PO, D3POConfig


class RecordingCtx(FakeCtx):
    """FakeCtx whose denoisers record the per-sample timesteps of every call (policy and reference)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.calls: list[torch.Tensor] = []

    def denoiser(self, prompts, guidance_scale=None):
        inner = super().denoiser(prompts)

        def denoise(x, t):
            self.calls.append(torch.as_tensor(t).reshape(-1).expand(x.shape[0]).clone())
            return inner(x, t)

        return denoise


def test_pairs_share_initial_noise_and_trained_steps():
    ctx = RecordingCtx(steps=4, batch_size=3, reward_fn=lambda images, prompts: images.mean(dim=(1, 2, 3)))
    cfg = D3POConfig(train_batch_size=3, timestep_fraction=0.5)
    method = D3PO(cfg, ctx.sample, TrainConfig())
    rollout, pairs = method.collect(ctx, [PromptBatch(["a", "b", "c"], ["a", "b", "c"])], ctx.sampler)
    lat = pairs.latents
    assert pairs.prompts == ["a", "a", "b", "b", "c", "c"] and pairs.num_pairs == 3
    assert torch.equal(lat[0::2, 0], lat[1::2, 0])  # one x_T per pair
    assert not torch.equal(lat[0::2, 1], lat[1::2, 1])  # independent per-step noise
    assert not torch.equal(lat[0, 0], lat[2, 0])  # pairs differ from each other
    r = rollout.trajectories.reward
    assert pairs.preference.tolist() == torch.sign(r[0::2] - r[1::2]).long().tolist()
    ctx.calls.clear()
    res = method.train_pairs(ctx, pairs, ctx.sampler)
    assert len(ctx.calls) == 2 * 2  # K = 2 steps: reference then policy, one call each on [a0 b0 a1 b1 a2 b2]
    for t in ctx.calls:
        assert torch.equal(t[0::2], t[1::2])  # both members of each pair at the same timestep
    # at init the policy is the reference: every backward's loss is log 2
    assert res["loss"] == pytest.approx(math.log(2), abs=1e-6) and len(res["norms"]) == 1


def test_unshuffled_pairs_train_the_first_steps():
    """shuffle_timesteps false: every pair trains steps 0..K-1 (the earliest, noisiest), as grpo's option."""
    ctx = RecordingCtx(steps=4, batch_size=2, reward_fn=lambda images, prompts: images.mean(dim=(1, 2, 3)))
    method = D3PO(
        D3POConfig(train_batch_size=2, timestep_fraction=0.5, shuffle_timesteps=False), ctx.sample, TrainConfig()
    )
    _, pairs = method.collect(ctx, [PromptBatch(["a", "b"], ["a", "b"])], ctx.sampler)
    ctx.calls.clear()
    method.train_pairs(ctx, pairs, ctx.sampler)
    first = pairs.timesteps[:2].tolist()
    assert [sorted(set(t.tolist())) for t in ctx.calls] == [[first[0]], [first[1]], [first[0]], [first[1]]]


def test_dominance_preferences_from_several_rewards():
    ctx = FakeCtx(steps=2, batch_size=2)
    r1, r2 = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    ctx.rewards = lambda images, prompts: (r1 + r2, {"r1": r1, "r2": r2})
    method = D3PO(D3POConfig(preference="dominance"), ctx.sample, TrainConfig())
    _, pairs = method.collect(ctx, [PromptBatch(["a", "b"], ["a", "b"])], ctx.sampler)
    assert pairs.preference.tolist() == [1, 0]  # pair 0: a dominates; pair 1: incomparable


@pytest.mark.parametrize(
    ("method", "overrides", "message"),
    [
        ("d3po", ["sample.eta=0"], "d3po needs sample.eta > 0"),
        ("d3po", ["d3po.eps=1.5"], "d3po.eps must be in (0, 1)"),
        ("d3po", ["d3po.train_batch_size=3"], "must be divisible by d3po.train_batch_size (3)"),
        ("d3po", ["d3po.preference=votes"], "d3po.preference"),
        ("d3po", ["train.gradient_accumulation_steps=4"], "not divisible by train.gradient_accumulation_steps"),
        ("d3po_human", [], "method 'd3po_human' trains from a dataset on disk: set data.train"),
    ],
)
def test_validation_errors(tmp_path, sd_dir, method, overrides, message):
    cfg = tiny_config(sd_dir, tmp_path / "run", method)
    with pytest.raises(DiffalignError) as err:
        DiffalignConfig.from_yaml(write_config(tmp_path / "c.yaml", cfg), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def rows(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


def test_cli_trains_d3po_and_resumes_exactly(tmp_path, sd_dir, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(
        sd_dir,
        out,
        "d3po",
        d3po={"train_batch_size": 1, "timestep_fraction": 0.7},
        eval={"every": 0, "num_prompts": 1, "seeds": [0]},
        checkpoint={"every": 1, "keep": 3},
    )
    path = str(write_config(tmp_path / "cfg.yaml", cfg))
    assert main(["train", "--config", path]) == 0
    assert "finished 3 steps of d3po" in capsys.readouterr().out
    first = rows(out / "metrics.jsonl")
    assert first[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and all(m["samples"] == 4 for m in first)
    assert first[-1]["updates"] == 6 and {"ratio_clipfrac", "implicit_acc", "tie_fraction"} <= set(first[0])
    assert main(["train", "--config", path, "--resume", str(out / "checkpoints" / "step_1")]) == 0
    assert rows(out / "metrics.jsonl") == first


# ------------------------------------------------------------------------------ human-labelled pairs
def make_pairs(tmp_path, sd_dir, reward=True):
    out = tmp_path / "pairs"
    args = ["prefs", "--model", str(sd_dir), "--prompts", "shapes:train", "--num-prompts", "2", "--n", "4"]
    args += ["--steps", "3", "--eta", "1", "--pairs", "--out", str(out)]
    if reward:
        args += ["--reward", "train_fixtures:Brightness"]
    assert main(args) == 0
    return out


def test_prefs_pairs_label_in_the_terminal_and_train(tmp_path, sd_dir, monkeypatch, capsys):
    pairs = make_pairs(tmp_path, sd_dir, reward=False)
    recs = [json.loads(x) for x in (pairs / "pairs.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and {"prompt", "image_a", "image_b", "trajectory"} <= set(recs[0])
    saved = torch.load(pairs / recs[0]["trajectory"], weights_only=True)
    assert saved["latents"].shape[:2] == (2, 4) and torch.equal(saved["latents"][0, 0], saved["latents"][1, 0])
    labels = tmp_path / "labels.jsonl"
    # the terminal: 'x' is re-asked, then a, b; quit; a second run continues with the rest
    monkeypatch.setattr("sys.stdin", io.StringIO("x\na\nb\nq\n"))
    assert main(["label", "--pairs", str(pairs / "pairs.jsonl"), "--out", str(labels)]) == 0
    text = capsys.readouterr().out
    assert "recorded 2 choices" in text and "\x1b[38;2;" in text  # the colour preview
    monkeypatch.setattr("sys.stdin", io.StringIO("t\ns\n"))
    assert main(["label", "--pairs", str(pairs / "pairs.jsonl"), "--out", str(labels), "--no-preview"]) == 0
    assert "2 of 4 pairs to label" in capsys.readouterr().out
    got = [json.loads(x) for x in labels.read_text().splitlines()]
    assert [g["choice"] for g in got] == ["a", "b", "tie"]
    assert (
        got[0]["image_a"] == "pairs/" + recs[0]["image_a"] and got[0]["trajectory"] == "pairs/" + recs[0]["trajectory"]
    )
    # a static page for labelling in a browser
    page = tmp_path / "label.html"
    assert main(["label", "--pairs", str(pairs / "pairs.jsonl"), "--html", str(page)]) == 0
    html = page.read_text()
    assert "download labels.jsonl" in html and "pairs/images/00000.png" in html
    # d3po_human on the three labels (tie included)
    out = tmp_path / "run"
    cfg = tiny_config(
        sd_dir,
        out,
        "d3po_human",
        data={"train": str(labels)},
        sample={"batch_size": 1},
        train={"steps": 2},
        d3po={"train_batch_size": 1},
        eval={"every": 0, "num_prompts": 1, "seeds": [0]},
        checkpoint={"every": 0},
    )
    assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 0
    metrics = rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["samples"] == 2


def test_bad_label_files_are_one_line(tmp_path, sd_dir, capsys):
    pairs = make_pairs(tmp_path, sd_dir)
    capsys.readouterr()
    labels = pairs / "labels.jsonl"
    good = labels.read_text().splitlines()
    assert len(good) == 4 and all(json.loads(x)["choice"] in ("a", "b", "tie") for x in good)

    def error(lines, **over):
        path = pairs / "bad.jsonl"
        path.write_text("\n".join(lines) + "\n")
        cfg = tiny_config(sd_dir, tmp_path / "run", "d3po_human", data={"train": str(path)}, **over)
        assert main(["train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    bad_choice = json.dumps(json.loads(good[1]) | {"choice": "left"})
    assert f"{pairs / 'bad.jsonl'} line 2: 'choice' must be one of a, b, tie" in error([good[0], bad_choice])
    assert "line 1 is not JSON" in error(["{not json", good[0]])
    gone = json.dumps(json.loads(good[0]) | {"image_b": "images/missing.png"})
    assert "line 2: image 'image_b'" in error([good[0], gone]) and "does not exist" in error([good[0], gone])
    no_traj = json.dumps(json.loads(good[0]) | {"trajectory": "trajectories/none.pt"})
    assert "line 1: trajectory" in error([no_traj, good[0]]) and "does not exist" in error([no_traj, good[0]])
    assert "has 3 steps but sample.steps is 5" in error(good[:2], sample={"steps": 5})
    assert "holds no records" in error([""])
    # label: a missing pairs file and a bad line name the file (and line)
    assert main(["label", "--pairs", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "l.jsonl")]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    assert main(["label", "--pairs", str(pairs / "bad.jsonl")]) == 2
    assert "give --out labels.jsonl" in capsys.readouterr().err
    # prefs: --pairs with an odd --n, and without --eta
    base = ["prefs", "--model", str(sd_dir), "--prompts", "shapes:train", "--out", str(tmp_path / "p2"), "--pairs"]
    assert main([*base, "--n", "3", "--eta", "1"]) == 2
    assert "--n must be even" in capsys.readouterr().err
    assert main([*base, "--n", "2"]) == 2
    assert "--eta > 0" in capsys.readouterr().err
