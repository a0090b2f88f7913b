"""Datasets, label tables, transforms, the synthetic demo domains and FDA."""
