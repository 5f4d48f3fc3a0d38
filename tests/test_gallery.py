"""Seeing results on a tiny training run: captioned grids, eval prompts in the run directory, evaluation
images redrawn by ``diffalign sample --run``, images in TensorBoard, the gallery command printed by
``diffalign train``, ``diffalign gallery`` (files, scores, valid HTML), ``diffalign plot`` (with and
without gold) and one-line errors. The page in a real browser: tests/test_gallery_browser.py."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from train_fixtures import tiny_config, write_config

from diffalign.cli import main
from diffalign.gallery.grids import ROW_LABEL_WIDTH, captioned_grid
from diffalign.gallery.rundir import RunDir

VOID = {"meta", "img", "br", "link", "input", "hr", "source", "area", "base", "col", "embed", "wbr"}


def build_run(root: Path, sd_dir: Path) -> tuple[Path, str]:
    """A 3-step AlignProp run on the tiny pipeline with TensorBoard and sample grids; returns (dir, stdout)."""
    out = root / "run"
    cfg = tiny_config(
        sd_dir,
        out,
        log={"progress": False, "sample_every": 2, "trackers": ["tensorboard"]},
        eval={"every": 2, "num_prompts": 2, "seeds": [0, 1], "batch_size": 4, "rewards": ["train_fixtures:Darkness"]},
    )
    path = write_config(root / "cfg.yaml", cfg)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train", "--config", str(path)]) == 0
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sd_dir):
    return build_run(tmp_path_factory.mktemp("gallery_run"), sd_dir)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, trained):
    """``diffalign gallery`` of the tiny run: base, the run, ReNO; the run's eval prompts and seeds."""
    run, _ = trained
    out = tmp_path_factory.mktemp("gallery") / "page"
    argv = ["gallery", "--run", f"tiny AlignProp={run}", "--reward", "train_fixtures:Brightness"]
    argv += ["--reno", "train_fixtures:Brightness", "--reno-iters", "2", "--reno-steps", "1", "--out", str(out)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return out, buf.getvalue()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def eval_tile(run: Path, step: int, row: int, col: int, side: int = 32) -> np.ndarray:
    """Tile (prompt ``row``, seed ``col``) of ``samples/eval_step_N.png``, located through its layout JSON."""
    layout = json.loads((run / "samples" / f"eval_step_{step}.json").read_text())
    x = ROW_LABEL_WIDTH + 2 + 2 + col * (side + 2)
    y = layout["rows"][row][0] + 2
    return pixels(run / "samples" / f"eval_step_{step}.png")[y : y + side, x : x + side]


def upscaled(path: Path, factor: int = 2) -> np.ndarray:
    return pixels(path).repeat(factor, axis=0).repeat(factor, axis=1)


# ------------------------------------------------------------------------------------------------ grids
def test_captioned_grid_keeps_tiles_and_reports_rows():
    import torch

    images = torch.zeros(4, 3, 8, 8)
    images[1, 0] = 1.0
    plain, _ = captioned_grid(images, 2)
    pic, layout = captioned_grid(images, 2, title="t", row_labels=["a", "b"], col_labels=["s0", "s1"], scale=2)
    assert plain.size == (2 * 10 + 2, 2 * 10 + 2)
    assert layout.header > 0 and len(layout.rows) == 2 and pic.size == tuple(layout.size)
    red = np.asarray(pic)[layout.rows[0][0] + 2 + 4, ROW_LABEL_WIDTH + 2 + 2 + 18 + 4]
    assert tuple(red) == (255, 0, 0)  # image 1 = row 0, column 1, after the prompt column
    assert np.asarray(pic)[2:12, 4:40].min() < 128  # the title is drawn


def test_run_directory_holds_eval_prompts_and_captioned_grids(trained):
    run, _ = trained
    rows = [json.loads(x) for x in (run / "eval_prompts.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["seed"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[3]["generator_seed"] == 1 * 1_000_003 + 1
    prompts, seeds = RunDir.open(run).eval_items()
    assert prompts == [rows[0]["prompt"], rows[2]["prompt"]] and seeds == [0, 1]
    layout = json.loads((run / "samples" / "eval_step_3.json").read_text())
    assert layout["row_labels"] == prompts and layout["col_labels"] == ["seed 0", "seed 1"]
    assert "step 3" in layout["title"] and len(layout["rows"]) == 2
    for name in ("eval_step_0.png", "eval_step_3.png", "step_2.png"):
        assert Image.open(run / "samples" / name).width > 200  # prompt column / captions, not bare tiles


def test_grid_prompt_cap_is_a_config_key(tmp_path, sd_dir):
    out = tmp_path / "run"
    cfg = tiny_config(
        sd_dir, out, train={"method": "alignprop", "steps": 1, "lr": 1e-2, "seed": 0}, eval={"every": 0, **_EVAL1}
    )
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    assert len(json.loads((out / "samples" / "eval_step_1.json").read_text())["rows"]) == 1
    assert len((out / "eval_prompts.jsonl").read_text().splitlines()) == 3  # every prompt is still evaluated


_EVAL1 = {"num_prompts": 3, "seeds": [0], "batch_size": 4, "grid_prompts": 1}


def test_sample_run_redraws_the_evaluation_images(trained, tmp_path, capsys):
    run, _ = trained
    for step, out in ((None, tmp_path / "final"), (0, tmp_path / "base")):
        argv = ["sample", "--run", str(run), "--out", str(out)] + (["--step", str(step)] if step is not None else [])
        assert main(argv) == 0, capsys.readouterr().err
        index = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
        assert [(r["prompt_index"], r["seed"]) for r in index] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for k, r in enumerate(index):
            tile = eval_tile(run, 3 if step is None else 0, k // 2, k % 2)
            assert np.abs(upscaled(out / r["file"]) - tile).max() <= 1, (step, k)
        assert (out / "grid" / "grid.png").is_file()
    assert "evaluation images" in capsys.readouterr().out


def test_trackers_get_the_eval_and_sample_grids(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = trained
    events = next((run / "logs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent), size_guidance={"images": 0})
    acc.Reload()
    assert {"eval/grid", "train/samples"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("eval/grid")] == [0, 2, 3]


def test_train_ends_with_the_gallery_command(trained):
    run, printed = trained
    line = next(x for x in printed.splitlines() if "diffalign gallery" in x)
    assert f"--run {run}" in line and "--reward train_fixtures:Brightness" in line
    assert "--reward train_fixtures:Darkness" in line and f"--out {run / 'gallery'}" in line


# ------------------------------------------------------------------------------------------------ gallery
class Checker(HTMLParser):
    """Strict enough for our page: every non-void tag closed in order, ids unique, nothing left open."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.ids: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def test_gallery_writes_a_valid_page_with_every_image_and_score(gallery):
    out, printed = gallery
    html = (out / "index.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "http://" not in html and "https://" not in html  # no CDN
    checker = Checker()
    checker.feed(html)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert len(checker.ids) == len(set(checker.ids))
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 2  # base, run, ReNO x 2 prompts x 2 seeds
    assert {r["variant"] for r in rows} == {"base", "tiny-alignprop", "reno"}
    assert set(rows[0]["scores"]) == {"train_fixtures:Brightness", "gold/accuracy", "gold/score"}
    for r in rows:
        assert (out / r["file"]).is_file() and f'src="{r["file"]}"' in html
        for key, value in r["scores"].items():
            assert f'data-score="{key}">{value:.3f}<' in html
    page_imgs = [a for a in checker.imgs if a["src"].startswith("images/")]
    assert len(page_imgs) == len(rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"base", "tiny AlignProp", "ReNO (train_fixtures:Brightness; 2 it.)"}
    assert set(summary["base"]["train_fixtures:Brightness"]) == {"mean", "seed_spread"}
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert "gold.png" in plots and "train_reward.png" in plots and "heldout.png" in plots
    assert all(f'src="plots/{p}"' in html for p in plots)
    assert "open: file://" in printed
    command = json.loads((out / "gallery.json").read_text())["command"]
    assert command.startswith("diffalign gallery --run 'tiny AlignProp=") and escape(command) in html


def test_gallery_run_column_is_the_runs_final_evaluation(gallery, trained):
    out, _ = gallery
    run, _ = trained
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    for r in (r for r in rows if r["variant"] == "tiny-alignprop"):
        tile = eval_tile(run, 3, r["prompt_index"], [0, 1].index(r["seed"]))
        assert np.abs(upscaled(out / r["file"]) - tile).max() <= 1


def test_reno_column_does_not_score_worse_than_its_start(gallery):
    out, _ = gallery
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["scores"]["train_fixtures:Brightness"]) for r in rows if r["variant"] == "reno")


# ------------------------------------------------------------------------------------------------ plots
def test_plot_with_and_without_gold(trained, tmp_path, capsys):
    run, _ = trained
    assert main(["plot", "--run", str(run), "--out", str(tmp_path / "a")]) == 0
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"train_reward.png", "eval_reward.png", "gold.png", "heldout.png", "grad_norm.png"} <= names
    assert Image.open(tmp_path / "a" / "gold.png").size[0] > 400
    # a real-model run: no gold in eval.jsonl, compared with the shapes run on one axis
    other = tmp_path / "nogold"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints", "logs", "samples"))
    evals = [json.loads(x) for x in (other / "eval.jsonl").read_text().splitlines()]
    text = "".join(json.dumps({k: v for k, v in e.items() if not k.startswith("gold/")}) + "\n" for e in evals)
    (other / "eval.jsonl").write_text(text)
    assert main(["plot", "--run", f"real={other}", "--out", str(tmp_path / "b")]) == 0
    assert "gold.png" not in {p.name for p in (tmp_path / "b").iterdir()}
    assert main(["plot", "--run", str(run), "--run", f"real={other}", "--out", str(tmp_path / "c")]) == 0
    assert "gold.png" in {p.name for p in (tmp_path / "c").iterdir()}
    assert "wrote" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ errors
def one_line_error(argv: list[str], capsys, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_gallery_and_plot_errors_are_one_line(trained, tmp_path, capsys):
    run, _ = trained
    out = ["--out", str(tmp_path / "o")]
    one_line_error(["gallery", "--run", str(tmp_path / "nope"), *out], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(["gallery", "--run", str(tmp_path / "empty"), *out], capsys, "config.yaml")
    nolora = tmp_path / "nolora"
    nolora.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl"):
        shutil.copy(run / name, nolora / name)
    one_line_error(["gallery", "--run", str(nolora), *out], capsys, "no LoRA")
    nometrics = tmp_path / "nometrics"
    shutil.copytree(run, nometrics, ignore=shutil.ignore_patterns("metrics.jsonl", "checkpoints", "logs"))
    one_line_error(["gallery", "--run", str(nometrics), *out], capsys, "metrics.jsonl")
    one_line_error(["plot", "--run", str(nometrics), *out], capsys, "metrics.jsonl")
    one_line_error(["gallery", "--run", str(run), "--reward", "no_such_reward", *out], capsys, "no_such_reward")
    (tmp_path / "p.txt").write_text("\n \n")
    one_line_error(["gallery", "--run", str(run), "--prompts", str(tmp_path / "p.txt"), *out], capsys, "empty")
    for bad in ("3-1", "a", "0,,1", "-1"):
        one_line_error(["gallery", "--run", str(run), f"--seeds={bad}", *out], capsys, "--seeds")
    one_line_error(["gallery", "--base", "assets/shapes-sd", *out], capsys, "--prompts")
    one_line_error(["gallery", "--run", str(run), "--reno", "shapes_gold", *out], capsys, "differentiable")
    one_line_error(["gallery", *out], capsys, "--run")


def test_sample_run_errors_are_one_line(trained, tmp_path, capsys):
    run, _ = trained
    out = ["--out", str(tmp_path / "o")]
    one_line_error(["sample", "--run", str(run), "--steps", "4", *out], capsys, "--steps does not go with --run")
    one_line_error(["sample", "--run", str(run), "--step", "1", *out], capsys, "no LoRA of step 1", "2, 3")
    one_line_error(["sample", "--run", str(tmp_path / "nope"), *out], capsys, "does not exist")
    one_line_error(["sample", "--prompt", "x", "--step", "1", *out], capsys, "--step goes with --run")
    one_line_error(["sample", "--prompt", "x", *out], capsys, "--model")
    bad = tmp_path / "bad"
    shutil.copytree(run, bad, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    (bad / "eval_prompts.jsonl").write_text('{"prompt": "x"}\n')
    one_line_error(["sample", "--run", str(bad), *out], capsys, "eval_prompts.jsonl")


def test_run_without_eval_prompts_file_recomputes_them(trained, tmp_path):
    run, _ = trained
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("checkpoints", "logs", "eval_prompts.jsonl"))
    assert RunDir.open(old).eval_items() == RunDir.open(run).eval_items()
    assert yaml.safe_load((old / "config.yaml").read_text())["eval"]["grid_prompts"] == 8


# ------------------------------------------------------------------------------------------------ browser
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    """The headless Chromium binary, or a skip that says how to get it (never a silent pass)."""
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.skip(
            "no Chromium binary on PATH (looked for chromium, chromium-browser, google-chrome): the gallery page "
            "was NOT tested in a browser; install Debian's chromium (apt-get install -y chromium) to run this test"
        )
    return found


def chromium(tmp_path: Path, *args: str) -> str:
    import subprocess

    cmd = [browser(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-dev-shm-usage"]
    cmd += [f"--user-data-dir={tmp_path / 'profile'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Dom(HTMLParser):
    """The parts of a dumped DOM the tests read: body attributes, status, overlay, rows, cells, images."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.status: dict[str, str] = {}
        self.overlay: dict[str, str] = {}
        self.overlay_img: dict[str, str] = {}
        self.rows: list[str] = []
        self.best: dict[str, str] = {}
        self.imgs: dict[str, dict[str, str]] = {}
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        elif a.get("id") == "status":
            self.status = a
        elif a.get("id") == "overlay":
            self.overlay = a
        elif a.get("id") == "overlay-img":
            self.overlay_img = a
        elif tag == "tr" and "data-index" in a:
            self.rows.append(a["data-index"])
        elif tag == "td" and "best" in a.get("class", "").split():
            self.best[self.rows[-1]] = a["data-variant"]
        elif tag == "img" and a.get("src", "").startswith("images/"):
            self.imgs[a["id"]] = a

    def handle_data(self, data):
        self.text.append(data)


def with_script(page: Path, script: str) -> Path:
    """A copy of the page (beside it, so images resolve) with ``script`` run after the page's own."""
    copy = page.with_name("test_" + page.name)
    copy.write_text(page.read_text().replace("</body>", f"<script>{script}</script></body>"))
    return copy


def row_means(out: Path, variant: str, key: str) -> dict[str, float]:
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["variant"] == variant]
    return {
        str(i): float(np.mean([r["scores"][key] for r in mine if r["prompt_index"] == i]))
        for i in {r["prompt_index"] for r in mine}
    }


def test_page_in_chromium_loads_every_image_and_shows_every_score(gallery, tmp_path):
    out, _ = gallery
    dom = Dom(chromium(tmp_path, "--dump-dom", (out / "index.html").resolve().as_uri()))
    assert dom.body.get("data-ready") == "1", "the page's script did not run to the end"
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert dom.status == {"id": "status", "data-loaded": str(len(rows)), "data-broken": "0"}
    assert len(dom.imgs) == len(rows)
    text = "".join(dom.text)
    for r in rows:
        img = dom.imgs[f"img-{r['variant']}-{r['prompt_index']}-{r['seed']}"]
        assert img["src"] == r["file"]
        assert json.loads(img["data-scores"]) == pytest.approx(r["scores"])
        assert all(f"{v:.3f}" in text for v in r["scores"].values())
    assert dom.overlay.get("hidden") is not None  # nothing enlarged yet
    assert dom.body["data-sort-key"] == "gold/score"


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_sorting_in_chromium(gallery, tmp_path, order):
    out, _ = gallery
    key, variant = "train_fixtures:Brightness", "tiny-alignprop"
    script = (
        f"document.getElementById('sort-key').value = {json.dumps(key)};"
        f"document.getElementById('sort-by').value = {json.dumps(variant)};"
        f"const d = document.getElementById('sort-dir'); d.value = {json.dumps(order)};"
        "d.dispatchEvent(new Event('change'));"
    )
    dom = Dom(chromium(tmp_path, "--dump-dom", with_script(out / "index.html", script).resolve().as_uri()))
    means = row_means(out, variant, key)
    sign = 1 if order == "asc" else -1
    expected = sorted(means, key=lambda i: (sign * means[i], int(i)))  # ties in prompt order, as the page does
    assert dom.rows == expected and dom.body["data-sort-dir"] == order
    for i in dom.rows:  # the best variant of each row by the sort key
        best = {v: row_means(out, v, key)[i] for v in ("base", "tiny-alignprop", "reno")}
        assert dom.best[i] == max(best, key=best.get)
    # the same view from the address alone
    url = (out / "index.html").resolve().as_uri() + f"#sort={key}&by={variant}&dir={order}"
    assert Dom(chromium(tmp_path, "--dump-dom", url)).rows == expected


def test_click_enlarges_an_image_in_chromium(gallery, tmp_path):
    out, _ = gallery
    script = "document.getElementById('img-base-1-1').click();"
    dom = Dom(chromium(tmp_path, "--dump-dom", with_script(out / "index.html", script).resolve().as_uri()))
    assert dom.overlay.get("hidden") is None and dom.overlay["data-view"] == "img-base-1-1"
    assert dom.overlay_img["src"] == "images/base/001_s1.png"
    closed = script + "document.getElementById('overlay').click();"
    dom = Dom(chromium(tmp_path, "--dump-dom", with_script(out / "index.html", closed).resolve().as_uri()))
    assert dom.overlay.get("hidden") is not None


def test_screenshot_in_chromium_is_not_blank(gallery, tmp_path):
    out, _ = gallery
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1000,800", (out / "index.html").resolve().as_uri())
    pic = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pic.shape[:2] == (800, 1000)
    assert pic.std() > 10 and len(np.unique(pic.reshape(-1, 3), axis=0)) > 50
    assert (pic < 200).any(axis=2).mean() > 0.01  # text and images, not an empty page


def test_wandb_gets_the_grid_as_a_pil_image(tmp_path):
    """W&B is not installed in the test venv: the trainer's call into accelerate's tracker, with a recorder."""
    from types import SimpleNamespace

    from diffalign.trainer import Trainer

    calls = []
    tracker = SimpleNamespace(log_images=lambda values, step, **kw: calls.append((values, step, kw)))
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(log=SimpleNamespace(trackers=["wandb"]))
    trainer.acc = SimpleNamespace(get_tracker=lambda name: tracker)
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "g.png")
    trainer._log_image("eval/grid", tmp_path / "g.png", 7)
    ((values, step, kw),) = calls
    assert step == 7 and not kw and list(values) == ["eval/grid"]
    (picture,) = values["eval/grid"]
    assert picture.size == (6, 4) and picture.getpixel((0, 0)) == (255, 0, 0)


def test_before_after_keeps_the_captions_of_captioned_grids(trained, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import before_after

    run, _ = trained
    assert before_after.main([str(run), "--rows", "1", "--out", str(tmp_path / "ba.png")]) == 0
    layout = json.loads((run / "samples" / "eval_step_0.json").read_text())
    fig = Image.open(tmp_path / "ba.png")
    assert fig.height == before_after.CAPTION + layout["rows"][0][1]  # title, seed labels and the first row
    assert fig.width == 2 * layout["size"][0] + before_after.GAP
