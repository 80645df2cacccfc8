"""The OpenAI-compatible HTTP API and the web chat page (``chatforge serve``)."""

from chatforge.server.app import create_app
from chatforge.server.schemas import Limits
from chatforge.server.state import ServedModel, ServerState

__all__ = ["Limits", "ServedModel", "ServerState", "create_app"]
