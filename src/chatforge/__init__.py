"""chatforge: train, fine-tune, chat with, batch-run and serve conversational LMs.

Five lines of Python::

    from chatforge import ChatSession, GenerationConfig, load_model
    model = load_model("smollm2")
    chat = ChatSession(model, GenerationConfig(temperature=0))
    print(chat.send("What is the capital of France?").text)
"""

from chatforge.batch import BatchSummary, generate_batch
from chatforge.chat import ChatSession, Reply
from chatforge.conversation import BudgetConfig, Conversation, Message
from chatforge.errors import ChatforgeError, ContextOverflowError, ModelLoadError
from chatforge.generation.config import GenerationConfig
from chatforge.generation.engine import Completion, Engine, Request
from chatforge.models import LoadedModel, ModelInfo, load_model

__version__ = "0.1.0"

__all__ = [
    "BatchSummary",
    "BudgetConfig",
    "ChatSession",
    "ChatforgeError",
    "Completion",
    "ContextOverflowError",
    "Conversation",
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
