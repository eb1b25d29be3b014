"""Federated algorithms as client and server halves, registered by name."""

from fedloom.algorithms import dpsgd as dpsgd
from fedloom.algorithms import fednova as fednova
from fedloom.algorithms import personal as personal
from fedloom.algorithms import scaffold as scaffold
from fedloom.algorithms import sgd as sgd
