"""Find the vLLM server in a container and edit its command line (pure, no I/O).

Launch forms recognised:
  exec:      command/args contain `vllm serve` or `python -m vllm.entrypoints.openai.api_server`
             (also behind wrappers like `tini --`, `env`, `uv run`), split anyhow between
             command and args;
  args-only: no command, a vLLM image (its entrypoint is the server), flags in args;
  shell:     `sh -c "<script>"` whose script runs one of the exec forms; the flag is inserted
             into that simple command of the script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from kvmesh.core import limits

SHELLS = {"sh", "bash", "dash", "ash", "zsh", "ksh"}
_PY = re.compile(r"^python(\d+(\.\d+)*)?$")
_API_MODULES = {"vllm.entrypoints.openai.api_server"}
_CLI_MODULE = "vllm.entrypoints.cli.main"


def _base(word: str) -> str:
    return word.rsplit("/", 1)[-1]


def server_start(words: list[str]) -> Optional[int]:
    """Index of the first vLLM server flag/positional after the program, or None.

    `vllm serve MODEL --x` -> index of MODEL; `python3 -m vllm.entrypoints.openai.api_server --x`
    -> index of --x.
    """
    for i, w in enumerate(words):
        b = _base(w)
        if b == "vllm" and i + 1 < len(words) and words[i + 1] == "serve":
            return i + 2
        if _PY.match(b):
            j = i + 1
            while j < len(words) and words[j].startswith("-") and words[j] != "-m":
                j += 1  # interpreter options such as -u
            if j + 1 < len(words) and words[j] == "-m":
                mod = words[j + 1]
                if mod in _API_MODULES:
                    return j + 2
                if mod == _CLI_MODULE and j + 2 < len(words) and words[j + 2] == "serve":
                    return j + 3
    return None


def is_vllm_image(image: str) -> bool:
    """Images whose entrypoint is the vLLM OpenAI server (so args-only containers are vLLM)."""
    repo = image.split("@", 1)[0]
    if ":" in repo.rsplit("/", 1)[-1]:
        repo = repo.rsplit(":", 1)[0]
    name = repo.rsplit("/", 1)[-1].lower()
    return "vllm" in name and "router" not in name


# --- flags -------------------------------------------------------------------------------


@dataclass
class Flags:
    """What kvmesh needs to know from a vLLM command line."""

    tp: Optional[str] = None
    pp: Optional[str] = None
    dp: Optional[str] = None
    port: Optional[str] = None
    kv_transfer: Optional[str] = None  # the JSON string as given
    kv_transfer_dotted: dict = field(default_factory=dict)  # --kv-transfer-config.key=value
    has_config_file: bool = False


_ALIASES = {
    "--tensor-parallel-size": "tp", "-tp": "tp",
    "--pipeline-parallel-size": "pp", "-pp": "pp",
    "--data-parallel-size": "dp", "-dp": "dp",
    "--port": "port",
    "--kv-transfer-config": "kv_transfer",
}


def _norm(flag: str) -> str:
    # vLLM's FlexibleArgumentParser accepts --foo_bar as --foo-bar.
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def parse_flags(words: list[str]) -> Flags:
    f = Flags()
    i = 0
    while i < len(words):
        w = words[i]
        if not w.startswith("-"):
            i += 1
            continue
        name, eq, val = w.partition("=")
        name = _norm(name)
        if name.startswith("--kv-transfer-config."):
            key = name[len("--kv-transfer-config."):].replace("-", "_")
            if not eq:
                val = words[i + 1] if i + 1 < len(words) else ""
                i += 1
            f.kv_transfer_dotted[key] = val
        elif name == "--config":
            f.has_config_file = True
        elif name in _ALIASES:
            if not eq:
                val = words[i + 1] if i + 1 < len(words) else ""
                i += 1
            setattr(f, _ALIASES[name], val)
        i += 1
    return f


# --- shell scripts -----------------------------------------------------------------------


class ScriptError(ValueError):
    """The script cannot be edited safely; the message says why."""


@dataclass
class Word:
    text: str  # value after quote removal (dynamic parts left as written)
    start: int
    end: int  # offset just past the word in the script
    dynamic: bool  # contains $ expansion or command substitution


_OPERATOR_CHARS = ";&|()\n"
_PLAIN = re.compile(r"[^\s;&|()<>\\'\"`$]+")


def _is_operator(script: str, i: int) -> bool:
    c = script[i]
    if c not in _OPERATOR_CHARS:
        return False
    # `&>file` (bash) is a redirection, not the background operator.
    return not (c == "&" and script[i + 1:i + 2] == ">")


def split_script(script: str) -> list[list[Word]]:
    """Split a POSIX sh script into simple commands (lists of words).

    Enough of the shell grammar for launch scripts: quotes, backslashes, line continuations,
    operators. Here-documents and backquote substitutions are refused (ScriptError) because
    their bodies cannot be told apart from commands without a full parser.
    """
    if "<<" in script:
        raise ScriptError("the script uses a here-document")
    cmds: list[list[Word]] = [[]]
    i, n = 0, len(script)
    while i < n:
        c = script[i]
        if c in " \t":
            i += 1
            continue
        if c == "\\" and i + 1 < n and script[i + 1] == "\n":
            i += 2
            continue
        if c == "#" :
            while i < n and script[i] != "\n":
                i += 1
            continue
        if _is_operator(script, i):
            if cmds[-1]:
                cmds.append([])
            i += 1
            continue
        start = i
        buf: list[str] = []
        dynamic = False
        while i < n and script[i] not in " \t" and not (i > start and _is_operator(script, i)):
            m = _PLAIN.match(script, i)
            if m:  # fast path: a run of characters with no shell meaning
                buf.append(m.group())
                i = m.end()
                continue
            c = script[i]
            if c in "<>&":
                # Redirection operators (2>&1, >|, >>, &>) stay inside the word so that `&`
                # is not taken for a command separator.
                buf.append(c)
                i += 1
                if i < n and script[i] in "&|>":
                    buf.append(script[i])
                    i += 1
            elif c == "\\":
                if i + 1 < n and script[i + 1] == "\n":
                    i += 2
                    continue
                if i + 1 < n:
                    buf.append(script[i + 1])
                i += 2
            elif c == "'":
                j = script.find("'", i + 1)
                if j < 0:
                    raise ScriptError("the script has an unterminated single quote")
                buf.append(script[i + 1:j])
                i = j + 1
            elif c == '"':
                i += 1
                while i < n and script[i] != '"':
                    if script[i] == "\\" and i + 1 < n and script[i + 1] in '$`"\\\n':
                        if script[i + 1] != "\n":
                            buf.append(script[i + 1])
                        i += 2
                        continue
                    if script[i] == "`":
                        raise ScriptError("the script uses a backquote command substitution")
                    if script[i] == "$":
                        dynamic = True
                    buf.append(script[i])
                    i += 1
                if i >= n:
                    raise ScriptError("the script has an unterminated double quote")
                i += 1
            elif c == "`":
                raise ScriptError("the script uses a backquote command substitution")
            elif c == "$":
                dynamic = True
                if script.startswith("$(", i):
                    # Keep $(...) as one opaque word: find its balanced end.
                    depth, j = 0, i + 1
                    while j < n:
                        if script[j] == "(":
                            depth += 1
                        elif script[j] == ")":
                            depth -= 1
                            if depth == 0:
                                break
                        j += 1
                    if j >= n:
                        raise ScriptError("the script has an unbalanced $( ... )")
                    buf.append(script[i:j + 1])
                    i = j + 1
                else:
                    buf.append(c)
                    i += 1
            else:
                buf.append(c)
                i += 1
        cmds[-1].append(Word("".join(buf), start, i, dynamic))
    return [c for c in cmds if c]


@dataclass
class ScriptLaunch:
    words: list[Word]  # the vLLM simple command's words
    server_at: int  # index in words where vLLM's own arguments start


def _script_cost(script: str, found: Optional[ScriptLaunch]) -> int:
    # The key's text, plus each remembered Word (object, dict, text): an overestimate.
    return len(script) + 100 + (len(found.words) * 400 if found else 0)


@limits.cached(limits.ByteLRU(limits.SCRIPT_CACHE_BYTES), _script_cost)
def find_in_script(script: str) -> Optional[ScriptLaunch]:
    """The one vLLM invocation of a script; None when there is none; ScriptError if unsafe.

    Cached, bounded in bytes: every replica of a workload carries the same script (callers
    treat the result as read-only; errors are not cached and are recomputed, which is rare).
    Callers keep scripts under limits.MAX_SCRIPT_BYTES."""
    found = []
    for cmd in split_script(script):
        texts = [w.text for w in cmd]
        at = server_start(texts)
        if at is not None:
            found.append(ScriptLaunch(cmd, at))
    if not found:
        if "vllm" in script and ("$(" in script):
            raise ScriptError("the vLLM command is inside a command substitution")
        return None
    if len(found) > 1:
        raise ScriptError(f"the script starts vLLM {len(found)} times")
    return found[0]


_REDIRECT = re.compile(r"^[0-9]*(>>|>&|<&|&>|>\||<>|>|<)(.*)$")


def insert_into_script(script: str, launch: ScriptLaunch, flag: str, value: str) -> str:
    """Insert `flag 'value'` after the last argument of the script's vLLM command (before any
    trailing redirections such as `2>&1`, so the script still reads naturally)."""
    if "'" in value:
        raise ScriptError("the value to insert contains a single quote")
    last = None
    skip_target = False
    for w in launch.words:
        if skip_target:
            skip_target = False
            continue
        m = _REDIRECT.match(w.text)
        if m:
            skip_target = m.group(2) == ""  # `> file`: the next word is the target
            continue
        last = w
    end = (last or launch.words[-1]).end
    return script[:end] + f" {flag} '{value}'" + script[end:]
