"""Prediction over folders, visualisation and export of the target model."""
