"""Message and Conversation types."""

from __future__ import annotations

import pytest

from chatforge.conversation import Conversation, Message, Turn


def test_message_roundtrip_and_validation() -> None:
    m = Message("user", "hi")
    assert m.to_dict() == {"role": "user", "content": "hi"}
    assert Message.from_dict({"role": "assistant", "content": "yo", "name": "x"}) == Message(
        "assistant", "yo"
    )
    with pytest.raises(ValueError, match="role"):
        Message("bot", "hi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="content"):
        Message.from_dict({"role": "user"})
    with pytest.raises(ValueError, match="string"):
        Message("user", 3)  # type: ignore[arg-type]


def test_conversation_turns_reset_and_messages() -> None:
    c = Conversation(system="be brief")
    c.add_user("a")
    c.add_assistant("b")
    c.add_user("c")
    assert c.as_messages() == [
        Message("system", "be brief"),
        Message("user", "a"),
        Message("assistant", "b"),
        Message("user", "c"),
    ]
    assert c.turns() == [
        Turn(Message("user", "a"), Message("assistant", "b")),
        Turn(Message("user", "c"), None),
    ]
    c.reset()
    assert c.messages == [] and c.system == "be brief"
    assert c.as_messages() == [Message("system", "be brief")]
    assert Conversation().as_messages() == []


def test_conversation_edge_turns_and_system_rejected() -> None:
    c = Conversation(messages=[{"role": "assistant", "content": "hello!"}])  # type: ignore[list-item]
    c.add_user("u1")
    c.add_user("u2")
    c.add_assistant("a2")
    assert c.turns() == [
        Turn(None, Message("assistant", "hello!")),
        Turn(Message("user", "u1"), None),
        Turn(Message("user", "u2"), Message("assistant", "a2")),
    ]
    with pytest.raises(ValueError, match="Conversation.system"):
        Conversation(messages=[Message("system", "x")])
