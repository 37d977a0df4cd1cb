"""The HTML report: exists, references only files that exist, and its numbers equal the JSON metrics."""

import json
import math
import re
from html.parser import HTMLParser

import pytest

from hyads.data import load_dataset
from hyads.evaluation import evaluate
from hyads.report.html import fmt, write_report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.cells, self._key, self._text = [], {}, None, ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for attr in ("src", "href"):
            if attr in a:
                self.refs.append(a[attr])
        if "data-key" in a:
            self._key, self._text = a["data-key"], ""

    def handle_data(self, data):
        if self._key is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "td" and self._key is not None:
            self.cells[self._key] = self._text.strip()
            self._key = None


def _lookup(metrics, dotted):
    node = metrics
    parts = dotted.split(".")
    i = 0
    while i < len(parts):  # keys may themselves contain dots (file names), so try the longest first
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if isinstance(node, dict) and key in node:
                node, i = node[key], j
                break
        else:
            raise KeyError(dotted)
    return node


@pytest.fixture(scope="module")
def report(synth_model, synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = evaluate(synth_model, load_dataset(synth_root))
    write_report(synth_model, result, out)
    return out, result


def test_report_files_and_links(report):
    out, _ = report
    page = (out / "index.html").read_text()
    parser = _Collect()
    parser.feed(page)
    assert len(parser.refs) >= 10
    for ref in parser.refs:
        assert not re.match(r"^[a-z]+://|^//", ref), f"external reference {ref}"
        assert (out / ref).is_file(), f"missing {ref}"
    for name in ("roc.png", "pr.png", "pro.png", "histogram.png", "confusion.png"):
        assert name in parser.refs


def test_report_numbers_equal_json(report):
    out, result = report
    parser = _Collect()
    parser.feed((out / "index.html").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"image_auroc", "pixel_auroc", "aupro", "iou", "dice"} <= set(parser.cells)
    assert any(k.startswith("per_type.") for k in parser.cells)
    assert "by_size.small.f1" in parser.cells and "by_size.large.f1" in parser.cells
    for key, text in parser.cells.items():
        value = _lookup(metrics, key)
        expected = fmt(float("nan") if value is None else value)
        assert text == expected, key
    c = metrics["confusion"]
    assert c["tp"] + c["fn"] == metrics["n_defect"]
    assert c["tn"] + c["fp"] + c["tp"] + c["fn"] == metrics["n_images"]


def test_size_groups_split_by_area(report):
    _, result = report
    bs = result.metrics["by_size"]
    areas = result.masks.reshape(len(result.masks), -1).mean(1)
    labels = [s.label for s in result.samples]
    n_small = sum(1 for a, y in zip(areas, labels) if y and 0 < a < bs["small_area_fraction"])
    assert bs["small"]["n"] == n_small
    assert bs["small"]["n"] + bs["large"]["n"] == sum(1 for a, y in zip(areas, labels) if y and a > 0)
    assert math.isfinite(bs["large"]["f1"])


def test_benchmark_suite_on_a_data_folder(tmp_path):
    from typer.testing import CliRunner

    from hyads.cli import app
    from hyads.data.synth import write_dataset

    write_dataset(tmp_path / "data" / "mvtec_ad" / "synthweave", n_train=12, n_test_good=4, n_test_per_defect=2,
                  size=128)
    (tmp_path / "data" / "neu_seg").mkdir()
    r = CliRunner().invoke(app, ["benchmark-suite", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                                 "--image-size", "128"])
    assert r.exit_code == 0, r.output
    summary = (tmp_path / "o" / "summary.md").read_text()
    rows = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert "mvtec_ad/synthweave" in summary and "neu_seg" in summary
    assert rows["mvtec_ad/synthweave"]["image_auroc"] > 0.8
    assert (tmp_path / "o" / "mvtec_ad_synthweave" / "index.html").exists()
