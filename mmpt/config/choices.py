"""The names of the alternatives that components implement and the settings offer as choices.

The schema (mmpt.config) takes each setting's choices from here, so it needs no component to know them; each
component keys its own registry by the same names (`precision.PRECISION_TYPES`, `losses.ORDINAL_LOSSES`,
`optim.SCHEDULES`, ...) and asserts at import that it implements exactly these. The weighting methods are
declared the same way, in mmpt.config.methods. Plain tuples and no imports: the schema and `--help` stay light.
"""

from __future__ import annotations

import re

# model.norm: BatchNorm statistics shared, per dataset, or per dataset with affine weights; auto decides
NORMS = ("auto", "shared", "per_dataset_stats", "per_dataset")
# loss.ordinal: the loss of the ordinal-regression task (mmpt.model.losses)
ORDINAL_LOSSES = ("ce", "coral", "corn")
# optim.schedule: the learning-rate schedules (mmpt.training.optim)
SCHEDULES = ("cosine", "constant")
# train.precision: autocast precisions (mmpt.runtime.precision); auto picks one for the device
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# input.mode, input.pad_value, input.interpolation (mmpt.data.transforms)
INPUT_MODES = ("pad", "resize", "native")
PAD_VALUES = ("normalized_zero", "black")
INTERPOLATIONS = ("bilinear", "bicubic")
# sampler.last_batch: the policy for a split's last partial batch (mmpt.data.sampler)
LAST_BATCH = ("keep", "drop")
# loss.jacobian: how a gradient-based method gets the Jacobian of a step's losses (mmpt.training.build.jacobian_path):
# each dataset's own forward pass with views of the shared weights and one backward pass, or TorchJD's mtl_backward
# (one backward pass per dataset of the step); auto takes one_pass where it computes the same Jacobian
JACOBIAN_PATHS = ("auto", "one_pass", "autojac")
# train.monitor: what early stopping and best.pt follow (mmpt.training.monitor)
MONITORS = ("val_loss", "val_auc", "val_delta_m", "val_auc_gain")
# evaluate.py --calibrate: post-hoc calibration of the scores (mmpt.evaluation.temperature)
CALIBRATIONS = ("temperature",)
# launch.launcher: where a series' members train (sequential: mmpt.experiments.series; local, slurm:
# mmpt.experiments.launcher)
LAUNCHERS = ("sequential", "local", "slurm")

# The device names train.device, evaluate.py --device and the benchmarks accept (mmpt.runtime.distributed selects them).
DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_problem(name: object) -> str | None:
    """What is wrong with `name` as a device name (`must be ..., got ...`), or None when it is one."""
    if isinstance(name, str) and DEVICE_PATTERN.fullmatch(name):
        return None
    return f"must be {DEVICE_NAMES}, got {name!r}"
