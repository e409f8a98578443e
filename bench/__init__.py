"""aft-bench: adversarial fine-tuning and adversarial training, benchmarked side by side."""

__version__ = "0.1.0"
