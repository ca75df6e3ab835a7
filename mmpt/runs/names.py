"""The name of every file and folder mmpt writes into a run or series folder, and the patterns that recognise
them (so that --overwrite removes what mmpt wrote, by name): this module alone spells them. mmpt.runs.rundir and
mmpt.runs.seriesdir give the paths.

runs/<name>/
  config.yaml, env.json                 the resolved config and the environment (train.py)
  config.before-resume-at-step<N>.yaml  the records a resume replaced (env.json too)
  checkpoints/{last,best}.pt            the training state; the best weights
  tb/                                   TensorBoard events
  val_history.json, val_auc.png         per-epoch validation
  gradient_conflicts.{json,png}         the gradient-conflict diagnostic's measurements and their heat map
  summary.json                          digests of the final and best weights, steps, the best epoch
  metrics.{json,csv,md}, predictions/, loss_curves.png   best.pt's test report (a `Results` folder)
  metrics_per_class.{csv,md}            its per-class table
  eval/<split>[-recalibrated]/          evaluate.py's results (a `Results` folder, with confusion_<flag>.png and
                                        reliability_<flag>.png)
    temperature.json, calibrated/       --calibrate temperature: the fitted temperatures and a `Results` folder of
                                        the calibrated scores
  features[-recalibrated]/              the probes' cached features (a `FeatureCache`)
  compare.{json,csv,md,html,tex}, compare_per_class.csv, compare_<metric>.png, compare_diff.png,
  compare_forest.png                    evaluate.py compare with this run first
  job.log                               a link to the log of the job that trains it (train.py --launcher)

runs/<name>/                            a series (mmpt.experiments.series): its members' run folders
  series.json                           the recipe asked for and each member's resolved config
  sweep.{json,csv,md,png}               the summary over its finished runs (mmpt.experiments.summary)
  jobs/                                 a launcher's (train.py --launcher): jobs.json, its record, and submitit's
                                        files, jobs/local/<member>/ and jobs/slurm/; a single run trained as a
                                        job is a series of one, its jobs/ in its own folder
"""

from __future__ import annotations

import re

CONFIG = "config.yaml"
ENV = "env.json"
SUMMARY = "summary.json"
VAL_HISTORY = "val_history.json"
VAL_AUC_PLOT = "val_auc.png"
LOSS_CURVES_PLOT = "loss_curves.png"
GRADIENT_CONFLICTS = "gradient_conflicts.json"
GRADIENT_CONFLICTS_PLOT = "gradient_conflicts.png"
METRICS_FILES = ("metrics.json", "metrics.csv", "metrics.md")
PER_CLASS_FILES = ("metrics_per_class.csv", "metrics_per_class.md")
TEMPERATURE_RECORD = "temperature.json"  # evaluate.py --calibrate temperature: what was fitted
CALIBRATED = "calibrated"  # the Results folder of the temperature-scaled scores, inside evaluate.py's
COMPARE_FILES = ("compare.json", "compare.csv", "compare.md")
COMPARE_PAGES = ("compare.html", "compare.tex")  # the page to open, the table to paste
COMPARE_PER_CLASS = "compare_per_class.csv"  # compare --per-class
COMPARE_DIFF_PLOT = "compare_diff.png"
COMPARE_FOREST_PLOT = "compare_forest.png"
RECALIBRATION_RECORD = "recalibration.json"
PROBE_RECORD = "probe.json"
# a folder written by `evaluate.py export` (mmpt.model.export)
EXPORT_WEIGHTS = "model.safetensors"  # the backbone, as timm's save_for_hf writes it
EXPORT_TIMM_CONFIG = "config.json"
EXPORT_HEADS = "heads.safetensors"  # one head per dataset, keys `<flag>.<parameter>`
EXPORT_NORM = "norm.safetensors"  # per-dataset BatchNorm entries, keys `<flag>.<timm key>` (model.norm runs only)
EXPORT_RUN_CONFIG = "mmpt-config.yaml"  # the run's resolved recipe
DATA_RECORD = "data.json"  # beside the prediction files: what they were evaluated on
FEATURE_MANIFEST = "manifest.json"
SERIES_RECORD = "series.json"
SWEEP_FILES = ("sweep.json", "sweep.csv", "sweep.md", "sweep.png")
JOBS = "jobs"  # a launcher's folder in a series folder (or in a single run's, trained as a job)
JOBS_RECORD = "jobs.json"
JOB_LOG = "job.log"
# what a launcher keeps in a run folder; --overwrite leaves it in place, unreported
LAUNCHER_ENTRIES = (JOBS, JOB_LOG)

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
TB = "tb"
PREDICTIONS = "predictions"
FEATURES = "features"
EVAL = "eval"
EVAL_SPLITS = ("val", "test")  # evaluate.py --split
RECALIBRATED = "-recalibrated"  # suffix of the outputs of --recalibrate-norm
PROBE_PREFIX = "probe-"
# folders of a run's outputs, never runs of their own
SUBFOLDERS = (CHECKPOINTS, TB, PREDICTIONS, EVAL, FEATURES, FEATURES + RECALIBRATED)

# temp files of an interrupted atomic write (mmpt.io): .<name>.<random>.tmp
TEMP_FILE = re.compile(r"\..+\.tmp")
CHECKPOINT_FILE = re.compile(r"(last|best)\.pt|\.(last|best)\.pt\..+\.tmp")
EVENT_FILE = re.compile(r"events\.out\.tfevents\..+")
# cached backbone features of `evaluate.py probe`: {flag}_{resolution}_{split}.npy (see FeatureCache.file)
FEATURE_FILE = re.compile(r"[a-z]+mnist_\d+_(train|val|test)\.npy")
# medmnist Evaluator names: {flag}{_size}_{split}_[AUC]x_[ACC]y@{run}.csv (see prediction_filename)
PREDICTION_FILE = re.compile(
    r"(?P<flag>[a-z]+mnist)(?:_(?P<size>\d+))?_(?P<split>train|val|test)_\[AUC\].+_\[ACC\].+@.+\.csv"
)
CONFUSION_FILE = re.compile(r"confusion_[a-z]+mnist\.png")  # see Results.confusion
RELIABILITY_FILE = re.compile(r"reliability_[a-z]+mnist\.png")  # see Results.reliability
# what train.py and evaluate.py compare write at the top of a run folder
RUN_FILES = (
    CONFIG,
    ENV,
    SUMMARY,
    VAL_HISTORY,
    *METRICS_FILES,
    *PER_CLASS_FILES,
    VAL_AUC_PLOT,
    LOSS_CURVES_PLOT,
    GRADIENT_CONFLICTS,
    GRADIENT_CONFLICTS_PLOT,
    *COMPARE_FILES,
    *COMPARE_PAGES,
    COMPARE_PER_CLASS,
    COMPARE_DIFF_PLOT,
    COMPARE_FOREST_PLOT,
)
RUN_FILE_PATTERNS = (
    re.compile(r"(config|env)\.before-resume-at-step\d+\.(yaml|json)"),  # records kept by a resume (before_resume)
    re.compile(r"compare_[a-z_]+\.png"),  # compare_<metric>.png (Results.compare_plot)
    TEMP_FILE,
)


def prediction_filename(flag: str, resolution: int, split: str, metrics: dict[str, float], run: str) -> str:
    """medmnist Evaluator's standard name: `{flag}{_size}_{split}_[AUC]x_[ACC]y@{run}.csv`."""
    size_flag = "" if resolution == 28 else f"_{resolution}"
    return f"{flag}{size_flag}_{split}_[AUC]{metrics['auc']:.3f}_[ACC]{metrics['acc']:.3f}@{run}.csv"
