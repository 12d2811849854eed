"""``dfq report``: the comparison table, the plots and the generator samples of run directories.

The run directories come from real (tiny) engine runs of ``resnet20a_cifar10`` with random
weights: two epochs of two iterations, so the whole module takes a few seconds.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import dfq
from dfq.cli import main
from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.models import create_model
from dfq.report import generator_samples, load_run, write_report
from dfq.train import TRAIN_CHECKPOINT
from dfq.utils.io import save_json, save_yaml

MODEL = "resnet20a_cifar10"
SCORES = {"adadfq": [31.25, 27.5], "gdfq": [12.5, 40.0], "zaq": []}
FP_TOP1 = 91.73


def _train(run_dir: Path, method: str, evaluate: bool = True, epochs: int = 2) -> dict:
    train = {"epochs": epochs, "iters_per_epoch": 2, "batch_size": 4, "warmup_epochs": 1, "observe_epochs": 1}
    config = resolve_config(None, {"model": MODEL, "method.name": method,
                                   **{f"method.train.{k}": v for k, v in train.items()}})  # fmt: skip
    torch.manual_seed(0)
    scores = iter(SCORES[method])
    run_dir.mkdir(parents=True)
    save_yaml(config.to_dict(), run_dir / "config.yaml")
    scorer = (lambda _m: {"top1": next(scores), "top5": 100.0}) if evaluate else None
    result = dfq.quantize(create_model(MODEL), config.quant, config.method, run_dir=run_dir, progress=False,
                          evaluate=scorer)  # fmt: skip
    summary = {**result.summary, "model": MODEL, "fp_top1": FP_TOP1}
    save_json(summary, run_dir / "summary.json")
    return summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    dirs = {name: root / name for name in ("adadfq", "gdfq", "zaq", "zeroq", "partial")}
    _train(dirs["adadfq"], "adadfq")
    _train(dirs["gdfq"], "gdfq")
    _train(dirs["zaq"], "zaq", evaluate=False, epochs=1)
    # ZeroQ: no metrics, no generator.
    dirs["zeroq"].mkdir()
    save_yaml(resolve_config(None, {"model": MODEL, "method": "zeroq"}).to_dict(), dirs["zeroq"] / "config.yaml")
    save_json(
        {"method": "zeroq", "model": MODEL, "wbits": 4, "abits": 4, "seconds": 3.5, "top1": 55.5, "fp_top1": FP_TOP1},
        dirs["zeroq"] / "summary.json",
    )
    # An AdaDFQ run still training, written before H′ quantiles were logged.
    shutil.copytree(dirs["adadfq"], dirs["partial"])
    (dirs["partial"] / "summary.json").unlink()
    lines = (dirs["partial"] / "metrics.jsonl").read_text().splitlines()
    old = [{k: v for k, v in json.loads(ln).items() if not k.startswith("g_h_norm_")} for ln in lines[:1]]
    (dirs["partial"] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    return dirs


@pytest.fixture(scope="module")
def report(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report")
    return write_report([runs[k] for k in ("adadfq", "gdfq", "zaq", "zeroq", "partial")], out), out


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 100 and im.height > 100
        return im.size


def test_files_and_valid_pngs(report: tuple[dict, Path]) -> None:
    result, out = report
    names = {Path(p).name for p in result["images"]}
    assert names == {
        "top1.png",
        *(f"losses_{r}.png" for r in ("adadfq", "gdfq", "zaq", "partial")),
        "hnorm_adadfq.png",  # AdaSG/AdaDFQ only
        "hnorm_partial.png",  # mean only: the run logged no quantiles
        *(f"samples_{r}.png" for r in ("adadfq", "gdfq", "zaq", "partial")),
    }
    assert {p.name for p in out.glob("*.png")} == names
    for name in names:
        _png(out / name)
    assert Path(result["markdown"]) == out / "report.md" and Path(result["html"]) == out / "report.html"


def test_table_rows_and_markdown(report: tuple[dict, Path]) -> None:
    result, out = report
    rows = {r["run"]: r for r in result["rows"]}
    assert list(rows) == ["adadfq", "gdfq", "zaq", "zeroq", "partial"]
    ada, gdfq, zaq, zeroq, partial = rows.values()
    assert (ada["top1"], ada["top1_best"], ada["best_epoch"], ada["fp_top1"]) == (27.5, 31.25, 0, FP_TOP1)
    assert (gdfq["top1"], gdfq["top1_best"], gdfq["best_epoch"]) == (40.0, 40.0, 1)
    assert (ada["iterations"], ada["batch_size"], ada["status"]) == (4, 4, "finished")
    assert zaq["top1"] is None and zaq["top1_best"] is None and zaq["iterations"] == 2
    assert zeroq["top1"] == 55.5 and zeroq["iterations"] is None and zeroq["batch_size"] is None
    assert zeroq["top1_best"] is None and zeroq["seconds"] == 3.5
    assert partial["status"] == "in progress" and partial["top1"] is None
    assert (partial["top1_best"], partial["best_epoch"], partial["epochs_done"]) == (31.25, 0, 1)
    assert partial["seconds"] is not None  # from metrics.jsonl

    md = (out / "report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert "best top-1 (test-selected)" in table[0]
    body = {ln.split(" | ")[0][2:]: ln for ln in table[1:]}
    assert set(body) == {"adadfq", "gdfq", "zaq", "zeroq", "partial (in progress)"}
    assert "| 27.50 | 31.25 (epoch 0) | 91.73 |" in body["adadfq"]
    assert "| 40.00 | 40.00 (epoch 1) |" in body["gdfq"] and "| W4A4 |" in body["gdfq"]
    assert "| 55.50 | – | 91.73 | 3.5 s | – | – |" in body["zeroq"]
    assert "| – | 31.25 (epoch 0) |" in body["partial (in progress)"]
    assert "| 2 of 4 |" in body["partial (in progress)"]
    for name in ("top1.png", "losses_adadfq.png", "hnorm_adadfq.png", "samples_zaq.png"):
        assert f"]({name})" in md
    assert "in progress" in md.lower() and "only the batch mean" in md


def test_html_has_the_same_content_with_relative_images(report: tuple[dict, Path]) -> None:
    result, out = report
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for p in result["images"]:
        assert f'src="{Path(p).name}"' in page
    assert str(out) not in page
    assert "<td>31.25 (epoch 0)</td>" in page and "<td>partial (in progress)</td>" in page


def test_generator_samples(runs: dict[str, Path]) -> None:
    state = torch.get_rng_state()
    s = generator_samples(runs["adadfq"])
    assert torch.equal(torch.get_rng_state(), state)  # the global random stream is left alone
    assert s["images"].shape == (80, 3, 32, 32) and s["classes"] == list(range(10)) and s["per_row"] == 8
    assert float(s["images"].min()) >= 0.0 and float(s["images"].max()) <= 1.0
    assert float(s["images"].std()) > 0.01
    assert torch.equal(generator_samples(runs["adadfq"])["images"], s["images"])  # fixed seed
    u = generator_samples(runs["zaq"])  # unconditional: an 8x8 grid
    assert u["images"].shape == (64, 3, 32, 32) and u["classes"] is None


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli(capsys, "report", str(runs["gdfq"]), str(runs["zeroq"]), "--out", str(tmp_path / "r"), "--json")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and "report of 2 runs" in lines[0]
    payload = json.loads(lines[-1])
    assert [r["run"] for r in payload["rows"]] == ["gdfq", "zeroq"]
    assert {Path(p).name for p in payload["images"]} == {"top1.png", "losses_gdfq.png", "samples_gdfq.png"}
    assert Path(payload["markdown"]).is_file()


@pytest.mark.parametrize("problem", ["missing", "no_config"])
def test_cli_bad_run_dir_is_one_line(
    problem: str, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "nowhere"
    if problem == "no_config":
        bad.mkdir()
    rc, _, err = _cli(capsys, "report", str(runs["zeroq"]), str(bad), "--out", str(tmp_path / "r"))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dfq: error:") and str(bad) in lines[0]
    assert ("not found" if problem == "missing" else "no config.yaml") in lines[0]
    assert not (tmp_path / "r").exists()


def test_same_names_get_distinct_files(runs: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "gdfq"
    shutil.copytree(runs["gdfq"], copy, ignore=shutil.ignore_patterns("*.pt"))  # no samples: faster
    result = write_report([runs["gdfq"], copy, runs["gdfq"]], tmp_path / "r")  # the repeat is dropped
    names = [r["run"] for r in result["rows"]]
    assert len(names) == 2 and names[1] == "elsewhere/gdfq" and names[0].endswith("/gdfq")
    assert len({Path(p).name for p in result["images"] if "losses_" in p}) == 2
    assert any(f"elsewhere/gdfq: no {TRAIN_CHECKPOINT}" in n for n in result["notes"])


def test_without_matplotlib(runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DFQError, match=r"pip install 'dfq\[plot\]'"):
        write_report([runs["zeroq"]], tmp_path / "r")


def test_load_run_rejects_bad_metrics(runs: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(runs["gdfq"], bad)
    (bad / "metrics.jsonl").write_text('{"epoch": 0}\nnot json\n')
    with pytest.raises(DFQError, match="line 2 is not valid JSON"):
        load_run(bad)
