"""The OpenAI-compatible HTTP API and the web chat page (``chatforge serve``)."""

from chatforge.server.app import ServedModel, ServerState, create_app
from chatforge.server.schemas import Limits

__all__ = ["Limits", "ServedModel", "ServerState", "create_app"]
