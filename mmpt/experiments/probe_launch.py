"""The probes of a series' runs as jobs (`evaluate.py probe RUN --launcher local|slurm`): one job per run, through
the launcher that trains a series' members (mmpt.experiments.launcher), so they run several at a time on this
machine or as a SLURM job array, and `evaluate.py status` shows them.

The results folder (default RUN/probe-<method>) holds the job record (jobs/jobs.json, kind "probe", with the
probe's request); each run's results go where a sequential probe writes them. A probe counts as finished when
its probe.json records the same request and the same weights (the run's best_digest, an export's digest), so a
rerun of the command submits only the probes that are missing, stale or failed, and a rerun with another request
(--k, --datasets, ...) probes again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmpt.config.launch import LaunchConfig
from mmpt.errors import MmptError
from mmpt.evaluation.probe import probe_leaves, probe_request
from mmpt.experiments.launch_plan import plan_launch
from mmpt.experiments.launcher import launch
from mmpt.experiments.member_job import ProbeJob
from mmpt.experiments.status import PROBE, probe_finished, read_jobs
from mmpt.runs.members import leaf_weights
from mmpt.runs.rundir import Results


@dataclass(frozen=True)
class ProbeMember:
    """The probe of one run (`leaf`) into `folder` (the launch's output folder + `path`)."""

    path: str
    leaf: Path
    folder: Path
    kwargs: dict  # probe_leaf's keyword arguments, the request among them
    weights: str | None  # the leaf's weights (leaf_weights) when the launch was planned

    def finished(self) -> bool:
        return self.weights is not None and probe_finished(Results(self.folder), self.kwargs["request"], self.weights)

    def job(self, label: str, threads: int | None, fresh: bool = False, command: str = "") -> ProbeJob:
        return ProbeJob(str(self.leaf.absolute()), str(self.folder.absolute()), self.kwargs, label, threads, fresh)


def launch_probes(
    source: Path,
    settings: LaunchConfig,
    *,
    method: str,
    output: Path | None = None,
    require_complete: bool = False,
    **kwargs,
) -> int:
    """Probe every finished run at or under `source` as one job each (mmpt.experiments.launcher.launch); return
    the launcher's exit code. `kwargs`: probe's (k, datasets, data_root, cache_dir, device, batch_size,
    recalibrate_images). Raises MmptError before submitting anything for what a sequential probe refuses, and
    for an output folder that holds a training series' jobs."""
    source = Path(source)
    if (settings.gpus_per_job or 0) > 1 or settings.nodes > 1:
        raise MmptError(
            "a probe extracts features on one device: drop --gpus-per-job above 1 and --nodes above 1 "
            "(each run's probe is one job; --jobs sets how many run at once)"
        )
    recalibrated = kwargs.get("recalibrate_images") is not None
    output, leaves = probe_leaves(source, method, output, recalibrated, require_complete)
    plan = plan_launch(settings, len(leaves))  # a probe writes no checkpoint: any time limit will do
    record = read_jobs(output)
    if record["members"] and record.get("kind") != PROBE:
        raise MmptError(f"{output} holds the jobs of a training series; pass another --output for the probes")
    request = probe_request(method, kwargs)
    # a job may start in another folder (a SLURM node): its paths are absolute
    for key in ("data_root", "cache_dir"):
        if kwargs.get(key):
            kwargs[key] = str(Path(kwargs[key]).absolute())
    members = []
    for leaf in leaves:
        path = leaf.relative_to(source).as_posix()
        path = "" if path == "." else path
        args = {"method": method, "request": request, **kwargs}
        members.append(ProbeMember(path, leaf, output / path, args, leaf_weights(leaf)))
    print(f"{method} probes of {len(members)} run{'s' if len(members) > 1 else ''} under {source} into {output}")
    code = launch(
        members,
        False,
        root=output,
        plan=plan,
        series=False,
        name=f"probe-{method}",
        record={"kind": PROBE, "request": request, "order": [m.path for m in members]},
    )
    if plan.launcher == "local" and code == 0:
        print(f"{method} probes written under {output} (compare them with: python evaluate.py compare ...)")
    return code
