"""Data: sources -> formats -> tokens with loss masks -> batches."""

from sft_scale.data.collate import collate, collate_packed
from sft_scale.data.pipeline import DataStats, build_datasets, load_examples
from sft_scale.data.sampler import GlobalBatchSampler
from sft_scale.data.sources import DataError
from sft_scale.data.tokenize import IGNORE_INDEX, encode_example

__all__ = ["DataError", "DataStats", "build_datasets", "load_examples", "encode_example",
           "collate", "collate_packed", "GlobalBatchSampler", "IGNORE_INDEX"]
