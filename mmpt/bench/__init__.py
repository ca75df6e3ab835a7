"""Benchmarks built on the real components, run as `python -m mmpt.bench data|train|compare|gpu`.

- `mmpt.bench.data`: the loader against the original mm-PT code's per-sample PIL pipeline, memory while iterating,
  data wait (its files and pipelines: `mmpt.bench.datafiles`);
- `mmpt.bench.train`: the engine's training step against a bare PyTorch loop (`mmpt.bench.loops`), images/s,
  memory and MFU;
- `mmpt.bench.compare`: `evaluate.py compare`'s vectorised bootstrap against the per-resample loop;
- `mmpt.bench.gpu`: the GPU check, each figure beside its pass criterion (sync audit, throughput and MFU,
  determinism, compile, fp16, memory, loader), with a CPU dry run that exercises every check;
- `mmpt.bench.common`: what they share (work folder, synthetic files, clocks, memory meters, the engine's step).
"""
