"""smile-fast: a fast, faithful SMILE fine-tuning trainer and its fused ops."""

__version__ = "0.1.0"
