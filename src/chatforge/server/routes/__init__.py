"""The server's routes, one router per concern; :func:`~chatforge.server.app.create_app`
includes them all. Each reads the app's :class:`~chatforge.server.state.ServerState`
(``get_state``); the API routers refuse work during shutdown (``open_for_requests``)."""

from chatforge.server.routes import (
    chat,
    completions,
    embeddings,
    feedback,
    health,
    models,
    page,
    tokenizer,
)

ROUTERS = (
    health.router,
    page.router,
    models.router,
    tokenizer.router,
    chat.router,
    completions.router,
    embeddings.router,
    feedback.router,
)
"""Every router, in the order the app includes them."""

__all__ = ["ROUTERS"]
