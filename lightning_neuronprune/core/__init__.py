"""The numerical core: statistics as data, pivoted factorisations, neuron selection, the
least-squares refit (Eq. 6) and the one fit step that joins them.

Nothing here knows of junctions, modules or the Trainer: every function takes tensors (or a
:class:`~lightning_neuronprune.core.statistics.JunctionStatistics`) and returns tensors.
"""
