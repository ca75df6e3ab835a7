"""Training: what a run trains with (`setup`, from `build`), the loop (`loop.run`), the step (`step.TrainStep`), the
training state and resume (`state`), what a run prints and logs (`log`), optimizers and LR schedules (`optim`), and
the gradient-conflict diagnostic (`conflicts`)."""
