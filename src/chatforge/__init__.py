"""chatforge: train, fine-tune, chat with, batch-run and serve conversational LMs.

Five lines of Python::

    from chatforge import ChatSession, GenerationConfig, load_model
    model = load_model("smollm2")
    chat = ChatSession(model, GenerationConfig(temperature=0))
    print(chat.send("What is the capital of France?").text)
"""

from typing import TYPE_CHECKING, Any

# The public names, imported on first use (PEP 562): `import chatforge` and the CLI's
# start-up (`chatforge --help`, `logs`, `models list`) must not pay for torch.
_EXPORTS = {
    "BatchSummary": "chatforge.batch",
    "generate_batch": "chatforge.batch",
    "ChatSession": "chatforge.chat",
    "Reply": "chatforge.chat",
    "BudgetConfig": "chatforge.conversation",
    "Conversation": "chatforge.conversation",
    "Message": "chatforge.conversation",
    "ConversationModel": "chatforge.convmodel",
    "ConversationModelOutput": "chatforge.convmodel",
    "ConversationTokenizer": "chatforge.convmodel",
    "ChatforgeError": "chatforge.errors",
    "ContextOverflowError": "chatforge.errors",
    "ModelLoadError": "chatforge.errors",
    "GenerationConfig": "chatforge.generation.config",
    "Completion": "chatforge.generation.engine",
    "Engine": "chatforge.generation.engine",
    "Request": "chatforge.generation.engine",
    "LoadedModel": "chatforge.models",
    "ModelInfo": "chatforge.models",
    "load_model": "chatforge.models",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from chatforge.batch import BatchSummary, generate_batch
    from chatforge.chat import ChatSession, Reply
    from chatforge.conversation import BudgetConfig, Conversation, Message
    from chatforge.convmodel import (
        ConversationModel,
        ConversationModelOutput,
        ConversationTokenizer,
    )
    from chatforge.errors import ChatforgeError, ContextOverflowError, ModelLoadError
    from chatforge.generation.config import GenerationConfig
    from chatforge.generation.engine import Completion, Engine, Request
    from chatforge.models import LoadedModel, ModelInfo, load_model


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chatforge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "BatchSummary",
    "BudgetConfig",
    "ChatSession",
    "ChatforgeError",
    "Completion",
    "ContextOverflowError",
    "Conversation",
    "ConversationModel",
    "ConversationModelOutput",
    "ConversationTokenizer",
    "Engine",
    "GenerationConfig",
    "LoadedModel",
    "Message",
    "ModelInfo",
    "ModelLoadError",
    "Reply",
    "Request",
    "generate_batch",
    "load_model",
]
