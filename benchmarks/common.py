"""What the benchmarks share: a work folder, synthetic files, clocks, memory meters, output. The engine they time
is built by the training setup itself (`benchmarks.loops.engine`)."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import statistics
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mmpt.data.synthetic import write_synthetic
from mmpt.io import check_output_folder, write_json
from mmpt.tasks import TaskSpec

MEMORY_INTERVAL_S = 0.02


# ---------------------------------------------------------------------------------------------
# work folder and synthetic data


@contextlib.contextmanager
def work_folder(workdir: str | Path | None, prefix: str) -> Iterator[Path]:
    """Yield `workdir` (created, kept afterwards), or a fresh temporary folder that is deleted afterwards."""
    if workdir is not None:
        work = Path(workdir)
        check_output_folder(work, "--workdir")
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_synthetic_files(root: Path, resolution: int, tasks: Sequence[TaskSpec], train_samples: int) -> None:
    """Write medmnist-format synthetic files of `tasks` at `resolution` into `root` (seed 0, atomic writes)."""
    write_synthetic(root, resolution, list(tasks), train_samples=train_samples, seed=0)


# ---------------------------------------------------------------------------------------------
# clocks


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it counts that work (CUDA only; the
    benchmark's own sync: the training step never waits on the device)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------------
# memory


def peak_rss_bytes() -> int:
    """The largest resident set this process has had (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_fields(path: str, names: tuple[str, ...]) -> int:
    """Sum the named `Name:  N kB` lines of a /proc file, in bytes. Raises OSError when the process is gone."""
    total = 0
    with open(path) as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in names:
                total += int(value.split()[0]) * 1024
    return total


def rss_anon_shmem(pid: int) -> int:
    """RssAnon + RssShmem of `pid` from /proc/<pid>/status, in bytes (pages shared after fork count in full)."""
    return _proc_fields(f"/proc/{pid}/status", ("RssAnon", "RssShmem"))


def pss_anon_shmem(pid: int) -> int:
    """Pss_Anon + Pss_Shmem of `pid` from /proc/<pid>/smaps_rollup, in bytes.

    The proportional share: a page that fork left shared by k processes counts 1/k in each, so a
    sum over a process tree counts every physical page once. Mapped file pages (page cache) are
    not included, exactly as in RssAnon + RssShmem.
    """
    return _proc_fields(f"/proc/{pid}/smaps_rollup", ("Pss_Anon", "Pss_Shmem"))


def descendants(pid: int) -> list[int]:
    """Return the pids of every process below `pid` (DataLoader workers), read from /proc/*/stat."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields after the last ')' are fixed
        parent_of[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


class MemorySampler:
    """Background thread that samples the unreclaimable memory of a process tree every `interval_s`.

    `peak_bytes` is the largest sum of Pss_Anon + Pss_Shmem over the process and its descendants;
    `peak_rss_bytes` the largest sum of RssAnon + RssShmem, which counts a fork-shared page in every
    process that maps it.
    """

    def __init__(self, pid: int, interval_s: float = MEMORY_INTERVAL_S) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_rss_bytes = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def sample(self) -> None:
        pss = rss = processes = 0
        for pid in [self.pid, *descendants(self.pid)]:
            try:
                pss += pss_anon_shmem(pid)
                rss += rss_anon_shmem(pid)
                processes += 1
            except (OSError, ValueError, IndexError):
                continue  # a worker that exited between listing and reading
        self.peak_bytes = max(self.peak_bytes, pss)
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        self.peak_processes = max(self.peak_processes, processes)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ---------------------------------------------------------------------------------------------
# output


def machine(device: torch.device | None = None) -> dict:
    """The machine the figures came from: CPUs, load, versions, and the device's name."""
    info = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if device is not None:
        info["device"] = str(device)
        info["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return info


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    return platform.processor()


def write_result(path: str | Path, result: dict) -> None:
    """Write the figures as strict JSON (non-finite floats as null), atomically."""
    write_json(Path(path), result)
