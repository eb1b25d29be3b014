"""The server side of a round: sampling, aggregation, the server optimizer, the round loop."""
