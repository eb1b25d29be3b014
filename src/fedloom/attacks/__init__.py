"""Attacks: evaluations of what an adversary recovers, kept apart from the privacy mechanisms."""
