"""Messages, the prompt formats, and the context budget."""

from chatforge.conversation.budget import (
    DEFAULT_MAX_NEW_TOKENS,
    BudgetConfig,
    FittedPrompt,
    fit_prompt,
    reply_budget,
)
from chatforge.conversation.formats import (
    FORMATS,
    SEP_TOKEN,
    ChatTemplateFormat,
    Encoded,
    EosFormat,
    PromptFormat,
    SepFormat,
    TextFormat,
    detect_format,
    ensure_sep_token,
    get_format,
)
from chatforge.conversation.messages import ROLES, Conversation, Message, Turn, as_message

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "FORMATS",
    "ROLES",
    "SEP_TOKEN",
    "BudgetConfig",
    "ChatTemplateFormat",
    "Conversation",
    "Encoded",
    "EosFormat",
    "FittedPrompt",
    "Message",
    "PromptFormat",
    "SepFormat",
    "TextFormat",
    "Turn",
    "as_message",
    "detect_format",
    "ensure_sep_token",
    "fit_prompt",
    "get_format",
    "reply_budget",
]
