"""Training layer: per-rank PEFT LoRA models, factor conversion, datasets, local train/eval.

Sits between the math layer (pure factors) and the federation layer (Flower); never imports
Flower. Functions take explicit arguments; nothing here reads config files.
"""

from raflora.training.data import (
    ChoiceExample,
    ImageExample,
    TaskData,
    TextExample,
    encode_examples,
    load_task_data,
    shipped_names,
    take,
)
from raflora.training.export import save_peft_adapter
from raflora.training.factors import (
    get_dense_trainables,
    get_factors,
    in_features,
    live_factors,
    lora_scaling,
    lora_shapes,
    set_dense_trainables,
    set_factors,
    set_lora_A_trainable,
    shared_lora_A,
)
from raflora.training.local import configure_threads, evaluate, torch_threads, train_local
from raflora.training.models import (
    ALIASES,
    build_lora_model,
    default_target_modules,
    load_base_model,
    resolve_model,
)
from raflora.training.partition import partition_dirichlet, partition_iid, partition_table
from raflora.training.ranks import (
    lora_params_per_rank,
    ranks_from_list,
    ranks_from_memory,
    ranks_from_tiers,
)

__all__ = [
    "ALIASES",
    "ChoiceExample",
    "ImageExample",
    "TaskData",
    "TextExample",
    "build_lora_model",
    "configure_threads",
    "default_target_modules",
    "encode_examples",
    "evaluate",
    "get_dense_trainables",
    "get_factors",
    "in_features",
    "live_factors",
    "load_base_model",
    "load_task_data",
    "lora_params_per_rank",
    "lora_scaling",
    "lora_shapes",
    "partition_dirichlet",
    "partition_iid",
    "partition_table",
    "ranks_from_list",
    "ranks_from_memory",
    "ranks_from_tiers",
    "resolve_model",
    "save_peft_adapter",
    "set_dense_trainables",
    "set_factors",
    "set_lora_A_trainable",
    "shared_lora_A",
    "shipped_names",
    "take",
    "torch_threads",
    "train_local",
]
