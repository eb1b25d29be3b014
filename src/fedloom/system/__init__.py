"""Simulated devices and networks: device profiles and the virtual clock of a round."""
