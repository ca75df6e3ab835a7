"""Frozen-backbone probes: how good are a backbone's features for each dataset on their own?

The backbone runs in eval mode (BatchNorm statistics frozen) without gradients; the features of every
split are extracted once and cached beside the run (features/). Per dataset a scikit-learn classifier is
fitted on the train features: logistic regression with its regularisation C chosen on val (by AUC), or
k-NN with cosine distance (k = 11 as in Doerrich et al. 2024). Test metrics and predictions are written
in evaluate.py's files and formats (metrics.{json,csv,md}, predictions/ with data.json), so `compare` takes
probe results as it takes runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mmpt.config import Config, load_config
from mmpt.data.loader import eval_loader
from mmpt.data.store import evaluation_data, open_data
from mmpt.errors import MmptError
from mmpt.evaluation.metrics import compute_metrics
from mmpt.evaluation.predict import TaskResult, metrics_table, write_predictions
from mmpt.evaluation.tables import format_table, write_metrics
from mmpt.io import atomic_write, write_json
from mmpt.model.backbones import create_backbone
from mmpt.model.build import build_transform, load_backbone
from mmpt.model.calibration import recalibrate
from mmpt.model.net import MultiTaskNet
from mmpt.model.norm import has_batchnorm
from mmpt.model.weights import is_export
from mmpt.runs import checkpoint as ckpt
from mmpt.runs.members import leaf_weights, left_out_error, left_out_line, series_runs
from mmpt.runs.rundir import FeatureCache, Results, RunDir, clear_results, probe_output
from mmpt.runtime.distributed import select_device
from mmpt.runtime.process import configure_determinism
from mmpt.tasks import MULTI_LABEL, SPLITS, TaskSpec, resolve_tasks

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # logistic regression's inverse regularisation, chosen on val


def _fit_scores(make, x_train: np.ndarray, y_train: np.ndarray, x: list[np.ndarray], classes: int) -> list[np.ndarray]:
    """Fit one single-output classifier and return each of `x`'s N×classes probabilities (absent classes: 0)."""
    present = np.unique(y_train)
    if len(present) == 1:  # nothing to learn: every image gets the one training class
        return [np.eye(classes)[np.full(len(xi), present[0])] for xi in x]
    clf = make().fit(x_train, y_train)
    out = []
    for xi in x:
        proba = np.zeros((len(xi), classes))
        proba[:, clf.classes_] = clf.predict_proba(xi)
        out.append(proba)
    return out


def probe_scores(task: TaskSpec, make, train: tuple, others: list[np.ndarray]) -> list[np.ndarray]:
    """Scores in medmnist's convention (N×2 binary, N×K multi-class/ordinal, N×L sigmoid-like multi-label)."""
    x_train, y_train = train
    if task.task_type == MULTI_LABEL:
        per_label = [_fit_scores(make, x_train, y_train[:, i], others, 2) for i in range(task.num_classes)]
        return [np.stack([per_label[i][j][:, 1] for i in range(task.num_classes)], axis=1) for j in range(len(others))]
    return _fit_scores(make, x_train, y_train[:, 0], others, task.num_classes)


def classifier_factory(method: str, *, k: int = 11, c: float = 1.0, n_train: int = 0):
    if method == "knn":
        # fit_probe has said so when k exceeds the training images
        return lambda: KNeighborsClassifier(n_neighbors=min(k, n_train), metric="cosine")
    return lambda: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def fit_probe(
    task: TaskSpec, features: dict[str, np.ndarray], labels: dict[str, np.ndarray], method: str, k: int = 11
) -> tuple[np.ndarray, dict]:
    """Fit on train (linear: C chosen by val AUC over C_GRID); return test scores and what was chosen."""
    train = (features["train"], labels["train"])
    n_train = len(labels["train"])
    if method == "knn":
        if k > n_train:
            print(
                f"note: {task.flag} has {n_train} training images, fewer than --k {k}: its k-NN probe uses "
                f"k={n_train} (recorded in probe.json)"
            )
        (test,) = probe_scores(task, classifier_factory("knn", k=k, n_train=n_train), train, [features["test"]])
        return test, {"k": min(k, n_train)}
    best = None
    for c in C_GRID:
        val, test = probe_scores(task, classifier_factory("linear", c=c), train, [features["val"], features["test"]])
        auc = compute_metrics(task, labels["val"], val)["auc"]
        score = -np.inf if np.isnan(auc) else auc
        if best is None or score > best[0]:
            best = (score, c, test)
    # val AUC is undefined when a class is absent from val: then the first (strongest-regularised) C stands
    return best[2], {"C": best[1], "val_auc": float(best[0]) if np.isfinite(best[0]) else None}


@torch.no_grad()
def extract_features(
    model: MultiTaskNet,
    cfg: Config,
    split_data,
    device: torch.device,
    batch_size: int,
    task: str | None = None,
) -> np.ndarray:
    """N×F float32 features of one split through the frozen backbone (eval mode: BatchNorm statistics fixed);
    with per-dataset norm (model.norm), through `task`'s statistics."""
    model.eval()
    transform = build_transform(cfg, model, device)
    out = []
    for _, images, _ in eval_loader({"split": split_data}, batch_size, num_workers=cfg.data.num_workers):
        out.append(model.features(transform(images.to(device)), task).float().cpu().numpy())
    return np.concatenate(out)


def _backbone_key(model: MultiTaskNet, cfg: Config) -> str:
    """Identifies the features: the backbone's weights and how images become its input."""
    digest = hashlib.sha256(ckpt.state_digest(model.backbone.state_dict()).encode())
    digest.update(json.dumps([dataclasses.asdict(cfg.input), model.input_size]).encode())
    return digest.hexdigest()


def cached_features(
    model: MultiTaskNet, cfg: Config, data: dict, cache: FeatureCache, device: torch.device, batch_size: int
) -> dict[str, dict[str, np.ndarray]]:
    """dataset -> split -> features, read from `cache` when extracted by this same backbone, else extracted."""
    cache.path.mkdir(parents=True, exist_ok=True)
    key = _backbone_key(model, cfg)
    manifest_path = cache.manifest
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("backbone") != key:
        for stale in cache.path.glob("*.npy"):
            stale.unlink()
        manifest = {"backbone": key, "files": {}}
    out: dict[str, dict[str, np.ndarray]] = {}
    model.to(device)
    for flag, task_data in data.items():
        out[flag] = {}
        for split in SPLITS:
            path = cache.file(flag, task_data.resolution, split)
            name = path.name
            if manifest["files"].get(name) == len(task_data.splits[split]) and path.is_file():
                out[flag][split] = np.load(path)
                continue
            feats = extract_features(model, cfg, task_data.splits[split], device, batch_size, task=flag)
            atomic_write(path, lambda f, feats=feats: np.save(f, feats))
            manifest["files"][name] = len(feats)
            write_json(manifest_path, manifest)
            out[flag][split] = feats
    return out


def open_eval_data(cfg: Config, tasks: list[TaskSpec], data_root: str | None, cache_dir: str | None):
    """A run's data for evaluation: never generated or downloaded (as in evaluate.py)."""
    data_cfg = evaluation_data(cfg.data, data_root, cache_dir)
    return open_data(data_cfg, tasks, evaluation=True), data_cfg.root


def probe(
    model: MultiTaskNet,
    cfg: Config,
    output: Path,
    *,
    method: str,
    k: int = 11,
    features: FeatureCache,
    datasets: str | None = None,
    data_root: str | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    name: str | None = None,
    recalibrate_images: int | None = None,
    record: dict | None = None,
) -> dict[str, dict[str, float]]:
    """Probe `model`'s frozen backbone on each dataset; write evaluate.py's files into `output`; return the table.

    `method` (linear or knn), `k` and `batch_size` are the flags the CLI checked. `recalibrate_images`: first
    re-estimate each dataset's BatchNorm statistics on that many of its own train images (recalibrate),
    so each dataset's features come through its own statistics. `record`: further entries of probe.json (the
    request and the weights it probed, by which a launcher's rerun knows a finished probe)."""
    tasks = resolve_tasks(datasets) if datasets else resolve_tasks(cfg.data.datasets)
    data, root = open_eval_data(cfg, tasks, data_root, cache_dir)
    configure_determinism(cfg.train.seed, cfg.determinism, cfg.train.tf32)
    if recalibrate_images is not None:
        if not has_batchnorm(model.backbone):
            raise MmptError(
                f"--recalibrate-norm re-estimates BatchNorm statistics, but {cfg.model.backbone} has no "
                "BatchNorm layer (ViTs and ConvNeXt use LayerNorm); probe without it"
            )
        torch_device = select_device(device)
        model.to(torch_device)
        recalibrate(
            model,
            {f: d.splits["train"] for f, d in data.items()},
            build_transform(cfg, model, torch_device),
            torch_device,
            images=recalibrate_images,
            batch_size=batch_size or cfg.data.eval_batch_size,
        )
    extracted = cached_features(
        model, cfg, data, features, select_device(device), batch_size or cfg.data.eval_batch_size
    )
    results, chosen = {}, {}
    for flag, task_data in data.items():
        labels = {s: task_data.splits[s].labels for s in SPLITS}
        scores, chosen[flag] = fit_probe(task_data.task, extracted[flag], labels, method, k)
        results[flag] = TaskResult(labels["test"], scores, compute_metrics(task_data.task, labels["test"], scores))
    table = metrics_table(results)
    written = Results(output)
    clear_results(output)  # an earlier probe's files (other datasets) must not stand beside these
    write_metrics(written, table)
    run_name = name or cfg.name
    write_predictions(
        written.predictions, results, cfg.data.resolution, "test", run=f"{run_name}-{method}", data_root=str(root)
    )
    write_json(
        written.probe_record,
        {
            "method": method,
            "chosen": chosen,
            "backbone": cfg.model.backbone,
            "feature_dim": int(next(iter(extracted.values()))["train"].shape[1]),
            **(record or {}),
        },
    )
    print(f"{method} probe of {run_name}:\n{format_table(table)}\nwritten to {output}")
    return table


def probe_request(method: str, kwargs: dict) -> dict:
    """What a probe's results depend on besides the weights, from `probe`'s keyword arguments, as probe.json records
    it (`request`): a launcher's rerun counts a probe as finished only when it was made with exactly this request."""
    data_root = kwargs.get("data_root")
    return {
        "method": method,
        "k": kwargs.get("k", 11) if method == "knn" else None,
        "datasets": kwargs.get("datasets"),
        "data_root": str(Path(data_root).absolute()) if data_root else None,
        "batch_size": kwargs.get("batch_size"),
        "recalibrate_images": kwargs.get("recalibrate_images"),
    }


def probe_leaves(source: Path, method: str, output: Path | None, recalibrated: bool, require_complete: bool):
    """(results folder, the finished runs at or under `source`) for `probe_runs` and the launcher.

    Runs count as in `summarize` and `compare` (mmpt.runs.members.series_runs): an unfinished run, or
    one of another recipe than its series asks, is named and left out (an MmptError with `require_complete`).
    Raises MmptError when `source` holds no finished run with checkpoints/best.pt.
    """
    source = Path(source)
    if not source.is_dir():
        raise MmptError(f"run folder {source} not found; pass a run, an individual/ folder or a folder of seeds")
    output = Path(output) if output else probe_output(source, method, recalibrated).path
    if is_export(source):
        finished, left_out = [source], []  # a backbone written by evaluate.py export
    else:
        finished, left_out = series_runs(source)
    if left_out and require_complete:
        raise left_out_error(left_out, f"the runs in {source} are not all finished")
    leaves = [p for p in finished if is_export(p) or RunDir(p).best.is_file()]
    if not leaves:
        raise MmptError(
            f"{source} holds no finished run (summary.json, checkpoints/best.pt)"
            + (f" ({left_out_line(left_out, source)})" if left_out else "")
            + "; pass a finished run folder, or --backbone NAME for an untrained or ImageNet reference"
        )
    if left_out:
        print(left_out_line(left_out, source))
    return output, leaves


def probe_leaf(leaf: Path, out: Path, *, method: str, request: dict, **kwargs) -> dict[str, dict[str, float]]:
    """Probe one finished run (or export) `leaf` into `out`, recording the request and the weights in probe.json:
    what a sequential probe of a series does for each run, and what a launcher's job does for its one."""
    recalibrated = kwargs.get("recalibrate_images") is not None
    model, cfg = load_backbone(leaf)
    # the run probed, by its absolute path: status and compare check that its weights are still these
    record = {"request": request, "weights": leaf_weights(leaf), "leaf": str(Path(leaf).absolute())}
    return probe(model, cfg, out, method=method, features=RunDir(leaf).features(recalibrated), record=record, **kwargs)


def probe_runs(
    source: Path, *, method: str, output: Path | None = None, require_complete: bool = False, **kwargs
) -> list[Path]:
    """Probe every finished run at or under `source` (a run, an individual folder, a folder of seeds), one after
    another in this process (evaluate.py probe --launcher runs them as jobs: mmpt.experiments.probe_launch).

    Results mirror the layout under `output` (default SOURCE/probe-<method>), so `compare` reads them as it reads
    the runs. `kwargs`: `probe`'s (k, datasets, data_root, cache_dir, device, batch_size, recalibrate_images).
    """
    source = Path(source)
    recalibrated = kwargs.get("recalibrate_images") is not None
    output, leaves = probe_leaves(source, method, output, recalibrated, require_complete)
    request = probe_request(method, kwargs)
    written = []
    for leaf in leaves:
        out = output / leaf.relative_to(source)
        probe_leaf(leaf, out, method=method, request=request, **kwargs)
        written.append(out)
    return written


def probe_backbone(
    name: str, *, pretrained: bool, config: str | None, resolution: int | None, output: Path | None, **kwargs
) -> dict[str, dict[str, float]]:
    """Probe a bare timm backbone (untrained, its weights from the seed, or ImageNet-pretrained): the reference.

    Results go to `output`, default runs/backbone-<name>[-pretrained]-<size>px/probe-<method>.
    """
    flags = {"model": {"backbone": name, "pretrained": pretrained}}
    if resolution:
        flags["data"] = {"resolution": resolution}
    cfg = load_config(config, [flags])
    configure_determinism(
        cfg.train.seed, cfg.determinism, cfg.train.tf32
    )  # an untrained backbone's weights follow the seed
    backbone = create_backbone(
        cfg.model.backbone,
        pretrained=cfg.model.pretrained,
        img_size=cfg.model.img_size,
        dynamic_img_size=cfg.input.mode == "native",
    )
    tag = f"backbone-{name}{'-pretrained' if pretrained else ''}-{cfg.data.resolution}px"
    folder = output or probe_output(Path("runs") / tag, kwargs["method"]).path
    # the features are cached beside the default output (runs/<tag>/features), or in --output
    features = RunDir(folder if output else folder.parent).features()
    return probe(
        MultiTaskNet(backbone, {}, input_size=cfg.model.img_size),
        cfg,
        folder,
        features=features,
        name=tag,
        **kwargs,
    )
