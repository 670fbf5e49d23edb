"""Datasets: shipped offline tasks, a general file loader, and encoding into torch batches."""

from raflora.training.data.encode import (
    ChoiceDataset,
    ImageDataset,
    TextClassificationDataset,
    encode_examples,
)
from raflora.training.data.load import load_task_data
from raflora.training.data.shipped import shipped_names
from raflora.training.data.types import (
    KINDS,
    ChoiceExample,
    Example,
    ImageExample,
    TaskData,
    TextExample,
    stratified_split,
    subsample,
    take,
)

__all__ = [
    "KINDS",
    "ChoiceDataset",
    "ChoiceExample",
    "Example",
    "ImageDataset",
    "ImageExample",
    "TaskData",
    "TextClassificationDataset",
    "TextExample",
    "encode_examples",
    "load_task_data",
    "shipped_names",
    "stratified_split",
    "subsample",
    "take",
]
