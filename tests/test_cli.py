"""End to end through the command line, on the real MVTec AD bottle images."""

import csv
import json

import pytest
from typer.testing import CliRunner

from hyads import load_model
from hyads.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def bottle_model(bottle, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bottle-model"
    r = run("fit", bottle, "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow
def test_fit_and_evaluate_bottle_auroc_floor(bottle_model, bottle, tmp_path):
    out = tmp_path / "eval.json"
    r = run("evaluate", bottle_model, bottle, "--out", out, "--report", tmp_path / "report")
    assert r.exit_code == 0, r.output
    metrics = json.loads(out.read_text())["metrics"]
    print(metrics)
    assert metrics["image_auroc"] >= 0.98  # a floor; measured figures are in docs/RESULTS.md
    assert metrics["pixel_auroc"] >= 0.97
    assert metrics["aupro"] >= 0.85
    assert (tmp_path / "report" / "index.html").exists()


@pytest.mark.slow
def test_coreset_sampler_bottle(bottle, tmp_path):
    r = run("fit", bottle, "--out", tmp_path / "m", "--sampler", "coreset", "--ratio", "0.02")
    assert r.exit_code == 0, r.output
    r = run("evaluate", tmp_path / "m", bottle, "--out", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["image_auroc"] >= 0.98


def test_predict_writes_overlays_masks_and_summary(bottle_model, bottle, tmp_path):
    good = sorted((bottle / "test" / "good").iterdir())[0]
    bad = sorted((bottle / "test" / "broken_large").iterdir())[0]
    r = run("predict", bottle_model, good, bad, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [row["label"] for row in rows] == ["normal", "defect"]
    assert float(rows[1]["score"]) > 0.5 > float(rows[0]["score"])
    for row in rows:
        assert (tmp_path / row["overlay"]).exists() and (tmp_path / row["mask"]).exists()
    assert json.loads((tmp_path / "summary.json").read_text())["results"][1]["defect_area_fraction"] > 0


def test_update_adds_normal_images(bottle_model, bottle, tmp_path):
    import shutil

    model_copy = tmp_path / "m"
    shutil.copytree(bottle_model, model_copy)
    seen = load_model(model_copy).fit_info_["patches_seen"]
    r = run("update", model_copy, bottle / "test" / "good")
    assert r.exit_code == 0, r.output
    updated = load_model(model_copy)
    assert updated.fit_info_["patches_seen"] == seen + 20 * 32 * 32
    assert updated.fit_info_["n_added_images"] == 20


def test_bad_input_gives_one_line_errors(tmp_path, bottle_model):
    r = runner.invoke(app, ["fit", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = runner.invoke(app, ["predict", str(bottle_model), str(tmp_path / "broken.png"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "broken.png" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["evaluate", str(tmp_path / "nomodel"), str(tmp_path)])
    assert r.exit_code == 2 and "model not found" in r.output


def test_demo_falls_back_to_synthetic_data(tmp_path):
    r = run("demo", "--data", tmp_path / "absent", "--out", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    assert "synthetic" in r.output
    assert (tmp_path / "demo" / "report" / "index.html").exists()
    metrics = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert metrics["image_auroc"] > 0.9


def test_fit_accurate_restores_the_earlier_bank_settings_and_options_override_it(synth_root, tmp_path):
    from hyads import load_model
    from hyads.config import ACCURATE_BANK, HyADSConfig

    default = load_model(_fit_ok(synth_root, tmp_path / "d")).config
    accurate = load_model(_fit_ok(synth_root, tmp_path / "a", "--accurate", "--nprobe", "2")).config
    for k, v in ACCURATE_BANK.items():
        assert getattr(default, k) == getattr(HyADSConfig(), k)
        assert getattr(accurate, k) == (2 if k == "ivf_nprobe" else v)
    assert accurate.ivf_nprobe == 2 and default.ivf_nprobe != 4 and default.knn_dim == 64


def _fit_ok(data, out, *extra):
    r = run("fit", data, "--out", out, "--image-size", "128", *extra)
    assert r.exit_code == 0, r.output
    return out
