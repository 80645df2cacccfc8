"""Training: data readers, examples with loss masks and packing, the loop, checkpoints, eval.

Five lines of Python::

    from chatforge.training import TrainConfig, train
    result = train(TrainConfig(data=["chats.jsonl"], model="smollm2", lora=True, merge=True,
                               max_steps=200, valid_split=0.05, output="my-smollm2"))
    print(result.best_val_loss, result.tokens_per_s)
"""

from chatforge.training.config import TrainConfig
from chatforge.training.data import Dataset, load_data
from chatforge.training.evaluate import EvalResult, evaluate
from chatforge.training.tokenizer import train_tokenizer
from chatforge.training.trainer import TrainingInterrupted, TrainResult, train

__all__ = [
    "Dataset",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "evaluate",
    "load_data",
    "train",
    "train_tokenizer",
]
