"""DAST: Discriminator Attention and Self-Training for domain-adaptive semantic segmentation."""

__version__ = "0.1.0"
