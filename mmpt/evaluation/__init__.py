"""How a model is judged: medmnist's metrics exactly (`metrics`), predictions in medmnist's format (`predict`),
tables (`tables`), pictures (`plots`), evaluating a run's checkpoint (`evaluate`) and frozen-backbone probes
(`probe`)."""
