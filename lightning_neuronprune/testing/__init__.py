"""Reference models and datasets for examples, benchmarks and tests (not used by the library).

:mod:`~lightning_neuronprune.testing.models` holds the paper's networks (LeNet-300-100, LeNet-5,
CaffeNet) and :mod:`~lightning_neuronprune.testing.datasets` reads MNIST's IDX files from a local
directory.
"""
