"""Training: conversation data, the one loop (full, LoRA, P-Tuning v2), torch.distributed, checkpoints.

    from glmkit.train import TrainConfig, load_conversations, train
    examples, report = load_conversations("data.jsonl", tokenizer, max_length=2048, overlong="truncate")
    result = train(model, examples, None, TrainConfig(method="lora", max_steps=100, out_dir="out"), tokenizer)

Modules: data (JSONL conversations -> ids and labels), config (TrainConfig), batches (the data
position and padding), methods (what trains, what is written), loop (train), checkpoint (exact
resume), distributed (torchrun, DDP, FSDP), progress (the bar and train_log.jsonl).
"""

from .config import METHODS, TrainConfig, TrainConfigError
from .data import IGNORE_INDEX, DataError, DataReport, load_conversations
from .loop import TrainResult, train

__all__ = [
           "IGNORE_INDEX",
           "METHODS",
           "DataError",
           "DataReport",
           "TrainConfig",
           "TrainConfigError",
           "TrainResult",
           "load_conversations",
           "train",
]
