"""The SQLite conversation log and its export to training data."""

from chatforge.store.log import (
    ConversationLog,
    LoggedConversation,
    LoggedMessage,
    default_path,
)
from chatforge.store.session import LoggedSession

__all__ = [
    "ConversationLog",
    "LoggedConversation",
    "LoggedMessage",
    "LoggedSession",
    "default_path",
]
