"""Benchmark data: loaders that turn BEIR folders, BRIGHT and R2MED into one ``RetrievalTask`` shape."""

from reasonembed.data.beir import load_beir_folder
from reasonembed.data.bright import BRIGHT_INSTRUCTIONS, BRIGHT_TASKS, load_bright
from reasonembed.data.catalog import default_data_dir, expand_specs, load_task
from reasonembed.data.r2med import R2MED_INSTRUCTIONS, R2MED_TASKS, load_r2med
from reasonembed.data.types import Corpus, DataError, DataWarning, Queries, RetrievalTask, validate_task

__all__ = [
    "BRIGHT_INSTRUCTIONS",
    "BRIGHT_TASKS",
    "Corpus",
    "DataError",
    "DataWarning",
    "Queries",
    "R2MED_INSTRUCTIONS",
    "R2MED_TASKS",
    "RetrievalTask",
    "default_data_dir",
    "expand_specs",
    "load_beir_folder",
    "load_bright",
    "load_r2med",
    "load_task",
    "validate_task",
]
