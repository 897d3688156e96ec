"""The bottom layer: settings, the dataset spec, event names, errors and small shared helpers.

Everything in Flywheel may import from here; nothing here imports any other part of Flywheel.
"""
