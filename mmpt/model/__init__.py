"""The model: a timm backbone (`backbones`) with one head per dataset (`net.MultiTaskNet`), a loss per task type
(`losses`), per-dataset BatchNorm (`norm`) with its precise statistics (`calibration`) and its transfer between runs
(`transfer`), saved weights of any kind read back (`weights`), the timm export (`export`), and `build`: the model of a
config, where model.norm's auto is decided once."""
