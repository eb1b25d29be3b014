"""The client side of a round: models and the local training loop."""
