"""The process a run lives in: ranks and collectives under torchrun (`distributed`), autocast and the fp16 gradient
scaler (`precision`), determinism, the environment record and stop signals (`process`)."""
