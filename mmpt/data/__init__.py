"""Data: verified memory-mapped MedMNIST+ arrays, synthetic files, the mm-PT sampler, loaders, transforms."""
