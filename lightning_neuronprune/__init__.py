"""Remove redundant neurons of trained networks without retraining, from inside PyTorch Lightning.

The functional core follows Zhang, Davoodi & Hu, *Exploring Energy and Accuracy Tradeoff in
Structure Simplification of Trained Deep Neural Networks* (IEEE JETCAS 2018):
statistics (:mod:`.statistics`) → selection (:mod:`.selection`, :mod:`.linalg`) →
reconstruction (:mod:`.reconstruction`) → surgery (:mod:`.junctions`, :mod:`.surgery`) →
energy (:mod:`.energy`); :mod:`.pipeline` runs the sweeps, the joint search, the decision and its
confirmation without a Trainer, and :class:`NeuronEliminationCallback` is the Lightning shell
around it.
"""

from lightning_neuronprune.core.conv import ChannelFitter
from lightning_neuronprune.core.linalg import pivoted_cholesky, pivoted_qr
from lightning_neuronprune.core.reconstruction import least_squares_transform, reconstruct_consumer
from lightning_neuronprune.core.selection import nested_order, select_neurons
from lightning_neuronprune.core.statistics import (
    JunctionStatistics,
    batch_input,
    collect_statistics,
)
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
from lightning_neuronprune.search.pipeline import (
    ConfirmSettings,
    ModelIO,
    ReductionSearch,
    SearchResult,
    SearchSettings,
)
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
    "ChannelFitter",
    "CheckpointMismatchError",
    "ConfirmSettings",
    "Elimination",
    "EliminationRecord",
    "EnergyModel",
    "EnergyReport",
    "GatheredLinear",
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
    "save_reduced",
    "select_neurons",
]
