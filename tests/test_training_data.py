"""Training data: each format detected from content, malformed lines reported, chitchat."""

from __future__ import annotations

import json

import pytest

from chatforge.training.data import DataError, detect_kind, load_chitchat, load_data
from training_helpers import write_convmodel, write_openai, write_sharegpt


def test_each_format_is_detected_and_read(tmp_path):
    (tmp_path / "corpus.txt").write_text("once upon a time\n", encoding="utf-8")
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("first", encoding="utf-8")
    (folder / "b.txt").write_text("second", encoding="utf-8")
    cm = write_convmodel(tmp_path / "cm.jsonl", n=3)
    oa = write_openai(tmp_path / "oa.jsonl", n=2)
    sg = write_sharegpt(tmp_path / "sg.jsonl", n=2)
    assert detect_kind(str(tmp_path / "corpus.txt")) == "text"
    assert detect_kind(str(folder)) == "text"
    assert detect_kind(str(cm)) == "convmodel"
    assert detect_kind(str(oa)) == "openai"
    assert detect_kind(str(sg)) == "sharegpt"
    assert detect_kind("chitchat") == "chitchat"

    assert load_data(folder).texts == ["first", "second"]
    conv = load_data(cm).conversations[0]
    assert [m.role for m in conv] == ["user", "assistant", "user", "assistant"]
    conv = load_data(oa).conversations[0]
    assert [m.role for m in conv] == ["system", "user", "assistant"]
    conv = load_data(sg).conversations[1]
    assert [(m.role, m.content) for m in conv] == [
        ("user", "what is your name"),
        ("assistant", "i am a small bot"),
    ]
    # Several sources of conversations combine; a corpus and conversations do not.
    assert len(load_data([cm, oa])) == 5
    with pytest.raises(DataError, match="cannot mix a plain-text corpus"):
        load_data([cm, tmp_path / "corpus.txt"])


def test_override_of_detection(tmp_path):
    p = tmp_path / "lines.jsonl"
    p.write_text('["a", "b"]\n', encoding="utf-8")
    assert load_data(p, kind="text").texts == ['["a", "b"]\n']


def test_malformed_lines_are_reported_with_file_and_line(tmp_path):
    p = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            }
        ),
        "{oops",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "user"}]}),
    ]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    seen: list[str] = []
    ds = load_data(p, on_error="skip", warn=seen.append)
    assert len(ds) == 1
    assert ds.errors == seen
    assert seen[0].startswith(f"{p}:2: invalid JSON")
    assert seen[1] == f"{p}:3: message 0 has unknown role 'robot'"
    assert seen[2] == f"{p}:4: no assistant turn: nothing to learn from this conversation"
    assert seen[3] == f'{p}:5: message 0 needs "role" and "content"'
    with pytest.raises(DataError, match=rf"^{p}:2: invalid JSON"):
        load_data(p, on_error="fail")


def test_convmodel_and_sharegpt_errors(tmp_path):
    p = tmp_path / "cm.jsonl"
    p.write_text('["hi", "there"]\n["just one"]\n["hi", 3]\n', encoding="utf-8")
    ds = load_data(p)
    assert len(ds) == 1
    assert ds.errors == [
        f"{p}:2: a conversation needs at least 2 turns",
        f"{p}:3: turn 1 is int, expected a string",
    ]
    s = tmp_path / "sg.jsonl"
    s.write_text(
        '{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}\n'
        '{"conversations": [{"from": "alien", "value": "a"}]}\n',
        encoding="utf-8",
    )
    assert load_data(s).errors == [f"{s}:2: turn 0 is from unknown speaker 'alien'"]


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot tell the data format"):
        load_data(empty)


def test_chitchat_turns_join_consecutive_messages_of_one_sender():
    convs = load_chitchat()
    assert len(convs) > 3000
    first = convs[0]
    assert first[0].content == "Hello How are you doing today?"  # two messages, one turn
    assert all(
        a.role != b.role for conv in convs[:200] for a, b in zip(conv, conv[1:], strict=False)
    )


def test_split_tail_holds_out_the_end(tmp_path):
    ds = load_data(write_convmodel(tmp_path / "cm.jsonl", n=10))
    head, tail = ds.split_tail(0.2)
    assert len(head) == 8 and len(tail) == 2
    assert tail.conversations == ds.conversations[8:]
