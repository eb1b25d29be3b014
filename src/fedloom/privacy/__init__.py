"""Privacy: differential privacy (clipping, noise, accounting) and secure aggregation."""
