"""Datasets on disk (diffalign/datasets.py, the ``data:`` config section): JSONL records with images and
labels, sharded over processes, reshuffled per epoch from the seed, resumed at the exact next record;
one-line errors for every bad input; an end-to-end run of a dataset method killed and resumed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from train_fixtures import (
    assert_same_run,
    kill_inside_checkpoint_save,
    records,
    registry_cleaner,
    resume_latest,
    run_train,
    tiny_config,
    write_config,
)

from diffalign.config import DiffalignConfig
from diffalign.datasets import DatasetBatch, DatasetStream, JsonlDataset, check_batch_size, resize_center_crop
from diffalign.errors import DiffalignError

PLUGIN = "toy_dataset_method"
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow circle", "three red squares"]
clean_registry = registry_cleaner(PLUGIN)  # each test leaves the method registry as it was


def write_dataset(root: Path, n: int = 6, size: tuple[int, int] = (8, 8), extra: dict | None = None) -> Path:
    """``root/train.jsonl`` with ``n`` records (prompt, image under img/, score) and their PNGs."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        record = {"prompt": PROMPTS[i % len(PROMPTS)], "image": f"img/{i}.png", "score": 0.5 + i / 10, "id": i}
        lines.append(json.dumps(record | (extra or {})))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def dataset(path: Path, **kw: Any) -> JsonlDataset:
    return JsonlDataset(path, ("image",), ("score",), **kw)


# ------------------------------------------------------------------------------------------ reading
def test_records_images_and_labels(tmp_path: Path) -> None:
    ds = dataset(write_dataset(tmp_path, n=3))
    assert len(ds) == 3 and ds[1].prompt == PROMPTS[1] and ds[1].line == 2 and ds[1].data["id"] == 1
    assert ds[1].images == {"image": tmp_path / "img" / "1.png"} and ds[1].labels == {"score": 0.6}
    images = ds.load_images([ds[0], ds[2]], "image")
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    expected = np.asarray(Image.open(tmp_path / "img" / "2.png").convert("RGB"), dtype=np.float32) / 255.0
    assert torch.equal(images[1], torch.from_numpy(expected).permute(2, 0, 1))
    assert ds.load_images([ds[0]], "image", size=4).shape == (1, 3, 4, 4)
    wide = resize_center_crop(torch.rand(3, 10, 20), 5)
    assert wide.shape == (3, 5, 5) and 0 <= float(wide.min()) and float(wide.max()) <= 1


def test_sharding_over_two_processes_covers_each_global_batch(tmp_path: Path) -> None:
    ds = dataset(write_dataset(tmp_path, n=8))
    procs = [DatasetStream(ds, seed=3) for _ in range(2)]  # two simulated processes, one stream each
    seen: list[int] = []
    for _ in range(6):  # 3 epochs of 2 global batches of 4 records
        batches = [s.next_batch(2, num_processes=2, process_index=p) for p, s in enumerate(procs)]
        assert all(isinstance(b, DatasetBatch) for b in batches)
        assert batches[0].everyone == batches[1].everyone  # every process sees the same global batch
        a, b = batches[0].indices, batches[1].indices
        assert len(a) == len(b) == 2 and not set(a) & set(b)  # disjoint slices ...
        assert [ds[i].prompt for i in a + b] == batches[0].everyone  # ... covering it, in process order
        assert batches[0].local == [ds[i].prompt for i in a] and [r.line - 1 for r in batches[1].records] == b
        assert batches[1].images["image"].shape == (2, 3, 8, 8) and batches[1].labels["score"].shape == (2,)
        assert torch.equal(batches[1].labels["score"], torch.tensor([ds[i].labels["score"] for i in b]))
        seen += a + b
    for epoch in range(3):  # each epoch visits every record exactly once
        assert sorted(seen[epoch * 8 : (epoch + 1) * 8]) == list(range(8))
    assert (
        procs[0].state_dict()
        == procs[1].state_dict()
        == {
            "epoch": 2,
            "position": 8,
            "num_records": 8,
            "sha256": ds.sha256,
        }
    )
    straddling = DatasetStream(dataset(write_dataset(tmp_path / "five", n=5)), seed=3)
    first, second = straddling.next_indices(4), straddling.next_indices(4)  # the second crosses into epoch 1
    assert sorted(first + second[:1]) == list(range(5)) and straddling.state_dict()["epoch"] == 1


def test_epoch_reshuffle_is_deterministic_from_the_seed(tmp_path: Path) -> None:
    ds = dataset(write_dataset(tmp_path, n=6))
    a, b = DatasetStream(ds, seed=0), DatasetStream(ds, seed=0)
    assert a.next_indices(18) == b.next_indices(18)
    orders = [list(a.order(e)) for e in range(3)]
    assert orders[0] != orders[1] != orders[2] and all(sorted(o) == list(range(6)) for o in orders)
    assert list(DatasetStream(ds, seed=1).order(0)) != orders[0]
    plain = DatasetStream(ds, seed=0, shuffle=False)
    assert plain.next_indices(8) == [0, 1, 2, 3, 4, 5, 0, 1]


def test_resume_continues_at_the_exact_next_record(tmp_path: Path) -> None:
    ds = dataset(write_dataset(tmp_path, n=5))
    run = DatasetStream(ds, seed=7)
    for _ in range(3):
        run.next_batch(2)
    state = json.loads(json.dumps(run.state_dict()))  # plain values: what state.pt holds
    resumed = DatasetStream(dataset(tmp_path / "train.jsonl"), seed=7)
    resumed.load_state_dict(state)
    for _ in range(4):
        x, y = run.next_batch(2), resumed.next_batch(2)
        assert x.indices == y.indices and x.everyone == y.everyone
        assert torch.equal(x.images["image"], y.images["image"]) and torch.equal(x.labels["score"], y.labels["score"])
    # a changed file is refused
    path = tmp_path / "train.jsonl"
    path.write_text(path.read_text().replace('"id": 4', '"id": 40'))
    with pytest.raises(DiffalignError, match="changed since the checkpoint"):
        DatasetStream(dataset(path), seed=7).load_state_dict(state)


# ------------------------------------------------------------------------------------------- errors
def _error(fn) -> str:
    with pytest.raises(DiffalignError) as err:
        fn()
    text = str(err.value)
    assert "\n" not in text
    return text


def _lines(tmp_path: Path, *lines: str) -> Path:
    write_dataset(tmp_path, n=2)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = '{"prompt": "a red circle", "image": "img/0.png", "score": 1}'


def test_bad_inputs_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert f"dataset file {missing} does not exist" in _error(lambda: dataset(missing))
    assert "is a directory" in _error(lambda: dataset(tmp_path))
    bad = _lines(tmp_path, GOOD, '{"prompt": "x", "image": "img/0.png", "score": 1')
    assert f"{bad} line 2 is not JSON" in _error(lambda: dataset(bad))
    bad = _lines(tmp_path, GOOD, "", "[1, 2]")
    assert f"{bad} line 3 is a JSON list, not an object" in _error(lambda: dataset(bad))
    bad = _lines(tmp_path, '{"prompt": "a red circle", "score": 1}')
    assert f"{bad} line 1 has no key 'image'" in _error(lambda: dataset(bad))
    bad = _lines(tmp_path, GOOD, '{"image": "img/0.png", "score": 1}')
    assert f"{bad} line 2 has no key 'prompt'" in _error(lambda: dataset(bad))
    bad = _lines(tmp_path, '{"prompt": "x", "image": "img/0.png", "score": "high"}')
    assert "line 1: 'score' must be a finite number" in _error(lambda: dataset(bad))
    bad = _lines(tmp_path, GOOD, '{"prompt": "x", "image": "img/9.png", "score": 1}')
    message = _error(lambda: dataset(bad))
    assert f"{bad} line 2: image 'image' {tmp_path / 'img' / '9.png'} does not exist" in message
    (tmp_path / "img" / "text.png").write_text("not an image")
    bad = _lines(tmp_path, GOOD, '{"prompt": "x", "image": "img/text.png", "score": 1}')
    assert f"{bad} line 2: cannot read image 'image'" in _error(lambda: dataset(bad))
    unchecked = dataset(bad, check_images=False)  # found when the batch is loaded instead, with file and line
    assert f"{bad} line 2: cannot read image 'image'" in _error(
        lambda: unchecked.load_images(unchecked.records, "image")
    )
    bad = _lines(tmp_path, "", "  ")
    assert f"dataset {bad} holds no records" in _error(lambda: dataset(bad))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    assert "is not UTF-8" in _error(lambda: dataset(tmp_path / "latin1.jsonl"))
    ds = dataset(write_dataset(tmp_path, n=3))
    check_batch_size(ds, 3)
    assert "holds 3 records, fewer than one batch of 4 (sample.batch_size=2 x 2 processes)" in _error(
        lambda: check_batch_size(ds, 2, 2)
    )


def test_images_of_different_sizes_need_image_size(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", n=1, size=(8, 8))
    write_dataset(tmp_path / "b", n=1, size=(6, 8))
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "a", "image": "a/img/0.png", "score": 1}, {"prompt": "b", "image": "b/img/0.png", "score": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = dataset(path)
    assert f"{path} line 2: image 'image' is 6x8 but line 1's is 8x8" in _error(
        lambda: ds.load_images(ds.records, "image")
    )
    assert DatasetStream(ds, image_size=4, shuffle=False).next_batch(2).images["image"].shape == (2, 3, 4, 4)


def _config_data(tmp_path: Path, sd_dir: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg = tiny_config(sd_dir, out, "toy_data", **sections)
    cfg["plugins"] = [PLUGIN]
    cfg["reward"] = {"rewards": ["train_fixtures:Brightness"]}
    return cfg


def test_config_data_section(tmp_path: Path, sd_dir: Path) -> None:
    write_dataset(tmp_path / "data", n=4)
    cfg = _config_data(tmp_path, sd_dir, tmp_path / "run", data={"train": "data/train.jsonl", "shuffle": False})
    path = write_config(tmp_path / "c.yaml", cfg)
    loaded = DiffalignConfig.from_yaml(path)  # relative to the config file's directory
    assert loaded.data.train == str(tmp_path / "data" / "train.jsonl") and loaded.data.shuffle is False
    assert loaded.to_dict()["data"]["train"] == loaded.data.train

    def fails(data: dict[str, Any] | None, method: str = "toy_data", overrides: tuple[str, ...] = ()) -> str:
        c = _config_data(tmp_path, sd_dir, tmp_path / "run")
        c["train"]["method"] = method
        if method != "toy_data":
            c.pop("plugins")
        if data is not None:
            c["data"] = data
        return _error(lambda: DiffalignConfig.from_yaml(write_config(tmp_path / "c.yaml", c), list(overrides)))

    assert "method 'toy_data' trains from a dataset on disk: set data.train" in fails(None)
    assert "data.train: no dataset file 'nowhere.jsonl'" in fails({"train": "nowhere.jsonl"})
    assert "data.train is set but method 'alignprop'" in fails({"train": "data/train.jsonl"}, "alignprop")
    assert "data.image_size must be >= 0" in fails({"train": "data/train.jsonl", "image_size": -1})
    assert "unknown config key 'data.shufle'; did you mean 'data.shuffle'?" in fails(
        {"train": "data/train.jsonl"}, overrides=("data.shufle=false",)
    )


# ------------------------------------------------------------------------------------------ end to end
def test_train_from_a_dataset_killed_and_resumed(tmp_path: Path, sd_dir: Path) -> None:
    write_dataset(tmp_path / "data", n=5)
    paths = {}
    for name in ("ref", "killed"):
        extra = {"train": {"steps": 6}, "eval": {"every": 3}, "checkpoint": {"every": 2, "keep": 2}}
        cfg = _config_data(tmp_path, sd_dir, tmp_path / name, data={"train": "data/train.jsonl"}, **extra)
        paths[name] = write_config(tmp_path / f"{name}.yaml", cfg)
    proc = run_train(paths["ref"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, run = tmp_path / "ref", tmp_path / "killed"
    metrics = records(ref / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and all(m["loss"] > 0 for m in metrics)
    # the records drawn are the stream's: 2 per step from a 5-record dataset, reshuffled every epoch
    stream = DatasetStream(dataset(tmp_path / "data" / "train.jsonl"), seed=0)
    assert [m["index_sum"] for m in metrics] == [float(sum(stream.next_indices(2))) for _ in range(6)]
    state = torch.load(ref / "checkpoints" / "step_6" / "state.pt", weights_only=True)
    assert state["data"] | {"sha256": None} == {"epoch": 2, "position": 2, "num_records": 5, "sha256": None}

    kill_inside_checkpoint_save(paths["killed"], 4)
    resume_latest(paths["killed"], 2)
    assert_same_run(ref, run)
