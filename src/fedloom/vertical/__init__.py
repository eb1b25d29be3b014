"""Vertical federated learning: parties hold different columns of the same records."""
