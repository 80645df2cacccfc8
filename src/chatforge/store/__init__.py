"""The SQLite conversation log, its judgements, and its export to training and
preference data."""

from chatforge.store.judgement import Judgement
from chatforge.store.log import (
    ConversationLog,
    LoggedConversation,
    LoggedMessage,
    default_path,
)
from chatforge.store.preference import PreferenceCounts, export_preference
from chatforge.store.session import LoggedSession

__all__ = [
    "ConversationLog",
    "Judgement",
    "LoggedConversation",
    "LoggedMessage",
    "LoggedSession",
    "PreferenceCounts",
    "default_path",
    "export_preference",
]
