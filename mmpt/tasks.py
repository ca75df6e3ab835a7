"""The 12 MedMNIST+ 2D datasets as `TaskSpec`s, built from `medmnist.INFO` (never copied by hand)."""

from __future__ import annotations

from dataclasses import dataclass

from medmnist import INFO

from mmpt.errors import MmptError, unknown_name

MULTI_CLASS = "multi-class"
BINARY = "binary-class"
MULTI_LABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"

RESOLUTIONS = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")

# The MedMNIST+ 2D collection, in medmnist's order.
FLAGS = (
    "pathmnist",
    "chestmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
)


@dataclass(frozen=True)
class TaskSpec:
    """Facts about one MedMNIST+ dataset ("task"), as medmnist.INFO states them."""

    flag: str  # medmnist's name, e.g. "pathmnist"; also the head's key
    task_type: str  # one of MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL
    num_classes: int  # classes, or labels for multi-label
    channels: int  # 1 (grey) or 3 (RGB)
    split_sizes: tuple[tuple[str, int], ...]  # official (split, count) pairs
    class_names: tuple[str, ...]

    @property
    def short(self) -> str:
        return self.flag.removesuffix("mnist")

    @property
    def label_width(self) -> int:
        """Columns of the label array: num_classes for multi-label, else 1."""
        return self.num_classes if self.task_type == MULTI_LABEL else 1

    def split_size(self, split: str) -> int:
        return dict(self.split_sizes)[split]

    def filename(self, resolution: int) -> str:
        """medmnist's file name: `{flag}.npz` at 28 px, `{flag}_{size}.npz` otherwise."""
        return f"{self.flag}.npz" if resolution == 28 else f"{self.flag}_{resolution}.npz"

    def md5(self, resolution: int) -> str:
        return INFO[self.flag]["MD5" if resolution == 28 else f"MD5_{resolution}"]

    def url(self, resolution: int) -> str:
        return INFO[self.flag]["url" if resolution == 28 else f"url_{resolution}"]


def _spec(flag: str) -> TaskSpec:
    info = INFO[flag]
    return TaskSpec(
        flag=flag,
        task_type=info["task"],
        num_classes=len(info["label"]),
        channels=info["n_channels"],
        split_sizes=tuple((s, int(info["n_samples"][s])) for s in SPLITS),
        class_names=tuple(info["label"][str(i)] for i in range(len(info["label"]))),
    )


TASKS: dict[str, TaskSpec] = {flag: _spec(flag) for flag in FLAGS}


def resolve_tasks(names: str | list[str] | tuple[str, ...]) -> list[TaskSpec]:
    """Return the TaskSpecs for names like "all", "path,chest" or ["pathmnist"], in medmnist order.

    Raises MmptError for an unknown name, listing the valid ones.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    flags: set[str] = set()
    for name in names:
        name = name.strip().lower()
        if name == "all":
            flags.update(FLAGS)
            continue
        flag = name if name.endswith("mnist") else f"{name}mnist"
        if flag not in TASKS:
            raise unknown_name("dataset", name, [t.short for t in TASKS.values()] + ["all"])
        flags.add(flag)
    if not flags:
        raise MmptError("no dataset selected; pass --datasets all or a list such as path,chest")
    return [TASKS[f] for f in FLAGS if f in flags]
