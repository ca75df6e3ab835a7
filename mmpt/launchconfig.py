"""Where the release before the packages (commit c8b3d76) defined LaunchConfig.

A SLURM job that release queued names `mmpt.launchconfig.LaunchConfig` in its pickle (the `launch:` section of the
member's config); submitit unpickles it again when it requeues the job after a time limit or preemption, so a job
requeued after an upgrade finds the class here and resumes (mmpt.experiments.member_job reads its config as a record
of an earlier release). Jobs queued by this release pickle plain values only; remove this module once no job of that
release can be queued.
"""

from mmpt.config.launch import LaunchConfig

__all__ = ["LaunchConfig"]
