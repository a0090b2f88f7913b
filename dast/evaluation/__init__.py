"""Confusion matrices, IoU tables and the evaluation protocol of the paper."""
