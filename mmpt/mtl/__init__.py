"""How a step's per-dataset losses become one backward pass: static weights, TorchJD scalarizers, TorchJD aggregators.

Three families behind one Protocol (`base.Method`; each declared by a `methods.MethodSpec`):
- static (`static.py`): a fixed multiplier per dataset (none, size, inverse_size, sqrt_size, manual);
- loss-based (`scalarizers.py`): a `torchjd.scalarization` Scalarizer turns the loss vector into one scalar
  (uw, rlw, dwa, famo, imtl_l, geometric_mean, stch); its learnable parameters are trained by an optimizer of
  the method's own;
- gradient-based (`aggregators.py`): `torchjd.autojac.mtl_backward` computes the Jacobian of the step's losses
  w.r.t. the shared backbone, and a `torchjd.aggregation` Aggregator turns it into one gradient.

To add a method, declare it in `methods.METHODS` (what it is, its options, what it needs) and add its build
function to its family's dict (`STATIC_BUILDERS`, `SCALARIZER_BUILDERS` or `AGGREGATOR_BUILDERS`); mmpt.mtl.build
checks at import that the two agree. Nothing else names a method.

Importing this package is light (the declarations: no torch, no TorchJD), so the schema and the sampler can;
`mmpt.mtl.build.build_method` loads the implementations.
"""

from __future__ import annotations

from mmpt.mtl.methods import (
    ALL,
    ANY,
    CORE_SOLVERS,
    GRADIENT,
    LOSS,
    METHODS,
    SEVERAL,
    SOLVERS_EXTRA,
    STATIC,
    MethodSpec,
    environment_problems,
    method_problems,
    missing_solvers,
)

__all__ = [
    "ALL",
    "ANY",
    "CORE_SOLVERS",
    "GRADIENT",
    "LOSS",
    "METHODS",
    "SEVERAL",
    "SOLVERS_EXTRA",
    "STATIC",
    "MethodSpec",
    "environment_problems",
    "method_problems",
    "missing_solvers",
]
