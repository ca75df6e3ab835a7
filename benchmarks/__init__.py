"""Benchmarks built on the real components, run as `python -m benchmarks data|train|compare|gpu`.

- `benchmarks.data`: the loader against the original mm-PT code's per-sample PIL pipeline, memory while iterating,
  data wait (its files and pipelines: `benchmarks.datafiles`);
- `benchmarks.train`: the engine's training step against a bare PyTorch loop (`benchmarks.loops`), images/s,
  memory and MFU;
- `benchmarks.compare`: `evaluate.py compare`'s vectorised bootstrap against the per-resample loop;
- `benchmarks.gpu`: the GPU check, each figure beside its pass criterion (sync audit, throughput and MFU,
  determinism, compile, fp16, memory, loader), with a CPU dry run that exercises every check;
- `benchmarks.common`: what they share (work folder, synthetic files, clocks, memory meters, the engine's step).
"""
