"""Data: read records, turn them into token ids with a loss mask, batch them."""

from sft_scale.data.collate import collate
from sft_scale.data.records import DataError, read_records
from sft_scale.data.sampler import GlobalBatchSampler
from sft_scale.data.tokenize import encode_prompt_answer, tokenize_dataset

__all__ = ["DataError", "read_records", "encode_prompt_answer", "tokenize_dataset", "collate",
           "GlobalBatchSampler"]
