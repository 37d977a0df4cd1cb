"""Command-line interface (typer). Thin: parse options, call the pipeline, print, write files."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .config import ACCURATE_BANK, HyADSConfig
from .errors import HyADSError
from .utils import clean_json, write_text_atomic

app = typer.Typer(add_completion=False, no_args_is_help=True, help="hyads: visual defect detection from normal images.")
console = Console(stderr=True)
_D = HyADSConfig()  # option defaults that are config defaults come from here, so the two cannot drift
DEFAULT_DEMO_DATA = Path("..") / "shared" / "data" / "mvtec_ad" / "bottle"


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print user-fixable errors as one line (exit code 2) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HyADSError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _metrics_table(metrics: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (dict, list)):
            continue
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return table


def _per_type_table(per_type: dict[str, dict[str, float]]) -> Table:
    table = Table(title="per defect type")
    cols = sorted({c for row in per_type.values() for c in row})
    table.add_column("type")
    for c in cols:
        table.add_column(c, justify="right")
    for t, row in per_type.items():
        table.add_row(t, *[f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols])
    return table


RUNTIME_HELP = ("Neural parts: torch | onnx | onnx-int8 (ONNX graphs from `hyads export`; with onnx-int8 only the "
                "feature extractor is INT8).")


def _load(model_path: Path, runtime: str = "torch", onnx_dir: Optional[Path] = None, threads: Optional[int] = None):
    from .persist import load_model

    model = load_model(model_path)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if runtime != "torch":
        model.use_runtime(runtime, onnx_dir or model_path / "onnx", threads=threads)
    return model


@app.command()
@_friendly
def fit(
    data: Path = typer.Argument(..., help="Dataset folder (MVTec layout, class folders, or a plain folder of normal images)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to write."),
    sampler: str = typer.Option("reservoir", help="Memory-bank sampler: reservoir | coreset."),
    ratio: float = typer.Option(0.1, help="Fraction of normal patches kept in the bank."),
    coreset_keep: Optional[float] = typer.Option(None, help="Reservoir sampler: search a greedy coreset of this "
                                                 f"fraction of the reservoir (default {_D.coreset_keep}; 1 = all of it)."),
    backbone: str = typer.Option("efficientnet_lite0", help="efficientnet_lite0 | resnet18."),
    weights: Optional[Path] = typer.Option(None, help="Backbone weight file (required for resnet18)."),
    image_size: int = typer.Option(256, help="Model resolution (multiple of 32)."),
    index: str = typer.Option("auto", help=f"Nearest-neighbour index: auto (IVF from {_D.ivf_min_bank} bank rows) | flat (exact) | ivf | ivfpq."),
    seed: int = typer.Option(0, help="Seed for every random choice."),
    test_fraction: float = typer.Option(0.2, help="For class-folder datasets: share of normal images held out for testing."),
    float16: bool = typer.Option(False, "--float16", help="Store the memory bank as float16 (half the memory)."),
    detectors: str = typer.Option("patchcore", help="Comma-separated subset of texture,ae,patchcore (fused)."),
    ae_epochs: int = typer.Option(30, help="Autoencoder epochs (when 'ae' is among the detectors)."),
    smooth_at_grid: Optional[bool] = typer.Option(None, "--smooth-at-grid/--no-smooth-at-grid", help="Smooth maps on the "
                                                  f"patch grid, then upsample (default {_D.smooth_at_grid}; cheaper)."),
    projection_dim: int = typer.Option(0, help="Random projection of patch features to this many dims (0 = off; faster kNN)."),
    nprobe: Optional[int] = typer.Option(None, help=f"IVF cells searched per query (default {_D.ivf_nprobe})."),
    nlist: int = typer.Option(0, help="IVF cells (0 = 2 * sqrt(bank rows))."),
    knn_dim: Optional[int] = typer.Option(None, help="Search the bank in its top-K principal components (0 = full "
                                          f"dim; default {_D.knn_dim})."),
    knn_rerank: Optional[float] = typer.Option(None, help="IVF: search each image's top fraction of patches again "
                                               "with a wider probe (--rerank-nprobe), so misses of the narrow probe "
                                               f"cannot make a normal image look defective (default {_D.knn_rerank})."),
    rerank_nprobe: Optional[int] = typer.Option(None, help=f"IVF cells probed by the rerank pass (default {_D.knn_rerank_nprobe})."),
    accurate: bool = typer.Option(False, "--accurate", help="The earlier, slower bank settings (whole reservoir, "
                                  "nprobe 4, full-dim search, full-resolution smoothing); options given override it."),
    val_data: Optional[Path] = typer.Option(
        None, help="Labelled dataset whose test split (with defects) calibrates the threshold by F1-max; "
        "default: a held-out share of the normal training images."),
) -> None:
    """Fit a model on the normal (defect-free) training images of DATA."""
    from .data.datasets import load_dataset
    from .pipeline import HyADS

    ds = load_dataset(data, test_fraction=test_fraction, seed=seed)
    console.print(ds.summary())
    val_images = val_labels = None
    if val_data is not None:
        val = load_dataset(val_data, test_fraction=test_fraction, seed=seed)
        if not val.test:
            raise HyADSError(f"{val_data}: has no labelled test images to calibrate on")
        val_images, val_labels = [s.path for s in val.test], [s.label for s in val.test]
    bank = dict(ACCURATE_BANK) if accurate else {}
    given = {"coreset_keep": coreset_keep, "smooth_at_grid": smooth_at_grid, "ivf_nprobe": nprobe,
             "knn_dim": knn_dim, "knn_rerank": knn_rerank, "knn_rerank_nprobe": rerank_nprobe}
    bank.update({k: v for k, v in given.items() if v is not None})
    model = HyADS(sampler=sampler, ratio=ratio, backbone=backbone, weights=str(weights) if weights else None,
                  image_size=image_size, index=index, seed=seed, bank_float16=float16,
                  detectors=[d.strip() for d in detectors.split(",") if d.strip()], ae_epochs=ae_epochs,
                  projection_dim=projection_dim, ivf_nlist=nlist, **bank)
    t0 = time.perf_counter()
    model.fit(ds.train, val_images, val_labels)
    model.fit_info_["dataset"] = str(ds.root)
    model.fit_info_["dataset_notes"] = ds.notes
    model.save(out)
    if len(model.detectors) > 1:
        console.print(f"fusion weights {model.weights_} ({model.fusion_info_.get('objective', '')} on "
                      f"{model.fusion_info_.get('source', '')})")
    console.print(
        f"fitted in {time.perf_counter() - t0:.1f} s: bank {model.fit_info_['bank_size']} patches "
        f"({sampler}), threshold {model.threshold_:.4f} ({model.calibration_.method}); saved to {out}"
    )


@app.command()
@_friendly
def predict(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model directory."),
    inputs: list[Path] = typer.Argument(..., metavar="IMAGE_OR_DIR...", help="Images or folders of images."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for overlays, masks and the summary."),
    runtime: str = typer.Option("torch", help=RUNTIME_HELP),
    onnx_dir: Optional[Path] = typer.Option(None, help="Folder of the ONNX export (default MODEL/onnx)."),
) -> None:
    """Score images: writes a heat-map overlay and a mask PNG per image, plus summary.csv and summary.json."""
    from .data.datasets import list_images
    from .data.io import load_image
    from .report.overlay import heatmap_overlay, mask_png, save_png

    model = _load(model_path, runtime, onnx_dir)
    paths = list_images(inputs)
    size = model.config.image_size
    rows = []
    for i in range(0, len(paths), model.config.batch_size):
        chunk = paths[i : i + model.config.batch_size]
        rgbs = [load_image(p, size) for p in chunk]  # decoded once: for the model and for the overlay
        maps = model.anomaly_map(rgbs)
        for p, rgb, amap in zip(chunk, rgbs, maps):
            raw = float(amap.max())
            mask = amap >= model.threshold_
            stem = f"{len(rows):05d}_{p.stem}"
            save_png(heatmap_overlay(rgb, model.normalise(amap), mask), out / f"{stem}_overlay.png")
            save_png(mask_png(mask), out / f"{stem}_mask.png")
            rows.append({"image": str(p), "score": float(model.normalise(raw)), "raw_score": raw,
                         "label": "defect" if raw >= model.threshold_ else "normal",
                         "defect_area_fraction": float(mask.mean()),
                         "overlay": f"{stem}_overlay.png", "mask": f"{stem}_mask.png"})
        console.print(f"{len(rows)}/{len(paths)} images", end="\r")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "summary.csv", buf.getvalue())
    write_text_atomic(out / "summary.json", json.dumps({"threshold": model.threshold_, "results": rows}, indent=2))
    n_def = sum(r["label"] == "defect" for r in rows)
    console.print(f"{len(rows)} images: {n_def} defect, {len(rows) - n_def} normal; results in {out}")


@app.command()
@_friendly
def evaluate(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model directory."),
    data: Path = typer.Argument(..., help="Dataset folder with a test split."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Metrics JSON (default: MODEL-evaluation.json)."),
    report: Optional[Path] = typer.Option(None, help="Also write a report folder with overlays and an HTML page."),
    seed: int = typer.Option(0, help="Seed for the normal-image split of class-folder datasets (use the fit's)."),
    test_fraction: float = typer.Option(0.2, help="As given to fit, for class-folder datasets."),
    runtime: str = typer.Option("torch", help=RUNTIME_HELP),
    onnx_dir: Optional[Path] = typer.Option(None, help="Folder of the ONNX export (default MODEL/onnx)."),
) -> None:
    """Evaluate MODEL on DATA's test split: image AUROC/F1, pixel AUROC, AUPRO, IoU, Dice."""
    from .data.datasets import load_dataset
    from .evaluation import evaluate as run_eval

    model = _load(model_path, runtime, onnx_dir)
    ds = load_dataset(data, test_fraction=test_fraction, seed=seed)
    console.print(ds.summary())
    result = run_eval(model, ds)
    result.metrics["data"] = str(data)
    out = out or model_path.with_name(model_path.name + "-evaluation.json")
    doc = {"model": str(model_path), "data": str(data), "hyads_version": __version__, "metrics": result.metrics}
    write_text_atomic(out, json.dumps(clean_json(doc), indent=2))
    console.print(_metrics_table(result.metrics, f"evaluation of {model_path.name} on {data}"))
    if result.per_type:
        console.print(_per_type_table(result.per_type))
    if "by_size" in result.metrics:
        bs = result.metrics["by_size"]
        console.print(f"small defects (< {bs['small_area_fraction']:.0%} of the image): n={bs['small']['n']} "
                      f"F1={bs['small']['f1']:.4f}; large: n={bs['large']['n']} F1={bs['large']['f1']:.4f}")
    if report is not None:
        from .report.html import write_report

        write_report(model, result, report)
        console.print(f"report: {report / 'index.html'}")
    console.print(f"metrics written to {out}")


@app.command()
@_friendly
def update(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model directory (rewritten atomically)."),
    images: list[Path] = typer.Argument(..., metavar="IMAGES...", help="New confirmed-normal images or folders."),
) -> None:
    """Add new normal images to a fitted model without refitting; re-calibrates the threshold."""
    from .data.datasets import list_images
    from .persist import load_model

    model = load_model(model_path)
    paths = list_images(images)
    before = model.threshold_
    model.add_normal(paths)
    model.save(model_path)
    console.print(f"added {len(paths)} images: bank {model.fit_info_['bank_size']} patches, "
                  f"threshold {before:.4f} -> {model.threshold_:.4f}")


@app.command()
@_friendly
def demo(
    data: Path = typer.Option(DEFAULT_DEMO_DATA, help="Dataset folder; default: the MVTec AD bottle images in ../shared/data."),
    out: Path = typer.Option(Path("demo-output"), "--out", "-o", help="Folder for the model and the report."),
    sampler: str = typer.Option("reservoir", help="reservoir | coreset."),
) -> None:
    """Fit on DATA's normal images, evaluate on its test split and write a report (falls back to synthetic data)."""
    from .data.datasets import load_dataset
    from .data.synth import write_dataset
    from .evaluation import evaluate as run_eval
    from .pipeline import HyADS
    from .report.html import write_report

    env = os.environ.get("HYADS_DATA")
    if data == DEFAULT_DEMO_DATA and env:
        data = Path(env) / "mvtec_ad" / "bottle"
    if not data.exists():
        console.print(f"[yellow]{data} not found[/] (the shared MVTec AD data is not on this machine); "
                      "using a synthetic dataset generated by hyads.synth instead.")
        data = write_dataset(out / "synthetic-data", seed=0)
    ds = load_dataset(data)
    console.print(ds.summary())
    t0 = time.perf_counter()
    model = HyADS(sampler=sampler).fit(ds.train)
    result_data = str(ds.root)
    model.fit_info_["dataset"] = str(ds.root)
    model.save(out / "model")
    console.print(f"fitted in {time.perf_counter() - t0:.1f} s; threshold {model.threshold_:.4f}")
    result = run_eval(model, ds)
    result.metrics["data"] = result_data
    console.print(_metrics_table(result.metrics, f"demo on {data}"))
    if result.per_type:
        console.print(_per_type_table(result.per_type))
    write_report(model, result, out / "report")
    console.print(f"model: {out / 'model'}\nreport: {out / 'report' / 'index.html'}")


@app.command()
@_friendly
def export(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default MODEL/onnx)."),
    fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    int8: bool = typer.Option(False, "--int8", help="Also write a static INT8 graph calibrated on normal images."),
    calibration: Optional[Path] = typer.Option(
        None, help="Normal images (folder or dataset) for INT8 calibration; default: the model's training data."),
    n_calibration: int = typer.Option(32, help="Number of calibration images."),
    int8_weights: str = typer.Option("auto", help="INT8 weight type: s8 (fast; saturates on x86 CPUs without "
                                     "VNNI) | u8 (accurate everywhere) | auto (s8 if this CPU has VNNI)."),
) -> None:
    """Export every neural part to ONNX (dynamic batch): the feature extractor (optionally INT8-quantised),
    and the autoencoder and segmentation head when the model has them."""
    from .data.datasets import load_dataset
    from .export.onnx import export_onnx, quantize_int8
    from .persist import load_model

    if fmt != "onnx":
        raise HyADSError(f"unknown export format {fmt!r}: only onnx is supported")
    model = load_model(model_path)
    out = out or model_path / "onnx"
    path = export_onnx(model, out)
    parts = json.loads((out / "export.json").read_text()).get("parts", {})
    console.print(f"wrote {path}" + "".join(f", {out / p['file']}" for p in parts.values()))
    if int8:
        source = calibration or model.fit_info_.get("dataset")
        if not source:
            raise HyADSError("--int8 needs --calibration DIR (normal images)")
        train = load_dataset(source).train
        step = max(1, len(train) // n_calibration)
        path = quantize_int8(model, out, train[::step][:n_calibration], int8_weights)
        meta = json.loads((out / "export.json").read_text())
        console.print(f"wrote {path} (calibrated on {min(n_calibration, len(train))} normal images from {source}; "
                      f"weights {meta.get('int8_weights', int8_weights)})")


@app.command()
@_friendly
def bench(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model directory."),
    images: Optional[Path] = typer.Option(None, help="Images to time on (default: the model's training data)."),
    runtime: str = typer.Option("torch", help=RUNTIME_HELP),
    onnx_dir: Optional[Path] = typer.Option(None, help="Folder of the ONNX export (default MODEL/onnx)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch / ONNX Runtime."),
    batch: int = typer.Option(1, help="Batch size."),
    n_images: int = typer.Option(32, help="Images per repetition."),
    reps: int = typer.Option(5, help="Repetitions (median reported), after one warm-up."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the figures as JSON."),
    knn_engine: str = typer.Option("auto", help="Who searches an IVF bank: auto | scan (hyads's list scan) | "
                                               "faiss - to compare them."),
) -> None:
    """Per-stage speed: img/s, latency p50/p95, stage breakdown, bare backbone, GFLOP/s utilisation, peak RSS."""
    from .bench import run_bench
    from .data.datasets import list_images, load_dataset

    model = _load(model_path, runtime, onnx_dir, threads)
    if "patchcore" in model.detectors:
        model.bank_.use_engine(knn_engine)
    source = images or model.fit_info_.get("dataset")
    if not source:
        raise HyADSError("pass --images DIR")
    source = Path(source)
    paths = load_dataset(source).train if (source / "train").is_dir() else list_images([source])
    res = run_bench(model, paths[:n_images], batch=batch, reps=reps)
    table = Table(title=f"hyads bench: {res['runtime']}, batch {batch}, {res['threads']} threads")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in res.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                table.add_row(f"{k}.{kk}", f"{vv:.2f}")
        else:
            table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(table)
    if out:
        write_text_atomic(out, json.dumps(clean_json(res), indent=2))


@app.command()
@_friendly
def serve(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="Model directory."),
    host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, help="Port."),
    runtime: str = typer.Option("torch", help=RUNTIME_HELP),
    onnx_dir: Optional[Path] = typer.Option(None, help="Folder of the ONNX export (default MODEL/onnx)."),
    admin_token: Optional[str] = typer.Option(None, envvar="HYADS_ADMIN_TOKEN",
                                              help="Token for POST /v1/normal (or env HYADS_ADMIN_TOKEN)."),
    max_upload_mb: float = typer.Option(20.0, help="Largest accepted request body in MiB."),
    workers: int = typer.Option(2, help="Predictions running at once."),
    queue: int = typer.Option(16, help="Requests allowed to wait; beyond that: 503 + Retry-After."),
) -> None:
    """Serve the REST API and the web page."""
    import uvicorn

    from .serve import ServiceSettings, create_app

    settings = ServiceSettings(model_path=model_path, runtime=runtime, onnx_dir=onnx_dir, admin_token=admin_token,
                               max_upload_bytes=int(max_upload_mb * 1024 * 1024), workers=workers, queue=queue)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


@app.command()
@_friendly
def ablation(
    data: Path = typer.Argument(..., help="Dataset folder with a test split."),
    out: Path = typer.Option(Path("runs") / "ablation", "--out", "-o", help="Folder for ablation.md / .json."),
    image_size: int = typer.Option(256, help="Model resolution."),
    ae_epochs: int = typer.Option(30, help="Autoencoder epochs (early stopping may end sooner)."),
    ae_skips: str = typer.Option("2", help="U-Net skips kept: '2' (default, coarse only) or '1,2' (all)."),
    ae_noise: float = typer.Option(0.1, help="Std of Gaussian noise added to AE inputs in training (0 = off)."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """The six-way ablation: texture / AE / PatchCore alone, texture+AE, AE+PatchCore, all three."""
    from .ablation import run_ablation

    run_ablation(data, out, seed=seed, log=console.print, image_size=image_size, ae_epochs=ae_epochs,
                 ae_skips=[int(k) for k in ae_skips.split(",")], ae_noise=ae_noise)
    console.print((out / "ablation.md").read_text(), markup=False)


@app.command()
@_friendly
def segment(
    data: Path = typer.Argument(..., help="Pixel-labelled dataset in the VOC layout (JPEGImages/, "
                                "SegmentationClass/, ImageSets/Segmentation/{train,val,test}.txt), e.g. NEU-Seg."),
    out: Path = typer.Option(Path("runs") / "segment", "--out", "-o", help="Folder for model/, metrics.json, results.md."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated defect class names (label 1, 2, ...)."),
    detectors: str = typer.Option("texture,ae,patchcore", help="Detectors whose maps feed the head."),
    image_size: int = typer.Option(224, help="Model resolution (multiple of 32); predictions are resized to the masks."),
    epochs: int = typer.Option(20, help="Segmentation-head epochs (best validation mean IoU kept)."),
    ae_epochs: int = typer.Option(15, help="Autoencoder epochs."),
    ratio: float = typer.Option(0.02, help="Fraction of normal patches kept in the bank."),
    features: bool = typer.Option(True, "--features/--no-features", help="Also feed backbone patch features to the head."),
    fine: bool = typer.Option(False, "--fine/--no-fine", help="Also feed the backbone's stride-4 map to the head (thin defects)."),
    dilated: bool = typer.Option(False, "--dilated/--no-dilated", help="Dilated head body (dilation 2**i in layer i: wider context)."),
    depth: int = typer.Option(3, help="Conv layers in the head body."),
    context: int = typer.Option(0, help="Dilated context layers on the head's stride-8 branch (0 = none)."),
    bf16: bool = typer.Option(False, "--bf16/--no-bf16", help="Train the head under bfloat16 autocast (~2x faster on CPUs with AVX512-BF16/AMX)."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Average predictions over the 4 flips of each image (4x inference cost)."),
    tune: bool = typer.Option(False, "--tune/--no-tune", help="Fine-tune a copy of the backbone's deep layers inside the head (needs --fine)."),
    flip_views: bool = typer.Option(False, "--flip-views/--no-flip-views", help="Flip augmentation from the inputs of "
                                    "flipped images (4x input cost and memory) rather than flipped cached inputs."),
    lr: float = typer.Option(1e-3, help="Head learning rate (Adam, cosine schedule)."),
    loss: str = typer.Option("ce_dice", help="Head loss: ce_dice (cross-entropy + soft Dice) or lovasz "
                             "(cross-entropy + Lovasz-softmax IoU surrogates, per class and defect-vs-background)."),
    patience: int = typer.Option(5, help="Stop after this many epochs without a better validation mean IoU."),
    tune_lr: float = typer.Option(1e-4, help="Learning rate of the tuned backbone layers (--tune)."),
    init_head: Optional[Path] = typer.Option(None, help="Saved model whose segmentation head starts the training "
                                             "(second stage; same head options needed)."),
    max_train: int = typer.Option(0, help="Use only the first N training images (0 = all)."),
    refine: bool = typer.Option(False, "--refine/--no-refine", help="Learned refinement of the head's output at "
                                "stride 2 from the full-resolution grey image (sharper mask boundaries)."),
    refine_width: int = typer.Option(24, help="Refiner width (--refine)."),
    refine_features: int = typer.Option(0, help="Channels of the head's features the refiner also sees (0 = none)."),
    refine_lr: float = typer.Option(0.0, help="Refiner learning rate (0 = --lr)."),
    input_cache: Optional[Path] = typer.Option(None, help="Folder that keeps the head's inputs between runs: a "
                                               "later stage with the same images and input options skips "
                                               "computing them (NEU-Seg: ~6 GB per entry with --flip-views)."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Train the segmentation head on train.txt, select on val.txt, report IoU per class on test.txt."""
    from .data.datasets import load_segmentation_dataset
    from .pipeline import HyADS
    from .segbench import run_segmentation

    ds = load_segmentation_dataset(data, [c.strip() for c in classes.split(",")] if classes else None)
    console.print(ds.summary())
    model = HyADS(image_size=image_size, detectors=[d.strip() for d in detectors.split(",") if d.strip()],
                  seg_epochs=epochs, ae_epochs=ae_epochs, ratio=ratio, seg_features=features,
                  seg_fine_features=fine, seg_dilated=dilated, seg_depth=depth, seg_tta=tta, seg_context=context,
                  seg_bf16=bf16, seg_tune=tune, seg_lr=lr, seg_tune_lr=tune_lr, seg_patience=patience,
                  seg_flip_views=flip_views, seg_loss=loss, seg_refine=refine,
                  seg_refine_width=refine_width, seg_refine_features=refine_features, seg_refine_lr=refine_lr,
                  seed=seed, **ACCURATE_BANK)  # the bank settings every NEU-Seg result was measured with
    run_segmentation(ds, out, model, max_train=max_train, init_head=init_head, input_cache=input_cache)
    console.print((out / "results.md").read_text(), markup=False)


@app.command("segment-eval")
@_friendly
def segment_eval(
    data: Path = typer.Argument(..., help="Pixel-labelled dataset in the VOC layout (as for `hyads segment`)."),
    models: list[Path] = typer.Argument(..., metavar="MODEL...", help="One model directory, or several: their "
                                        "class probabilities are averaged (an ensemble)."),
    split: str = typer.Option("test", help="Split list to score (ImageSets/Segmentation/SPLIT.txt)."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Override each model's flip TTA setting."),
    runtime: str = typer.Option("torch", help=RUNTIME_HELP + " Each model's graphs are read from MODEL/onnx."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the scores as JSON."),
) -> None:
    """Score segmentation model(s) on a split: per-class IoU, mean IoU, binary IoU (no training)."""
    from .data.datasets import load_segmentation_dataset
    from .segbench import evaluate_segmentation

    loaded = [_load(m, runtime) for m in models]
    classes = loaded[0].config.seg_classes
    ds = load_segmentation_dataset(data, list(classes) or None)
    if split not in ds.splits or not ds.splits[split]:
        raise HyADSError(f"{data}: no '{split}' split (have: {', '.join(k for k, v in ds.splits.items() if v)})")
    for m in loaded:
        if tta is not None:
            m.config.seg_tta = tta
    res = evaluate_segmentation(loaded, ds.splits[split], ds.classes)
    res.update(models=[str(m) for m in models], split=split, runtime=runtime)
    table = Table(title=f"{split}: {len(ds.splits[split])} images, {len(models)} model(s)")
    table.add_column("figure")
    table.add_column("%", justify="right")
    for k, v in res["per_class_iou"].items():
        table.add_row(f"IoU {k}", f"{100 * v:.2f}")
    for k in ("miou_defect_classes", "miou_with_background", "binary_iou", "binary_dice"):
        table.add_row(k, f"{100 * res[k]:.2f}")
    console.print(table)
    if out:
        write_text_atomic(out, json.dumps(clean_json(res), indent=2))


def _fed_settings(image_size: int, epsilon: float, delta0: float, clip: float, chunks: int, local_epochs: int,
                  max_local_images: int, seed: int, model: str = "feature-ae"):
    from .federated.fedshufde import FedSettings

    if epsilon <= 0:
        raise HyADSError("--epsilon must be > 0 (use inf for no local noise)")
    if clip <= 0 and epsilon != float("inf"):
        raise HyADSError("local noise needs --clip > 0")
    from .federated.models import MODELS

    if model not in (*MODELS, "fusion"):
        raise HyADSError(f"--model {model!r}: use {', '.join((*MODELS, 'fusion'))}")
    return FedSettings(model=model, image_size=image_size, eps0=epsilon, delta0=delta0, clip=clip, chunks=chunks,
                       local_epochs=local_epochs, max_local_images=max_local_images, seed=seed)


EPS_HELP = "Local epsilon per round (eps0) of the Gaussian mechanism; 'inf' = no noise."
MODEL_HELP = ("What is federated: feature-ae (small AE on frozen patch features) | unet-ae (image U-Net AE) | "
              "seg-head (segmentation head; --data is one pixel-labelled VOC-layout folder) | fusion (fusion "
              "weights + threshold of every site's HyADS, one round; site models saved under --out).")
# Options every FedShufde party must agree on (simulation, server and clients share them).
FED_MODEL = typer.Option("feature-ae", help=MODEL_HELP)
FED_EPSILON = typer.Option(float("inf"), help=EPS_HELP)
FED_DELTA0 = typer.Option(1e-6, help="Local delta0 of the Gaussian mechanism.")
FED_CLIP = typer.Option(0.5, help="L2 clip bound C of an update (0 = none, only without noise).")
FED_CHUNKS = typer.Option(1, help="Reports per update, shuffled independently.")
FED_LOCAL_EPOCHS = typer.Option(1, help="Local epochs per round.")
FED_MAX_LOCAL = typer.Option(16, help="Images per site per local epoch.")
FED_IMAGE_SIZE = typer.Option(128, help="Image size.")


@app.command()
@_friendly
def federate(
    data: list[Path] = typer.Option(..., "--data", help="Dataset folder(s) whose normal images are spread over the clients (repeat)."),
    clients: int = typer.Option(4, help="Number of simulated sites."),
    model: str = FED_MODEL,
    split: str = typer.Option("by-folder", help="iid | by-folder | dirichlet (seg-head: groups are dominant defect classes)."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (split=dirichlet)."),
    rounds: int = typer.Option(5, help="Federated rounds."),
    epsilon: float = FED_EPSILON,
    delta0: float = FED_DELTA0,
    clip: float = FED_CLIP,
    chunks: int = FED_CHUNKS,
    local_epochs: int = FED_LOCAL_EPOCHS,
    max_local_images: int = FED_MAX_LOCAL,
    fraction_fit: float = typer.Option(1.0, help="Share of clients sampled each round."),
    image_size: int = FED_IMAGE_SIZE,
    compare_central: bool = typer.Option(False, "--compare-central", help="Also train the same AE centrally on pooled data."),
    max_test: int = typer.Option(0, help="Evaluate on at most N test images per dataset (0 = all)."),
    flip_views: bool = typer.Option(False, "--flip-views/--no-flip-views", help="seg-head: sites train on the "
                                    "inputs of their flipped images too (as `hyads segment --flip-views`)."),
    out: Path = typer.Option(Path("runs") / "federate", "--out", "-o", help="Folder for federation.json."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """FedShufde simulation on this machine (Flower + Ray): a model (or the fusion weights and threshold)
    trained across sites with LDP + shuffling."""
    from .federated.runner import run_federation

    s = _fed_settings(image_size, epsilon, delta0, clip, chunks, local_epochs, max_local_images, seed, model)
    if model == "fusion":
        from .federated.calibration import run_calibration_federation

        run_calibration_federation(list(data), clients, split, alpha, epsilon, delta0, {"image_size": image_size},
                                   seed, out, log=console.print)
        console.print(f"site models with the federated weights and threshold: {out}/site<i>")
        return
    if model == "seg-head":
        from .federated.segfed import run_seg_federation

        if len(data) != 1:
            raise HyADSError("--model seg-head takes exactly one --data folder (VOC layout, with masks)")
        res = run_seg_federation(data[0], clients, split, rounds, s,
                                 {"image_size": image_size, "detectors": ["texture", "patchcore"], "seed": seed,
                                  "seg_flip_views": flip_views},
                                 alpha, max_test=max_test, baselines=compare_central, out=out, log=console.print)
        console.print(f"{res['seconds_per_round']:.1f} s per round, "
                      f"{res['bytes_uploaded_per_client_per_round'] / 1e6:.2f} MB uploaded per client per round")
        console.print(res["privacy"]["summary"], highlight=False)
        return
    res = run_federation(list(data), clients, split, rounds, s, alpha, fraction_fit, compare_central, out,
                         max_test, log=console.print)
    console.print(f"federated {model} image AUROC: {res['federated']}")
    if "centralised" in res:
        console.print(f"centralised {model} image AUROC: {res['centralised']}")
    console.print(f"{res['seconds_per_round']:.1f} s per round, "
                  f"{res['bytes_uploaded_per_client_per_round'] / 1e6:.2f} MB uploaded per client per round")
    console.print(res["privacy"]["summary"], highlight=False)


@app.command()
def privacy(
    epsilon: list[float] = typer.Option([0.5, 1.0, 2.0, 4.0], help="Local eps0 per round (repeat)."),
    clients: list[int] = typer.Option([4, 100, 1000, 10_000, 100_000, 1_000_000], help="Reports per shuffle (repeat)."),
    rounds: int = typer.Option(1, help="Rounds to compose over."),
    delta: float = typer.Option(1e-6, help="Central delta of the shuffle bound."),
    delta0: float = typer.Option(0.0, help="Local delta0 of each report."),
) -> None:
    """Central epsilon after shuffling, per (eps0, number of clients): where amplification starts."""
    from .federated.privacy import compose, shuffle_amplification

    table = Table(title=f"central epsilon after shuffling (delta={delta:g}, {rounds} round(s))")
    table.add_column("eps0")
    for n in clients:
        table.add_column(f"n={n:,}", justify="right")
    for e in epsilon:
        cells = []
        for n in clients:
            b = shuffle_amplification(e, n, delta, delta0)
            cells.append(f"{compose(b.epsilon, b.delta_total, rounds)[0]:.3f}" if b.valid else "no bound")
        table.add_row(f"{e:g}", *cells)
    Console().print(table)


@app.command("federate-server")
@_friendly
def federate_server(
    address: str = typer.Option("127.0.0.1:8089", help="host:port to listen on."),
    clients: int = typer.Option(2, help="Sites expected each round."),
    model: str = FED_MODEL,
    rounds: int = typer.Option(2, help="Rounds."),
    epsilon: float = FED_EPSILON,
    delta0: float = FED_DELTA0,
    clip: float = FED_CLIP,
    chunks: int = FED_CHUNKS,
    image_size: int = FED_IMAGE_SIZE,
    round_timeout: Optional[float] = typer.Option(None, help="Seconds before a round closes without late sites."),
    out: Path = typer.Option(Path("runs") / "federate-server", "--out", "-o", help="Folder for server.json and the global AE."),
    seed: int = typer.Option(0, help="Seed (must match the clients')."),
) -> None:
    """Run the FedShufde server as its own process (clients join with `hyads federate-client`)."""
    from .federated.runner import serve

    s = _fed_settings(image_size, epsilon, delta0, clip, chunks, 1, 16, seed, model)
    res = serve(address, clients, rounds, s, round_timeout, out)
    console.print(f"{len(res['rounds'])} rounds done; {res['privacy']['summary']}", highlight=False)


@app.command("federate-client")
@_friendly
def federate_client(
    data: Path = typer.Option(..., "--data", help="This site's dataset folder (its normal images are used)."),
    address: str = typer.Option("127.0.0.1:8089", help="Server host:port."),
    site: int = typer.Option(0, help="Site number (seeds local training)."),
    model: str = FED_MODEL,
    epsilon: float = FED_EPSILON,
    delta0: float = FED_DELTA0,
    clip: float = FED_CLIP,
    chunks: int = FED_CHUNKS,
    local_epochs: int = FED_LOCAL_EPOCHS,
    max_local_images: int = FED_MAX_LOCAL,
    image_size: int = FED_IMAGE_SIZE,
    seed: int = typer.Option(0, help="Seed (must match the server's)."),
) -> None:
    """Run one site of a FedShufde federation as its own process."""
    from .federated.runner import join

    join(address, data, site, _fed_settings(image_size, epsilon, delta0, clip, chunks, local_epochs,
                                             max_local_images, seed, model))


@app.command("benchmark-suite")
@_friendly
def benchmark_suite(
    data: Path = typer.Option(Path("..") / "shared" / "data", help="Folder holding the shared datasets."),
    out: Path = typer.Option(Path("runs") / "suite", "--out", "-o", help="Folder for reports and summary.md."),
    sampler: str = typer.Option("reservoir", help="reservoir | coreset."),
    image_size: int = typer.Option(256, help="Model resolution."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Fit + evaluate on every shared dataset that applies; writes one Markdown table (summary.md)."""
    from .errors import DatasetError
    from .suite import run_suite

    if not data.is_dir():
        raise DatasetError(f"{data}: data folder not found")
    run_suite(data, out, sampler=sampler, image_size=image_size, seed=seed, log=console.print)
    console.print((out / "summary.md").read_text(), markup=False)


@app.command()
def version() -> None:
    """Print the hyads version."""
    typer.echo(__version__)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
