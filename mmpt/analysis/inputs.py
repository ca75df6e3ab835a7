"""What `compare` reads: a run (a single run, an individual folder or a folder of seeds) as its members' test
predictions, the labels of the data they were evaluated on, and the check that every run was evaluated on the same
images. A training run's predictions count only once it is finished with its series' recipe
(mmpt.runs.members)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from mmpt.config.settings import load_yaml
from mmpt.errors import MmptError
from mmpt.evaluation.predict import labels_digest
from mmpt.io import read_json
from mmpt.runs.members import member_status, probe_stale, seed_folders
from mmpt.runs.names import DATA_RECORD, PREDICTION_FILE
from mmpt.runs.rundir import Results, RunDir
from mmpt.tasks import FLAGS, TASKS


@dataclass(frozen=True)
class Prediction:
    """One model's test scores of one dataset, and what they were evaluated on."""

    path: Path
    resolution: int
    images: int
    labels_sha256: str
    data_root: str | None
    grade_rule: str = "argmax"  # how the ordinal grade follows from the scores (the run's loss)


@dataclass
class Run:
    """A run as compared: its name, per seed the prediction of each dataset, and the runs left out of it."""

    name: str
    path: Path
    seeds: list[dict[str, Prediction]]
    left_out: list[tuple[Path, str]] = field(default_factory=list)  # unfinished or of another recipe, and why

    @property
    def datasets(self) -> list[str]:
        return [f for f in FLAGS if all(f in member for member in self.seeds)]


def _nearest_data_root(folder: Path) -> str | None:
    """data.root of the config.yaml in `folder` or the closest folder above it."""
    run = RunDir.enclosing(folder)
    if run is None:
        return None
    try:
        return (load_yaml(run.config.read_text()) or {}).get("data", {}).get("root")
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
        raise MmptError(f"{run.config} is not a config written by train.py; pass --data-root DIR") from None


def read_predictions(folder: Path) -> dict[str, Prediction]:
    """The test prediction files in `folder` (a predictions/ folder with its data.json) by dataset."""
    record_path = folder / DATA_RECORD
    evaluated = RunDir(folder.parent).eval("test").path
    again = f"evaluate the run again (python evaluate.py {folder.parent}) and compare {evaluated}"
    if not record_path.is_file():
        raise MmptError(
            f"{folder} has no {DATA_RECORD} (what the predictions were evaluated on; runs before it lack it): {again}"
        )
    record = read_json(record_path, again)
    entries = record.get("datasets") if isinstance(record, dict) else None
    if (
        not isinstance(entries, dict)
        or not isinstance(record.get("resolution"), int)
        or not all(
            isinstance(e, dict) and isinstance(e.get("images"), int) and isinstance(e.get("labels_sha256"), str)
            for e in entries.values()
        )
    ):
        raise MmptError(f"{record_path} is not a record of evaluated data written by mmpt; {again}")
    root = record.get("data_root") or _nearest_data_root(folder.parent)
    found: dict[str, Prediction] = {}
    for path in sorted(folder.glob("*.csv")):
        match = PREDICTION_FILE.fullmatch(path.name)
        if not match or match["split"] != "test" or match["flag"] not in record["datasets"]:
            continue
        flag = match["flag"]
        if flag in found:
            raise MmptError(
                f"{folder} has several test prediction files of {flag} ({found[flag].path.name}, "
                f"{path.name}); keep the one of the evaluated checkpoint and remove the others"
            )
        entry = record["datasets"][flag]
        found[flag] = Prediction(
            path,
            int(record["resolution"]),
            int(entry["images"]),
            entry["labels_sha256"],
            root,
            entry.get("grade_rule", "argmax"),
        )
    return found


def _counts(folder: Path, left_out: list[tuple[Path, str]]) -> bool:
    """Whether a folder's predictions count: a training run only once finished with its series' recipe
    (mmpt.runs.members.member_status); a probe's only while the run it probed has the weights it probed
    (mmpt.runs.members.probe_stale); evaluate.py outputs always. Else noted in `left_out`."""
    if not RunDir(folder).is_run():
        stale = probe_stale(Results(folder))
        if stale is not None:
            left_out.append((folder, f"a stale probe: {stale}"))
        return stale is None
    why = member_status(folder)
    if why is not None:
        left_out.append((folder, why))
    return why is None


def _member(folder: Path, left_out: list[tuple[Path, str]]) -> dict[str, Prediction]:
    """One model's predictions: a run folder, or an individual folder joining its datasets' runs."""
    predictions = Results(folder).predictions
    if predictions.is_dir() or RunDir(folder).is_run():
        if not _counts(folder, left_out) or not predictions.is_dir():
            return {}
        return read_predictions(predictions)
    member = {}
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and p.name in FLAGS):
        own_predictions = Results(child).predictions
        if (own_predictions.is_dir() or RunDir(child).is_run()) and _counts(child, left_out):
            own = read_predictions(own_predictions) if own_predictions.is_dir() else {}
            if child.name in own:
                member[child.name] = own[child.name]
    return member


def load_run(path: Path, name: str | None = None) -> Run:
    """Read a single run, an individual folder or a folder of seeds; MmptError when none has predictions.

    Training runs count as in `summarize` (finished, with their series' recipe); the others are named in
    `Run.left_out` and not read.
    """
    path = Path(path)
    if not path.is_dir():
        raise MmptError(f"run folder {path} not found; pass folders written by train.py, evaluate.py or probe")
    seed_dirs = seed_folders(path)
    left_out: list[tuple[Path, str]] = []
    member = _member(path, left_out)
    seeds = [member] if member or left_out else [m for m in (_member(d, left_out) for d in seed_dirs) if m]
    if not seeds or not any(seeds):
        reason = f" ({left_out[0][0]} is {left_out[0][1]})" if left_out else ""
        raise MmptError(
            f"{path} holds no test predictions of a finished run{reason}: pass a finished run, "
            "an individual/ folder or a folder of seed<k>/ runs"
        )
    return Run(name or str(path), path, seeds, left_out)


def check_same_data(runs: list[Run], datasets: list[str]) -> None:
    """Raise MmptError (one line) when two runs were evaluated on different images of a compared dataset."""
    reference = {}
    for run in runs:
        for member in run.seeds:
            for flag, pred in member.items():
                seen = (pred.resolution, pred.images, pred.labels_sha256)
                if flag not in datasets:
                    continue
                if flag not in reference:
                    reference[flag] = (seen, run.name)
                    continue
                (res, images, digest), other = reference[flag]
                if pred.resolution != res:
                    raise MmptError(
                        f"{run.name} was evaluated at {pred.resolution} px and {other} at {res} px; "
                        "compare runs evaluated on the same data"
                    )
                if (pred.images, pred.labels_sha256) != (images, digest):
                    raise MmptError(
                        f"{run.name} and {other} were evaluated on different {flag} test sets "
                        f"({pred.images} vs {images} images, or other labels); "
                        "compare runs evaluated on the same data files"
                    )


def read_labels(pred: Prediction, flag: str, data_root: str | None = None) -> np.ndarray:
    """The test labels of `flag` from its npz data file, checked against the predictions' record."""
    root = data_root or pred.data_root
    if root is None:
        raise MmptError(f"cannot tell where the {flag} data of {pred.path.parent} lie; pass --data-root DIR")
    path = Path(root).expanduser() / TASKS[flag].filename(pred.resolution)
    if not path.is_file():
        raise MmptError(f"{path} not found (the labels of {flag}); pass --data-root DIR with the evaluated files")
    with np.load(path) as npz:
        labels = np.asarray(npz["test_labels"], dtype=np.int64)
    labels = labels.reshape(len(labels), -1)
    if labels_digest(labels) != pred.labels_sha256:
        raise MmptError(
            f"the {flag} test labels in {path} differ from those {pred.path.parent} was evaluated on; "
            "pass --data-root DIR with the files the runs were evaluated on"
        )
    return labels


SCORE_TOLERANCE = 1e-6  # float32 softmax and sigmoid outputs written as text may stray this far outside [0, 1]


def read_scores(pred: Prediction) -> np.ndarray:
    """N×C scores of a prediction file, sorted by image index. Raises MmptError naming the file (and the row)
    when it is unreadable, has another number of rows, or holds a score that is not finite or outside [0, 1]."""
    try:
        table = pd.read_csv(pred.path, index_col=0, header=None)
        order = np.argsort(table.index.to_numpy(), kind="stable")
        scores = table.to_numpy(dtype=np.float64)[order]
        index = table.index.to_numpy()[order]
    except (OSError, ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MmptError(f"{pred.path} is not a prediction file of numbers ({reason}); evaluate the run again") from None
    if len(scores) != pred.images:
        raise MmptError(f"{pred.path} has {len(scores)} rows, not {pred.images}; evaluate the run again")
    bad = ~np.isfinite(scores) | (scores < -SCORE_TOLERANCE) | (scores > 1 + SCORE_TOLERANCE)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        line = int(np.flatnonzero(table.index.to_numpy() == index[row])[0]) + 1
        raise MmptError(
            f"{pred.path} line {line} (image {index[row]}) holds the score {float(scores[row, column])!r}, "
            "not a probability in [0, 1]; evaluate the run again (python evaluate.py RUN)"
        )
    return scores
