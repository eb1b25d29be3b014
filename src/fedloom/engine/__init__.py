"""Where clients run: in this process, in a pool of worker processes (more to come)."""
