"""How batch_size, micro_batch_size, padding_free, group_by_length and packing become Trainer settings."""

import pytest

from tunelab.config import TrainSettings
from tunelab.methods.common import Batching, batching


@pytest.mark.parametrize(
    ("method", "settings", "expected"),
    [
        # SFT default: random step batches split into length-balanced padding-free passes of 2
        ("sft", {"batch_size": 8}, Batching(True, "batch_rebalance", 2, 4)),
        ("sft", {"batch_size": 8, "grad_accumulation": 3}, Batching(True, "batch_rebalance", 2, 12)),
        ("sft", {"batch_size": 2}, Batching(True, "batch_rebalance", 2, 1)),  # too small to split
        ("sft", {"batch_size": 6, "micro_batch_size": 3}, Batching(True, "batch_rebalance", 3, 2)),
        ("sft", {"batch_size": 8, "padding_free": "off"}, Batching(False, "batch_rebalance", 2, 4)),
        ("sft", {"batch_size": 8, "group_by_length": True}, Batching(True, "group_by_length", 8, 1)),
        ("sft", {"batch_size": 8, "packing": True}, Batching(False, "random", 8, 1)),
        # DPO: TRL has padding-free disabled and its pairs carry no input_ids length to balance on
        ("dpo", {"batch_size": 8}, Batching(False, "random", 8, 1)),
        ("dpo", {"batch_size": 8, "group_by_length": True}, Batching(False, "group_by_length", 8, 1)),
    ],
)
def test_batching(method: str, settings: dict, expected: Batching) -> None:
    assert batching(TrainSettings(**settings), method) == expected


def test_the_packed_rows_check_passes_over_weights_this_process_does_not_hold() -> None:
    """FSDP's rank-0 loading leaves the other ranks' weights on the meta device: no forward pass can run there, and
    the check gives Transformers' usual answer rather than crashing the launch."""
    from transformers import LlamaConfig

    from tests.chat_fixtures import trl_tokenizer
    from tunelab.methods.common import packed_rows_refusal
    from tunelab.models import meta_model

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    assert packed_rows_refusal(meta_model(config), trl_tokenizer("llama3_1")) is None
