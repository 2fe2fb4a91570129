"""Training and evaluation engine: the LightningModule, atomic checkpoints, evaluation JSON, model loading.

``load_model(checkpoint_or_name)`` and ``load_for_evaluation(checkpoint)`` rebuild a trained network
(and its data) for evaluation or analysis; see :mod:`gather_excite.engine.loading`.
"""

from .callbacks import TrainSpeed
from .checkpoint import LAST_CHECKPOINT, AtomicCheckpointIO, atomic_torch_save, checkpoint_callbacks, read_checkpoint
from .evaluation import evaluate, evaluation_trainer, write_eval_json
from .loading import build_datamodule, load_for_evaluation, load_model, module_from_checkpoint
from .loggers import DiscardRedoneRows, ResumableCSVLogger
from .module import MODEL_KEYS, ClassificationModule, SGDModule, describe_model_mismatch

__all__ = [
    "LAST_CHECKPOINT",
    "MODEL_KEYS",
    "AtomicCheckpointIO",
    "ClassificationModule",
    "DiscardRedoneRows",
    "ResumableCSVLogger",
    "SGDModule",
    "TrainSpeed",
    "atomic_torch_save",
    "build_datamodule",
    "checkpoint_callbacks",
    "describe_model_mismatch",
    "evaluate",
    "evaluation_trainer",
    "load_for_evaluation",
    "load_model",
    "module_from_checkpoint",
    "read_checkpoint",
    "write_eval_json",
]
