"""Decentralized (serverless) federation: peers train and average with their neighbours."""
