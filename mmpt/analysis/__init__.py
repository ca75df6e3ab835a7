"""Comparing runs on the same test images: the paired bootstrap and DeLong's intervals (`stats`), Δm with its
interval (`delta_m`), `compare` and its tables and pictures (`report`)."""
