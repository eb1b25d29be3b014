"""fedloom: federated learning that runs the same experiment in simulation and for real."""

__version__ = "0.1.0"
