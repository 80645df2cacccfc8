"""Batch generation: run a model over files of prompts, batched, templated, resumable.

>>> from chatforge import GenerationConfig, generate_batch          # doctest: +SKIP
>>> generate_batch("smollm2", "prompts.jsonl", "answers.jsonl",      # doctest: +SKIP
...                template="Order: {foods}. Comment: {comment}.",
...                config=GenerationConfig(temperature=0, max_new_tokens=64))
"""

from chatforge.batch.compare import CompareSummary, compare_grid
from chatforge.batch.jobs import BatchStopped, BatchSummary
from chatforge.batch.local import generate_batch
from chatforge.batch.output import CSV_COLUMNS, OUTPUT_SUFFIXES, RowWriter
from chatforge.batch.records import INPUT_SUFFIXES, Record, read_records, records_from
from chatforge.batch.remote import generate_batch_remote
from chatforge.batch.template import PromptTemplate, TemplateError

__all__ = [
    "CSV_COLUMNS",
    "INPUT_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "BatchStopped",
    "BatchSummary",
    "CompareSummary",
    "PromptTemplate",
    "Record",
    "RowWriter",
    "TemplateError",
    "compare_grid",
    "generate_batch",
    "generate_batch_remote",
    "read_records",
    "records_from",
]
