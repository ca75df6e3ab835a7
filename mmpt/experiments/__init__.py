"""Studies: series of runs (individual baselines, sweeps, seeds) and their summary, the launcher that runs a
series' members in process, as local jobs or as SLURM arrays (submitit), the member job, status, probes as jobs."""
