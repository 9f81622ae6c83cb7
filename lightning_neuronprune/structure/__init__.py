"""The network's structure: where producers feed consumers (junctions), found by tracing or by a
behavioural probe; module surgery that swaps in the reduced layers; and the persistence of the
reduction plan in checkpoints.
"""
