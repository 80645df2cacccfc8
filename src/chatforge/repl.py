"""The chat REPL behind ``chatforge chat``: slash commands, the interactive loop,
chatting over a file of prompts, saving and loading conversations.

:class:`ChatRepl` drives any chat session (a :class:`~chatforge.chat.ChatSession`,
a :class:`~chatforge.remote.RemoteSession`, or either wrapped in a
:class:`~chatforge.store.LoggedSession`)::

    repl = ChatRepl(ChatSession(load_model("smollm2")), err=Console(stderr=True))
    repl.command("/set temperature 0")
    repl.say("What is the capital of France?")

Replies go to ``out`` (stdout), as Markdown in a terminal (see
:class:`MarkdownPrinter`); everything else (notes, errors, stats) goes to ``err``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol, TextIO

from rich.console import Console

from chatforge import repl_judge
from chatforge.chat import Reply
from chatforge.conversation import Message
from chatforge.errors import ChatforgeError, ParamError
from chatforge.generation.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PRESET, GenerationConfig

HELP = """\
Commands:
  /help              this help
  /reset             start a new conversation (keeps the system prompt)
  /system TEXT       set the system prompt (empty: remove it)
  /set PARAM VALUE   change a generation parameter, e.g. /set temperature 0.2
  /set preset NAME   start over from a preset (precise, balanced, creative)
  /set               show the generation parameters (same as /params)
  /params            show the generation parameters, the preset and the reply limit
  /retry             ask the last question again (the log keeps the earlier reply)
  /undo              remove the last exchange (your message and the reply)
  /save FILE         save the conversation (.jsonl or text, as --output-file writes);
                     refuses to replace an existing file
  /save! FILE        save, replacing FILE if it exists
  /load FILE         replace the conversation with one saved by /save or --output-file
  /stats             show the last reply's stats (tokens, tok/s, time to first token)
  /stats on|off      show stats after every reply (as --verbose does), or stop
  /history           show the conversation
  /good, /bad        mark the last reply good or bad (kept in the conversation log)
  /edit [TEXT]       replace the last reply with your own text (the original is kept
                     beside it); without TEXT the reply opens for editing
  /pick N            after /retry: reply N (1 = the first) is the better one, and the
                     conversation goes on from it
  /quit              leave (Ctrl-D works too)
Multi-line input: end a line with \\ to continue it, or wrap a block in \"\"\".
Esc then Enter also inserts a newline. Ctrl-C stops a reply; a stopped reply is
shown but not sent back to the model."""

# Finish reasons of replies that never go back to the model (see ChatSession.stream).
UNSENT_REASONS = frozenset({"interrupted", "error"})


class Quit(Exception):
    """``/quit``: leave the chat."""


# ------------------------------------------------------------------ reply output


class ReplyPrinter(Protocol):
    """Where a streamed reply goes: ``write`` each piece, then ``close`` once."""

    def write(self, piece: str) -> None: ...

    def close(self) -> None: ...


class PlainPrinter:
    """Writes the reply as it comes, unchanged (pipes, ``--plain``)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, piece: str) -> None:
        """Write one piece of the reply."""
        self.out.write(piece)
        self.out.flush()

    def close(self) -> None:
        """End the reply's line."""
        self.out.write("\n")
        self.out.flush()


class MarkdownPrinter:
    """Renders the reply as Markdown while it streams, without flicker.

    The reply is re-rendered at most ``fps`` times a second, but only its last
    ``window`` lines are redrawn in a :class:`rich.live.Live` area; the lines
    above them are printed once, for good. So a long reply never redraws more
    than a few lines (no flicker, nothing repeated when it outgrows the screen),
    and a finished reply is ordinary terminal output. Only the last Markdown
    block is rendered again on a redraw (about 1 ms), so drawing does not slow
    the model down however long the reply grows; rendering the whole reply each
    time took 60 ms at 10 kB.
    """

    def __init__(self, console: Console, window: int = 6, fps: float = 15.0) -> None:
        from rich.live import Live
        from rich.text import Text

        self.console = console
        self.window = window
        self.interval = 1.0 / fps
        self.text = ""
        self.printed = 0  # rendered lines already printed for good
        self._done: list[Any] = []  # the rendered lines of the finished blocks
        self._ndone = 0  # how many blocks those are
        self._due = 0.0
        self.live = Live(
            Text(""),
            console=console,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    def write(self, piece: str) -> None:
        """Add a piece of the reply; redraw when the last redraw is old enough."""
        self.text += piece
        now = time.monotonic()
        if now >= self._due:
            self._due = now + self.interval
            self._draw(final=False)

    def close(self) -> None:
        """Print what is left of the reply and leave the live area."""
        try:
            self._draw(final=True)
        finally:
            self.live.stop()

    def _emit(self, line: Any) -> None:
        """Print one rendered line above the live area, for good."""
        self.live.console.print(line, no_wrap=True, crop=False, soft_wrap=True)

    def _lines(self) -> list[Any]:
        """The reply rendered, line by line. Finished blocks (those a blank line
        outside a code fence ends) are rendered once and kept, so a redraw costs
        the last block, not the whole reply: the model waits while we draw."""
        from rich.text import Text

        blocks = split_blocks(self.text)
        for block in blocks[self._ndone : -1]:
            lines = self._render(block)
            if self._done and lines:
                self._done.append(Text(""))
            self._done.extend(lines)
            self._ndone += 1
        tail = self._render(blocks[-1]) if len(blocks) > self._ndone else []
        return self._done + ([Text("")] if self._done and tail else []) + tail

    def _render(self, markdown: str) -> list[Any]:
        from rich.text import Text

        rendered = self.console.render_lines(
            reply_markdown(markdown), self.console.options, pad=False, new_lines=False
        )
        lines = [Text.assemble(*((s.text, s.style) for s in line)) for line in rendered]
        # Blank lines around a block are the space between blocks, which _lines
        # puts back (one); a code block's padding is spaces, and stays.
        start, end = 0, len(lines)
        while start < end and not lines[start].plain:
            start += 1
        while end > start and not lines[end - 1].plain:
            end -= 1
        return lines[start:end]

    def _draw(self, final: bool) -> None:
        from rich.console import Group

        lines = self._lines()
        stable = len(lines) if final else max(0, len(lines) - self.window)
        if final:
            self.live.update(Group(), refresh=True)
        for line in lines[self.printed : stable]:
            self._emit(line)
        self.printed = max(self.printed, stable)
        if not final:
            self.live.update(Group(*lines[self.printed :]), refresh=True)


def reply_markdown(text: str) -> Any:
    """``text`` as rich Markdown, with HTML read as text.

    rich drops HTML tags it does not know, so a reply's ``<<Caring for Houseplants>>``
    showed as ``<>`` and ``a <tag> here`` as ``a  here``; a model's reply is not a web
    page, and every character it wrote must reach the screen.
    """
    from markdown_it import MarkdownIt
    from rich.markdown import Markdown

    md = Markdown("")
    md.markup = text
    parser = MarkdownIt("commonmark", {"html": False}).enable("strikethrough").enable("table")
    md.parsed = parser.parse(text)
    return md


def split_blocks(text: str) -> list[str]:
    """Markdown ``text`` cut at blank lines outside code fences (the last block may
    still be growing); rendered one by one they look as the whole text does."""
    blocks: list[str] = []
    current: list[str] = []
    fence: str | None = None
    *lines, partial = text.split("\n")  # the last line may still be growing
    for line in lines:
        mark = line.lstrip()[:3]
        if mark in ("```", "~~~"):
            fence = None if fence == mark else (fence or mark)
        if fence is None and not line.strip():
            if current:
                blocks.append("\n".join(current))
                current = []
            continue
        current.append(line)
    if partial:
        current.append(partial)
    blocks.append("\n".join(current))
    return blocks


@contextlib.contextmanager
def no_echo(stream: Any) -> Iterator[None]:
    """Keep the terminal from echoing keys while a reply is drawn in place.

    The Markdown printer redraws its live area by moving the cursor up over the lines
    it drew; a key the terminal echoes in between (Ctrl-C's ``^C``, text typed ahead)
    moves the cursor where the printer does not know, and the redraw then leaves a
    line behind that is printed again (Ctrl-C printed a line twice). Typed-ahead keys
    are kept (TCSANOW, not TCSAFLUSH) for the next prompt. Not a terminal: nothing to do.
    """
    try:
        import termios

        fd = stream.fileno()
        saved = termios.tcgetattr(fd) if stream.isatty() else None
    except (ImportError, AttributeError, OSError, ValueError):  # no termios, odd stream
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def use_markdown(plain: bool, out: TextIO) -> bool:
    """Whether replies are rendered as Markdown: in a terminal, unless ``--plain``."""
    try:
        return not plain and out.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


# ------------------------------------------------------------------ stats


def format_stats(reply: Reply) -> list[str]:
    """A reply's numbers, one ``name: value`` line each (``--verbose``, ``/stats``)."""
    rate = f"{reply.tokens_per_second:.1f} tok/s"
    decode = reply.decode_tokens_per_second
    if decode is not None:
        rate += f" (after the first token: {decode:.1f} tok/s)"
    ttft = reply.first_token_seconds
    cached = f" ({reply.cached_tokens} cached)" if reply.cached_tokens else " (0 cached)"
    return [
        f"reply tokens:        {reply.completion_tokens} ({reply.finish_reason})",
        f"reply rate:          {rate}",
        f"time to first token: {'-' if ttft is None else f'{ttft:.3f}s'}",
        f"prompt tokens:       {reply.prompt_tokens}{cached}",
        f"total time:          {reply.seconds:.3f}s",
    ]


def context_full_notice(prompt_tokens: int, reply_tokens: int) -> str:
    """The line saying a reply stopped because the context was full (not at its
    length limit), and how to go on past it."""
    return (
        f"the context ({prompt_tokens + reply_tokens} tokens) is full: the reply stopped "
        f"at {reply_tokens} tokens; --slide (/set slide on) keeps generating by dropping "
        "the oldest tokens"
    )


def reply_limit(config: GenerationConfig) -> str:
    """The effective reply length limit, as ``/params`` shows it."""
    if config.max_new_tokens is not None:
        return str(config.max_new_tokens)
    if config.max_length is not None:
        return f"none (max_length {config.max_length} limits prompt + reply)"
    return f"{DEFAULT_MAX_NEW_TOKENS} (default)"


def describe_params(config: GenerationConfig, preset: str | None) -> list[str]:
    """``/params``: the preset (and what differs from it), then every parameter."""
    lines = []
    if preset:
        base = GenerationConfig.from_preset(preset).to_dict()
        changed = [k for k, v in config.to_dict().items() if base.get(k) != v]
        lines.append(
            f"preset = {preset}" + (f" (changed: {', '.join(changed)})" if changed else "")
        )
    for k, v in config.to_dict().items():
        lines.append(f"{k} = {reply_limit(config) if k == 'max_new_tokens' else v}")
    return lines


# ------------------------------------------------------------------ input


def read_prompts(source: str) -> Iterator[str]:
    """Non-empty lines of a file (``-``: stdin); the file is checked up front.

    Blank lines between prompts are skipped; an input of blank lines only (``echo |``)
    is one empty prompt, whose reply starts from the model's start token."""
    if source == "-":
        stream: TextIO = sys.stdin
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a file"
            raise ChatforgeError(f"prompt file {source} {what}")
        try:
            stream = open(path, encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise ChatforgeError(f"cannot read prompt file {source}: {e.strerror}") from e

    def lines() -> Iterator[str]:
        blank = sent = False
        try:
            for line in stream:
                line = line.rstrip("\r\n")
                if line.strip():
                    sent = True
                    yield line
                else:
                    blank = True
            if blank and not sent:
                yield ""
        except UnicodeDecodeError as e:
            raise ChatforgeError(f"prompt file {source} is not UTF-8 text ({e.reason})") from e

    return lines()


def read_input(prompt: Any) -> str:
    """One user message from a prompt_toolkit session: ``\\`` continues a line,
    a \"\"\" block spans lines."""
    text = prompt.prompt(">>> ")
    if text.strip() == '"""':
        lines = []
        while True:
            line = prompt.prompt("... ")
            if line.strip() == '"""':
                return "\n".join(lines)
            lines.append(line)
    while text.endswith("\\"):
        text = text[:-1] + "\n" + prompt.prompt("... ")
    return text


def open_log(no_log: bool, continue_: bool, cid: int | None) -> tuple[Any, Any]:
    """The conversation log (None with --no-log) and the conversation to resume."""
    from chatforge.store import ConversationLog

    if no_log:
        if continue_ or cid is not None:
            raise ChatforgeError("--continue and --cid need the conversation log; drop --no-log")
        return None, None
    log = ConversationLog()
    if cid is not None:
        return log, log.get(cid)
    if continue_:
        conv = log.latest()
        if conv is None:
            raise ChatforgeError("there is no logged conversation to continue")
        return log, conv
    return log, None


def resumable_messages(conv: Any) -> list[Message]:
    """The history the model is sent when a logged conversation is continued: its
    user and assistant messages (an edited reply as edited), less replies that were
    interrupted or failed (unless edited)."""
    return [
        Message(m.role, getattr(m, "final_text", m.content))
        for m in conv.messages
        if m.role == "user"
        or (
            m.role == "assistant"
            and (
                getattr(m, "finish_reason", None) not in UNSENT_REASONS
                or getattr(m, "edit", None) is not None
            )
        )
    ]


# ------------------------------------------------------------------ the REPL


class ChatRepl:
    """Chat commands and replies over one session.

    ``interactive``: a person is typing, so a bad command is reported and the
    chat goes on; otherwise (a prompt file) it raises :class:`ChatforgeError`.
    ``writer`` (``--output-file``) gets every message as it happens.
    """

    def __init__(
        self,
        session: Any,
        err: Console,
        out: TextIO | None = None,
        writer: Any = None,
        interactive: bool = False,
        preset: str | None = DEFAULT_PRESET,
        verbose: bool = False,
        markdown: bool = False,
        keys: Any = None,
    ) -> None:
        self.session = session
        self.keys = keys if keys is not None else sys.stdin  # the terminal keys come from
        self.err = err
        self.out = out if out is not None else sys.stdout
        self.writer = writer
        self.interactive = interactive
        self.preset = preset
        self.verbose = verbose
        self.markdown = markdown
        self._extras: dict[int, tuple[Message, dict[str, Any]]] = {}  # reply stats by message

    # -------------------------------------------------------------- replies

    def printer(self) -> ReplyPrinter:
        """Where the next reply goes: Markdown in a terminal, else plain text."""
        if self.markdown:
            return MarkdownPrinter(Console(file=self.out, highlight=False))
        return PlainPrinter(self.out)

    def say(self, text: str) -> bool:
        """Send a user message and stream the reply; False when Ctrl-C stopped it."""
        session = self.session
        if self.writer:
            self.writer.message("user", text)
        before = session.last
        gen = session.stream(text)
        interrupted = False
        quiet = no_echo(self.keys) if self.markdown else contextlib.nullcontext()
        with quiet:
            printer = self.printer()
            try:
                for piece in gen:
                    printer.write(piece)
            except KeyboardInterrupt:
                gen.close()  # records the partial reply as "interrupted"
                interrupted = True
            finally:
                printer.close()
        reply = session.last
        if reply is not None and reply is not before:
            self._after_reply(reply, interrupted)
        return not interrupted

    def _after_reply(self, reply: Reply, interrupted: bool) -> None:
        extra = self.reply_extra(reply)
        messages = self.session.conversation.messages
        if messages and messages[-1].role == "assistant" and reply.finish_reason != "interrupted":
            self._extras[id(messages[-1])] = (messages[-1], extra)
        if reply.dropped:
            self.note(f"left out the {len(reply.dropped)} oldest messages to fit the context")
        if reply.slid_tokens:
            self.note(
                f"the reply went past the context: its {reply.slid_tokens} oldest tokens "
                "(after the system prompt, or --keep) were dropped as it went"
            )
        if reply.context_full:
            self.note(context_full_notice(reply.prompt_tokens, reply.completion_tokens))
        if interrupted:
            self.note("reply stopped; it will not be sent back to the model")
        if self.writer:
            self.writer.message("assistant", reply.text, **extra)
        if self.verbose:
            self.show_stats(reply)

    def reply_extra(self, reply: Reply) -> dict[str, Any]:
        """What a transcript records with a reply (model, params, token counts, ...)."""
        session = self.session
        return {
            "model": getattr(session, "model_name", None) or session.loaded.info.name,
            "params": reply.config.to_dict(),
            "prompt_tokens": reply.prompt_tokens,
            "cached_tokens": reply.cached_tokens,
            "completion_tokens": reply.completion_tokens,
            "finish_reason": reply.finish_reason,
            "seconds": round(reply.seconds, 3),
            "dropped_messages": len(reply.dropped),
            **({"slid_tokens": reply.slid_tokens} if reply.slid_tokens else {}),
            **({"context_full": True} if reply.context_full else {}),
        }

    def show_stats(self, reply: Reply) -> None:
        """Print a reply's stats to ``err``."""
        for line in format_stats(reply):
            self.err.print(f"[dim]{line}[/]", highlight=False)

    # -------------------------------------------------------------- loops

    def run_batch(self, prompts: Iterator[str], independent: bool = False) -> None:
        """Each line is a user message (``/`` commands run); errors raise."""
        try:
            for line in prompts:
                if line.startswith("/") and self.command(line):
                    continue
                if independent:
                    self.session.reset()
                try:
                    self.say(line)
                except ChatforgeError:
                    raise
                except ValueError as e:  # e.g. a prompt too long for the context
                    raise ChatforgeError(str(e)) from e
        except Quit:
            return

    def run_interactive(self) -> None:
        """Read messages from the terminal until /quit or Ctrl-D."""
        prompt = _prompt_session()
        while True:
            try:
                text = read_input(prompt)
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except EOFError:
                self.err.print("[dim]bye[/]")
                return
            if not text.strip():
                continue
            try:
                self.handle(text)
            except Quit:
                return

    def handle(self, text: str) -> None:
        """One line typed at the prompt: a command, or a message to send.

        Errors are printed and the chat goes on, except the log's: when it fails
        (disk full, damaged file) the chat stops rather than go on unlogged while
        the user believes every turn is kept; the message says how to go on.
        """
        from chatforge.store.log import LogError

        try:
            if text.startswith("/") and self.command(text):
                return
            self.say(text)
        except LogError:
            raise
        except (ChatforgeError, ValueError) as e:
            self.err.print(f"[red]error:[/] {e}", highlight=False)

    # -------------------------------------------------------------- commands

    def command(self, line: str) -> bool:
        """Run a slash command; True when ``line`` was one (False: send it as text).

        Raises :class:`Quit` for ``/quit``.
        """
        name, _, arg = line[1:].partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("quit", "exit", "q"):
            raise Quit
        handler = self._COMMANDS.get(name)
        if handler is None:
            if not self.interactive:
                return False  # a prompt line that happens to start with "/"
            self.fail(f"unknown command /{name}; type /help")
            return True
        handler(self, arg)
        return True

    def fail(self, problem: str | Exception) -> None:
        """Report a failed command: printed when interactive, else raised (a
        :class:`ChatforgeError` as it is, so the CLI names a bad setting's flag)."""
        if not self.interactive:
            if isinstance(problem, ChatforgeError):
                raise problem
            raise ChatforgeError(str(problem))
        self.err.print(f"[red]error:[/] {problem}", highlight=False)

    def note(self, text: str) -> None:
        """A dim note to the user."""
        self.err.print(f"[dim]({text})[/]", highlight=False)

    def _help(self, arg: str) -> None:
        self.err.print(HELP, highlight=False, markup=False)

    def _reset(self, arg: str) -> None:
        self.session.reset()
        self._extras.clear()
        self.note("new conversation")
        if self.writer:
            self.writer.note("new conversation")

    def _system(self, arg: str) -> None:
        self.session.system = arg or None  # a logged session records it in the log
        self.note(f"system prompt {'set' if arg else 'removed'}")
        if self.writer and arg:
            self.writer.message("system", arg)

    def _set(self, arg: str) -> None:
        if not arg:
            self._params("")
            return
        pname, _, value = arg.partition(" ")
        value = value.strip()
        if pname.lower() == "preset":
            self._set_preset(value)
            return
        try:
            self.session.config = self.session.config.set_param(pname, value)
        except (ValueError, ChatforgeError) as e:
            self.fail(e if not self.interactive else _as_typed(e, pname))
            return
        self.note(f"{pname} = {value}")

    def _set_preset(self, name: str) -> None:
        try:
            config = GenerationConfig.from_preset(name)
        except (ValueError, ChatforgeError) as e:
            self.fail(str(e))
            return
        self.session.config = config
        self.preset = name.strip().lower()
        self.note(f"preset {self.preset}; every other setting back to its default")

    def _params(self, arg: str) -> None:
        for line in describe_params(self.session.config, self.preset):
            self.err.print(f"  {line}", highlight=False, markup=False)

    def _save(self, arg: str, force: bool = False) -> None:
        if not arg:
            self.fail("/save needs a file name, e.g. /save chat.jsonl")
            return
        target = Path(arg).expanduser()
        if target.exists() and not force:
            self.fail(f"{target} exists; use /save! {arg} to replace it")
            return
        try:
            self.save(target)
        except (ChatforgeError, OSError) as e:
            self.fail(f"could not save: {e}")
            return
        self.note(f"saved {len(self.session.conversation.messages)} messages to {target}")

    def _save_force(self, arg: str) -> None:
        self._save(arg, force=True)

    def save(self, target: Path) -> None:
        """Write the conversation to ``target`` as ``--output-file`` would have.

        Written to a temporary file first, so an existing file is never left half
        written.
        """
        from chatforge.transcript import TranscriptWriter

        tmp = target.with_name(target.name + ".tmp")
        if tmp.exists():
            tmp.unlink()
        w = TranscriptWriter(tmp, jsonl=target.suffix.lower() == ".jsonl")
        try:
            conv = self.session.conversation
            if conv.system:
                w.message("system", conv.system)
            for m in conv.messages:
                w.message(m.role, m.content, **self._extra_of(m))
            w.close()
            tmp.replace(target)
        except BaseException:
            w.close()
            tmp.unlink(missing_ok=True)
            raise

    def _extra_of(self, message: Message) -> dict[str, Any]:
        found = self._extras.get(id(message))
        return found[1] if found is not None and found[0] is message else {}

    def _load(self, arg: str) -> None:
        from chatforge.transcript import read_transcript

        if not arg:
            self.fail("/load needs a file name, e.g. /load chat.jsonl")
            return
        try:
            entries = read_transcript(arg)
        except ChatforgeError as e:
            self.fail(f"could not load: {e}")
            return
        system, messages, extras = None, [], {}
        for e in entries:
            if e.role == "system":
                system = e.content or None  # a later /system replaced the earlier one
            elif e.role == "user" or e.extra.get("finish_reason") not in UNSENT_REASONS:
                m = Message(e.role, e.content)  # type: ignore[arg-type]
                messages.append(m)
                if e.role == "assistant":
                    extras[id(m)] = (m, e.extra)
        self.session.reset()
        self.session.system = system
        self.session.conversation.messages = messages
        self._extras = extras
        self._relog(force=True)
        if self.writer:
            self.writer.note(f"loaded {arg}")
        self.note(f"loaded {len(messages)} messages from {arg}")

    def _history(self, arg: str) -> None:
        conv = self.session.conversation
        if conv.system:
            self.err.print(f"[dim]system:[/] {conv.system}", highlight=False)
        for m in conv.messages:
            self.err.print(f"[bold]{m.role}:[/] {m.content}", highlight=False)

    def _undo(self, arg: str) -> None:
        messages = self.session.conversation.messages
        if not messages:
            self.fail("nothing to undo")
            return
        if messages[-1].role == "assistant":
            messages.pop()
        if messages and messages[-1].role == "user":
            messages.pop()
        self._relog()
        if self.writer:
            self.writer.note("undo: the last exchange was removed")
        self.note(f"removed the last exchange; {len(messages)} messages left")

    def _retry(self, arg: str) -> None:
        messages = self.session.conversation.messages
        if messages and messages[-1].role == "assistant":
            dropped: Message | None = messages.pop()
        else:
            dropped = None
        if not messages or messages[-1].role != "user":
            if dropped is not None:
                messages.append(dropped)
            self.fail("nothing to retry")
            return
        question = messages.pop()
        begin_retry = getattr(self.session, "begin_retry", None)
        if begin_retry is None or not begin_retry():  # else the log keeps the earlier reply
            self._relog()
        if self.writer:
            self.writer.note("retry")
        before = len(messages)
        try:
            self.say(question.content)
        except (ChatforgeError, ValueError):
            if len(messages) == before:  # the session took the turn back
                messages.append(question)  # a failed retry keeps the question
            raise

    def _stats(self, arg: str) -> None:
        word = arg.lower()
        if word in ("on", "off"):
            self.verbose = word == "on"
            self.note(f"stats after every reply {word}")
            return
        if arg:
            self.fail("/stats takes on, off or nothing")
            return
        if self.session.last is None:
            self.note("no reply yet")
            return
        self.show_stats(self.session.last)

    _COMMANDS = {
        "help": _help,
        "?": _help,
        "reset": _reset,
        "system": _system,
        "set": _set,
        "params": _params,
        "save": _save,
        "save!": _save_force,
        "load": _load,
        "history": _history,
        "undo": _undo,
        "retry": _retry,
        "stats": _stats,
        "good": lambda self, arg: repl_judge.thumbs(self, "good", arg),
        "bad": lambda self, arg: repl_judge.thumbs(self, "bad", arg),
        "edit": repl_judge.edit,
        "pick": repl_judge.pick,
    }

    # -------------------------------------------------------------- the log

    def _relog(self, force: bool = False) -> None:
        """After /undo, /retry or /load: make the conversation log hold the history
        the model now sees, so ``--continue`` picks up this conversation and not
        the one before the change.

        The log has no way to take messages back, so the history so far is
        written as a new logged conversation (the old one stays as it was).
        """
        from chatforge.store import LoggedMessage, LoggedSession

        s = self.session
        if not isinstance(s, LoggedSession) or (s.cid is None and not force):
            return
        s.cid = None
        if not s.conversation.messages:
            return  # the next message starts a new logged conversation
        cid = s.log.new_conversation(
            model=s.model_name, backend=s.backend, api_base=s.api_base, system=s.system
        )
        not_stats = {"role", "content", "created", "id", "alt_of", "judgements", "alternatives"}
        known = {f.name for f in fields(LoggedMessage)} - not_stats
        for m in s.conversation.messages:
            stats = {k: v for k, v in self._extra_of(m).items() if k in known}
            mid = s.log.add_message(cid, m.role, m.content, **stats)
            if m.role == "user":
                s.user_id, s.reply_id = mid, None
            else:
                s.reply_id = mid
        s.cid = cid


def _as_typed(error: Exception, typed: str) -> str:
    """``error``'s message, naming a bad setting as ``/set`` was given it (``top-p``)."""
    if isinstance(error, ParamError) and error.param == typed.lower().replace("-", "_"):
        return error.render(typed)
    return str(error)


def _prompt_session() -> Any:
    """A prompt_toolkit session with the chat's history file and key bindings."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    from chatforge.paths import data_dir

    history: Any
    try:
        data_dir().mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(data_dir() / "chat_history"))
    except OSError:
        history = InMemoryHistory()
    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event: Any) -> None:  # Esc/Alt+Enter inserts a newline
        event.current_buffer.insert_text("\n")

    return PromptSession(history=history, key_bindings=keys)
