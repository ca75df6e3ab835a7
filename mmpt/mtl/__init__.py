"""How a step's per-dataset losses become one backward pass: static weights, TorchJD scalarizers, TorchJD aggregators.

Three families behind one Protocol (`base.Method`; each declared by a `mmpt.config.methods.MethodSpec`):
- static (`static.py`): a fixed multiplier per dataset (none, size, inverse_size, sqrt_size, manual);
- loss-based (`scalarizers.py`): a `torchjd.scalarization` Scalarizer turns the loss vector into one scalar
  (uw, rlw, dwa, famo, imtl_l, geometric_mean, stch); its learnable parameters are trained by an optimizer of
  the method's own;
- gradient-based (`aggregators.py`): `torchjd.autojac.mtl_backward` computes the Jacobian of the step's losses
  w.r.t. the shared backbone, and a `torchjd.aggregation` Aggregator turns it into one gradient.

To add a method, declare it in `mmpt.config.methods.METHODS` (what it is, its options, what it needs) and add its build
function to its family's dict (`STATIC_BUILDERS`, `SCALARIZER_BUILDERS` or `AGGREGATOR_BUILDERS`); mmpt.mtl.build
checks at import that the two agree. Nothing else names a method.

The declarations live in mmpt.config.methods, so the schema never imports this package;
`mmpt.mtl.build.build_method` builds a method from its declaration.
"""
