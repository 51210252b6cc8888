"""Test-wide settings: offline hub, a bounded thread count."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite runs as two xdist workers on two cores: one thread each avoids oversubscription.
torch.set_num_threads(1)
