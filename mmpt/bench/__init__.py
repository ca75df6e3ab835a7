"""Benchmarks built on the real components, run as `python -m mmpt.bench data|train`.

- `mmpt.bench.data`: the loader against the earlier per-sample PIL pipeline, memory while iterating, data wait;
- `mmpt.bench.train`: the engine's training step against a bare PyTorch loop, images/s, memory and MFU;
- `mmpt.bench.common`: what both share (work folder, synthetic files, clocks, memory meters, the engine's step).
"""
