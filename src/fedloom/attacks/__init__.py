"""Attacks: what an adversary recovers from updates (leakage) and what malicious clients
send (poisoning, backdoors), kept apart from the defenses."""
