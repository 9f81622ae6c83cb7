"""Remove redundant neurons of trained networks without retraining, from inside PyTorch Lightning.

The functional core follows Zhang, Davoodi & Hu, *Exploring Energy and Accuracy Tradeoff in
Structure Simplification of Trained Deep Neural Networks* (IEEE JETCAS 2018). Its sub-packages
are the stages data flows through, each importing only from those before it:

* :mod:`~lightning_neuronprune.core`: statistics, pivoted factorisations, selection, the
  least-squares refit (Eq. 6) and the fit step;
* :mod:`~lightning_neuronprune.structure`: junctions (found by tracing or probing), module
  surgery and the persistence of reduction plans;
* :mod:`~lightning_neuronprune.cost`: counting rules and the 45 nm energy model;
* :mod:`~lightning_neuronprune.search`: sweeps, joint strategies, the decision, its held-out
  confirmation and the Trainer-free pipeline, with their settings;
* :mod:`~lightning_neuronprune.lightning`: :class:`NeuronEliminationCallback` and its Trainer
  glue, progress bars and reports.

:mod:`~lightning_neuronprune.testing` holds the reference models and the MNIST reader used by the
examples, benchmarks and tests.
"""

from lightning_neuronprune.core.batches import batch_input
from lightning_neuronprune.core.conv import ChannelFitter
from lightning_neuronprune.core.fitting import FitOptions
from lightning_neuronprune.core.linalg import pivoted_cholesky, pivoted_qr
from lightning_neuronprune.core.reconstruction import least_squares_transform, reconstruct_consumer
from lightning_neuronprune.core.recording import collect_statistics
from lightning_neuronprune.core.selection import nested_order, select_neurons
from lightning_neuronprune.core.statistics import JunctionStatistics
from lightning_neuronprune.cost.energy import EnergyModel, EnergyReport
from lightning_neuronprune.errors import (
    CheckpointMismatchError,
    JunctionError,
    NeuronEliminationError,
    NumericalWarning,
    StatisticsError,
    UnsupportedLayerError,
)
from lightning_neuronprune.lightning.callback import NeuronEliminationCallback
from lightning_neuronprune.search.elimination import (
    Elimination,
    EliminationRecord,
    eliminate_neurons,
    reduce_junction,
)
from lightning_neuronprune.search.metrics import CausalLMPerplexity
from lightning_neuronprune.search.pipeline import ModelIO, ReductionSearch, SearchResult
from lightning_neuronprune.search.settings import (
    ConfirmSettings,
    DataOptions,
    JointSettings,
    SearchSettings,
)
from lightning_neuronprune.search.streaming import reduce_streamed
from lightning_neuronprune.structure.discovery import auto_conv_junctions, find_junction
from lightning_neuronprune.structure.junction import Junction
from lightning_neuronprune.structure.modules import GatheredLinear
from lightning_neuronprune.structure.persistence import (
    ReducedCheckpointMixin,
    install_plan_hook,
    load_reduced,
    match_plan,
    read_plan,
    rebind_optimizer,
    rebuild_shapes,
    save_reduced,
)

__all__ = [
    "CausalLMPerplexity",
    "ChannelFitter",
    "CheckpointMismatchError",
    "ConfirmSettings",
    "DataOptions",
    "Elimination",
    "EliminationRecord",
    "EnergyModel",
    "EnergyReport",
    "FitOptions",
    "GatheredLinear",
    "JointSettings",
    "Junction",
    "JunctionError",
    "JunctionStatistics",
    "ModelIO",
    "NeuronEliminationCallback",
    "NeuronEliminationError",
    "NumericalWarning",
    "ReducedCheckpointMixin",
    "ReductionSearch",
    "SearchResult",
    "SearchSettings",
    "StatisticsError",
    "UnsupportedLayerError",
    "auto_conv_junctions",
    "batch_input",
    "collect_statistics",
    "eliminate_neurons",
    "find_junction",
    "install_plan_hook",
    "least_squares_transform",
    "load_reduced",
    "match_plan",
    "nested_order",
    "pivoted_cholesky",
    "pivoted_qr",
    "read_plan",
    "rebind_optimizer",
    "rebuild_shapes",
    "reconstruct_consumer",
    "reduce_junction",
    "reduce_streamed",
    "save_reduced",
    "select_neurons",
]
