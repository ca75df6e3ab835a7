"""mmpt: multi-domain multi-task pre-training (mm-PT) on MedMNIST+."""

from mmpt.errors import MmptError

__version__ = "0.1.0"
__all__ = ["MmptError", "__version__"]
