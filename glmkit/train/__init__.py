"""Training: conversation data, the one loop (full, LoRA, P-Tuning v2), torch.distributed, checkpoints,
and pretraining new models on packed token shards.

    from glmkit.train import TrainConfig, load_conversations, train
    examples, report = load_conversations("data.jsonl", tokenizer, max_length=2048, overlong="truncate")
    result = train(model, examples, None, TrainConfig(method="lora", max_steps=100, out_dir="out"), tokenizer)

    from glmkit.train import PackedTokens, PretrainWindows, pack_corpus
    pack_corpus(["corpus.jsonl"], tokenizer, "shards")
    windows = PretrainWindows(PackedTokens("shards", tokenizer), seq_length=512)
    result = train(model, windows, None, TrainConfig(method="full", lr=1e-3, max_steps=1000, out_dir="out"), tokenizer)

Modules: data (JSONL conversations -> ids and labels), config (TrainConfig), batches (the data
position and padding), methods (what trains, what is written), loop (train), checkpoint (exact
resume), distributed (torchrun, DDP, FSDP), progress (the bar and train_log.jsonl); for pretraining,
corpus (raw-text files -> documents), pretrain_data (packed token shards and their windows) and
scratch (new models sized for a tokenizer).
"""

from .config import METHODS, TrainConfig, TrainConfigError
from .corpus import CorpusError
from .data import IGNORE_INDEX, DataError, DataReport, load_conversations
from .loop import TrainResult, train
from .pretrain_data import (
    PackedDataError,
    PackedTokens,
    PretrainWindows,
    is_packed_folder,
    pack_corpus,
    tokenizer_checksum,
)
from .scratch import new_model, scratch_config

__all__ = [
           "IGNORE_INDEX",
           "METHODS",
           "CorpusError",
           "DataError",
           "DataReport",
           "PackedDataError",
           "PackedTokens",
           "PretrainWindows",
           "TrainConfig",
           "TrainConfigError",
           "TrainResult",
           "is_packed_folder",
           "load_conversations",
           "new_model",
           "pack_corpus",
           "scratch_config",
           "tokenizer_checksum",
           "train",
]
