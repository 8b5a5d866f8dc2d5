"""`sloth-daemon chat`: an interactive terminal chat with the running daemon over ZeroMQ (`sloth_daemon.client`).

Each line you type is a user message; the answer streams back as it is generated, and the conversation so far is
sent with every turn. Lines starting with `/` are commands (see `COMMANDS`); they act on the last answer:

    /up, /down              rate the last answer (a thumbs-up makes it a training example)
    /fix <corrected answer> the answer it should have given (a training example; the conversation continues with it)
    /teach <prompt> => <answer>   teach a question and its answer; `/teach <text>` teaches a document
    /status                 the adapter being served, pending examples, a running update
    /new                    start a new conversation
    /help, /quit            (end of input quits too)

Works the same with stdin from a pipe (no prompt is shown then). `run_chat` returns the exit code: 0 on /quit or end of
input, 3 when the daemon cannot be reached at the start.
"""

from __future__ import annotations

import sys
from typing import Iterable, TextIO

from rich.console import Console

from .client import Completion, SlothClient, SlothError

COMMANDS = """commands:
  /up, /down                    rate the last answer
  /fix <corrected answer>       the answer it should have given
  /teach <prompt> => <answer>   teach a question and its answer (/teach <text> teaches a document)
  /status                       served adapter, pending examples, running update
  /new                          start a new conversation
  /help, /quit"""

EXIT_OK, EXIT_UNREACHABLE = 0, 3


def _lines(stream: TextIO, console: Console) -> Iterable[str]:
    interactive = stream.isatty()
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ") if interactive else stream.readline()
        except (EOFError, KeyboardInterrupt):
            return
        if not interactive and line == "":
            return
        yield line.rstrip("\n")


class ChatSession:
    def __init__(self, client: SlothClient, console: Console, *, system: str | None = None,
                 max_tokens: int | None = None, temperature: float | None = None):
        self.client = client
        self.console = console
        self.system = system
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.history: list[dict] = []
        self.last: Completion | None = None
        self.new()

    def say(self, text: str, style: str = "dim") -> None:
        self.console.print(text, style=style, markup=False, highlight=False)

    def new(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.last = None

    def turn(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        out = self.console.file
        out.write("sloth> ")
        try:
            stream = self.client.chat(self.history, stream=True, max_tokens=self.max_tokens,
                                      temperature=self.temperature)
            for chunk in stream:
                out.write(chunk)
                out.flush()
        except KeyboardInterrupt:
            out.write("\n")
            self.say("(interrupted; the answer is not kept)", "yellow")
            self.history.pop()
            return
        except SlothError as e:
            out.write("\n")
            self.history.pop()
            hint = " (/new starts a shorter conversation)" if e.reason == "context_length_exceeded" else ""
            self.say(f"error: {e}{hint}", "red")
            return
        out.write("\n")
        out.flush()
        assert stream.final is not None
        self.last = stream.final
        self.history.append({"role": "assistant", "content": stream.final.text})

    def command(self, line: str) -> bool:
        """Run a /command; False when the session should end."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        try:
            if name in ("quit", "exit", "q"):
                return False
            if name == "help":
                self.say(COMMANDS, "")
            elif name in ("up", "down"):
                if self._need_last():
                    out = self.client.feedback(self.last.interaction_id, rating=name)  # type: ignore[union-attr]
                    self.say(f"rated {name} ({out['pending_examples']} examples wait for the next update)", "green")
            elif name == "fix":
                if not arg:
                    self.say("usage: /fix <the answer it should have given>", "yellow")
                elif self._need_last():
                    out = self.client.feedback(self.last.interaction_id, correction=arg)  # type: ignore[union-attr]
                    self.history[-1] = {"role": "assistant", "content": arg}
                    self.say(f"correction saved ({out['pending_examples']} examples wait for the next update)",
                             "green")
            elif name == "teach":
                self._teach(arg)
            elif name == "status":
                s = self.client.status()
                update = s.get("update")
                running = f"; update {update['update_id']} at {update['progress']:.0%}" if update else ""
                self.say(f"{s['model']} with adapter {s['adapter'] or 'none (base model)'}; "
                         f"{s['pending_examples']} pending examples; {s['interactions']} logged turns{running}", "")
            elif name == "new":
                self.new()
                self.say("new conversation")
            else:
                self.say(f"unknown command /{name}; /help lists them", "yellow")
        except SlothError as e:
            self.say(f"error: {e}", "red")
        return True

    def _need_last(self) -> bool:
        if self.last is None:
            self.say("no answer yet to give feedback on", "yellow")
            return False
        return True

    def _teach(self, arg: str) -> None:
        if not arg:
            self.say("usage: /teach <prompt> => <answer>, or /teach <document text>", "yellow")
            return
        prompt, sep, answer = arg.partition("=>")
        if sep and prompt.strip() and answer.strip():
            out = self.client.teach(examples=[{"prompt": prompt.strip(), "answer": answer.strip()}])
        else:
            out = self.client.teach(documents=[arg])
        what = "taught" if out["added"] else "already known"
        self.say(f"{what} ({out['pending_examples']} examples wait for the next update)", "green")


def run_chat(client: SlothClient, *, stdin: TextIO = sys.stdin, console: Console | None = None,
             system: str | None = None, max_tokens: int | None = None, temperature: float | None = None,
             connect_timeout: float = 10.0) -> int:
    console = console or Console()
    retries, client.retries = client.retries, 0  # one quick probe: a missing daemon is reported at once
    try:
        status = client.status(timeout=connect_timeout)
    except SlothError as e:
        Console(stderr=True).print(f"[bold red]error:[/] the daemon is not reachable at {client.address} ({e.code}); "
                                   "start it with `sloth-daemon serve` or pass --zmq", highlight=False)
        return EXIT_UNREACHABLE
    finally:
        client.retries = retries
    session = ChatSession(client, console, system=system, max_tokens=max_tokens, temperature=temperature)
    if stdin.isatty():
        session.say(f"chatting with {status['model']} (adapter {status['adapter'] or 'none'}) at {client.address}; "
                    "/help lists the commands", "")
    for line in _lines(stdin, console):
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                break
        else:
            session.turn(line)
    return EXIT_OK
