"""fedft: federated fine-tuning of large pretrained models."""

__version__ = "0.1.0"
