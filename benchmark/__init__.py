"""Retrieval benchmark for selproj-plugin: which gradient reduction finds training data best."""
