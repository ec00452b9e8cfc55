"""Find the vLLM server in a container and edit its command line (pure, no I/O).

Launch forms recognised:
  exec:      command/args contain `vllm serve` or `python -m vllm.entrypoints.openai.api_server`
             (also behind wrappers like `tini --`, `env`, `uv run`), split anyhow between
             command and args;
  args-only: no command, an image whose entrypoint is known to be the vLLM server
             (images.SERVER_IMAGES), flags in args; never decided from a name alone;
  shell:     `sh -c "<script>" [$0 ARGS...]` whose script runs one of the exec forms; the flag
             is inserted into that simple command of the script.
What vLLM is given is read as the container would run it (its effective argv): the kubelet's
`$(VAR)` and the script's `$VAR`/`${VAR}` from the container's literal env values, the args a
script receives through `"$@"`/`$*`/`${@}`, and the command line an `eval` builds. Words that
stay unknown at admission are kept in `Launch.unresolved` when they could hide flags.
`classify` tells a container's form; `parse_flags` reads what kvmesh needs from vLLM's
arguments; `insert_into_script` edits a shell script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from kvmesh.core import images, limits

SHELLS = {"sh", "bash", "dash", "ash", "zsh", "ksh"}
_PY = re.compile(r"^python(\d+(\.\d+)*)?$")
_API_MODULES = {"vllm.entrypoints.openai.api_server"}
_CLI_MODULE = "vllm.entrypoints.cli.main"


def _base(word: str) -> str:
    return word[word.rfind("/") + 1:]


def server_start(words: Sequence[str]) -> Optional[int]:
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


@dataclass(frozen=True, slots=True)
class Launch:
    """How a container starts the vLLM server, and where kvmesh's flag can go."""

    form: str  # exec | args-only | shell | unknown
    words: tuple[str, ...]  # vLLM's own arguments (after `vllm serve` / the module)
    script_field: Optional[str] = None  # "command" | "args" for shell form
    script_index: int = 0
    script: Optional[ScriptLaunch] = None
    script_error: Optional[str] = None  # shell form kvmesh cannot edit safely: why
    # Words of vLLM's command line unknown at admission that may expand to flags (a variable
    # with no literal value, a command substitution), as written.
    unresolved: tuple[str, ...] = ()
    flags: Flags = field(init=False, compare=False)  # parsed from words (read-only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "flags", parse_flags(self.words))


_CACHE_CHARS = 16 * 1024  # launch lines longer than this are classified anew each time
_CLASSIFIED = limits.ByteLRU(limits.SCRIPT_CACHE_BYTES)
_MISSING = object()


Env = tuple[tuple[str, str], ...]  # the container's literal env values, in order


def classify(command: Sequence[str], args: Sequence[str], image: str, env: Env = ()
             ) -> Optional[Launch]:
    """The container's launch form, or None when it does not run the vLLM server.

    Cached by the exact strings (a pure function of them, and the answer is immutable): every
    replica of a workload starts vLLM the same way, and a shell script costs a parse. The cache
    is bounded in bytes (each entry costed at ~10x its text, for the parsed words)."""
    command, args, env = tuple(command), tuple(args), tuple(env)
    size = sum(map(len, command)) + sum(map(len, args)) + len(image) + \
        sum(len(n) + len(v) for n, v in env)
    if size > _CACHE_CHARS:
        return _classify(command, args, image, env)
    key = (command, args, image, env)
    hit = _CLASSIFIED.get(key, _MISSING)
    if hit is _MISSING:
        hit = _classify(command, args, image, env)
        _CLASSIFIED.put(key, hit, 200 + 10 * size)
    return hit


def _classify(command: tuple[str, ...], args: tuple[str, ...], image: str, env: Env
              ) -> Optional[Launch]:
    argv = command + args
    at = server_start(argv)
    if at is not None:
        return _launch("exec", kubelet_expand(argv[at:], env))
    for i, w in enumerate(argv):
        if _base(w) in SHELLS:  # only the first shell word can carry the script
            at = _script_at(argv, i)
            if at is not None:  # argv[at + 1] is $0; the rest are "$@"
                return _shell_launch(argv[at], "command" if at < len(command) else "args",
                                     at if at < len(command) else at - len(command),
                                     kubelet_expand(argv[at + 2:], env), env)
            break
    if not command and images.is_server_image(image):
        return _launch("args-only", kubelet_expand(args, env))
    return None


def runs(command: Sequence[str], args: Sequence[str], image: str) -> str:
    """What a container runs, in a few words, for messages."""
    argv = list(command) + list(args)
    script = script_in(argv)
    if script is not None:
        first = script.strip().splitlines()[0] if script.strip() else ""
        return f"a shell script starting {first[:60]!r}"
    if not command:
        return f"args {' '.join(args[:4])[:80]!r} to the entrypoint of {image}"
    return repr(" ".join(argv[:6])[:100])


def _launch(form: str, words: tuple[str, ...], *rest, **kw) -> Launch:
    return Launch(form, words, *rest, unresolved=unresolved(words), **kw)


def unresolved(words: Sequence[str]) -> tuple[str, ...]:
    """Dynamic words that may expand to flags: not a flag itself (`--port=$P`), not the value
    right after a flag, not the model in first place."""
    out = []
    for i, w in enumerate(words):
        if "$" not in w or w.startswith("-") or i == 0:
            continue
        prev = words[i - 1]
        if prev.startswith("-") and "=" not in prev:
            continue
        out.append(w)
    return tuple(out)


_KUBELET_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def kubelet_expand(words: Sequence[str], env: Env) -> tuple[str, ...]:
    """`$(VAR)` in command/args as the kubelet expands them, from literal env values only."""
    if not env:
        return tuple(words)
    values = dict(env)
    return tuple(_KUBELET_REF.sub(lambda m: values.get(m.group(1), m.group(0)), w)
                 if "$(" in w else w for w in words)


def _script_at(argv: Sequence[str], shell: int) -> Optional[int]:
    """Index of the script in `sh [options] -c [options] [--] SCRIPT`: as the shell reads it,
    the first operand after the options once `-c` is among them. `-o NAME`/`-O NAME` (also
    inside a cluster such as `-eo`) and bash's `--rcfile FILE`/`--init-file FILE` take the next
    word; `--` or `-` ends the options (KubeRay starts pods with `bash -lc -- SCRIPT`)."""
    j, has_c = shell + 1, False
    while j < len(argv):
        w = argv[j]
        if w in ("--", "-"):
            j += 1
            break
        if w.startswith("--"):  # bash's long options: never -c
            j += 2 if w in ("--rcfile", "--init-file") else 1
            continue
        if len(w) < 2 or w[0] not in "-+":
            break  # the first operand
        has_c = has_c or (w[0] == "-" and "c" in w[1:])
        j += 1 + sum(ch in "oO" for ch in w[1:])
    return j if has_c and j < len(argv) else None


def script_in(argv: Sequence[str]) -> Optional[str]:
    """The `sh -c` script of a command line, if it has one (not parsed)."""
    for i, w in enumerate(argv):
        if _base(w) in SHELLS:
            at = _script_at(argv, i)
            return argv[at] if at is not None else None
    return None


def _shell_launch(script: str, where: str, index: int, positional: tuple[str, ...] = (),
                  env: Env = ()) -> Optional[Launch]:
    if len(script) > limits.MAX_SCRIPT_BYTES:  # never parsed: bounded work per admission
        why = (f"the script is {len(script):,} bytes; kvmesh parses scripts of at most "
               f"{limits.kib(limits.MAX_SCRIPT_BYTES)}")
        return Launch("shell", (), where, index, None, why) if "vllm" in script else None
    try:
        found = find_in_script(script, positional, env)
    except ScriptError as e:
        # A script that mentions vLLM but cannot be edited is a skip with the reason; one
        # that does not is not kvmesh's business.
        return Launch("shell", (), where, index, None, str(e)) if "vllm" in script else None
    if found is None:
        return None
    words = shell_words(found.words[found.server_at:], positional, env)
    if found.via_eval:
        return _launch("shell", words, where, index, None,
                       "the vLLM command is built by eval, whose text kvmesh cannot edit")
    return _launch("shell", words, where, index, found)


_POSITIONAL = {"$@", "$*", "${@}", "${*}"}
_SHELL_VAR = re.compile(r"^\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))$")


def shell_words(words: Sequence[Word], positional: Sequence[str], env: Env) -> tuple[str, ...]:
    """The words a shell passes for `words`: "$@" spliced, `$VAR`/`${VAR}` from literal env
    values (split on blanks unless quoted), the kubelet's `$(VAR)` expanded first."""
    values = dict(env)
    out: list[str] = []
    for w in words:
        text = kubelet_expand((w.text,), env)[0] if "$(" in w.text else w.text
        if text in _POSITIONAL:
            out.extend(positional)
            continue
        m = _SHELL_VAR.match(text)
        value = values.get(m.group(1) or m.group(2)) if m else None
        if value is None:
            out.append(text)
        elif w.quoted:
            out.append(value)
        else:
            out.extend(value.split())
    return tuple(out)


# --- flags -------------------------------------------------------------------------------


@dataclass
class Flags:
    """What kvmesh needs to know from a vLLM command line (read-only once parsed: a cached
    Launch shares it)."""

    tp: Optional[str] = None
    pp: Optional[str] = None
    dp: Optional[str] = None
    port: Optional[str] = None
    kv_transfer: Optional[str] = None  # the JSON string as given
    kv_transfer_dotted: dict = field(default_factory=dict)  # --kv-transfer-config.key=value
    # vLLM's own switch to LMCache's multiprocess connector (mp mode evidence)
    offload_backend: Optional[str] = None
    offload_size: Optional[str] = None
    has_config_file: bool = False
    offload_size: Optional[str] = None  # vLLM's native offloading (--kv-offloading-*)
    offload_backend: Optional[str] = None


_ALIASES = {
    "--tensor-parallel-size": "tp", "-tp": "tp",
    "--pipeline-parallel-size": "pp", "-pp": "pp",
    "--data-parallel-size": "dp", "-dp": "dp",
    "--port": "port",
    "--kv-transfer-config": "kv_transfer",
    "--kv-offloading-size": "offload_size",
    "--kv-offloading-backend": "offload_backend",
}


def _norm(flag: str) -> str:
    # vLLM's FlexibleArgumentParser accepts --foo_bar as --foo-bar.
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def parse_flags(words: Sequence[str]) -> Flags:
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
    quoted: bool = False  # had quotes (a shell does not split its expansions)


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
        elif c == "\\" and i + 1 < n and script[i + 1] == "\n":  # line continuation
            i += 2
        elif c == "#":  # a comment runs to the end of the line
            j = script.find("\n", i)
            i = n if j < 0 else j
        elif _is_operator(script, i):
            if cmds[-1]:
                cmds.append([])
            i += 1
        else:
            word = _read_word(script, i)
            cmds[-1].append(word)
            i = word.end
    return [c for c in cmds if c]


def _read_word(script: str, start: int) -> Word:
    """The word starting at `start`, with its quotes removed."""
    buf: list[str] = []
    dynamic = quoted = False
    i, n = start, len(script)
    while i < n and script[i] not in " \t" and not (i > start and _is_operator(script, i)):
        m = _PLAIN.match(script, i)
        if m:  # fast path: a run of characters with no shell meaning
            buf.append(m.group())
            i = m.end()
            continue
        c = script[i]
        if c in "<>&":
            # Redirection operators (2>&1, >|, >>, &>) stay inside the word so that `&` is
            # not taken for a command separator.
            j = i + 2 if i + 1 < n and script[i + 1] in "&|>" else i + 1
            buf.append(script[i:j])
            i = j
        elif c == "\\":
            if i + 1 < n and script[i + 1] != "\n":  # an escaped newline is a continuation
                buf.append(script[i + 1])
            i += 2
        elif c == "'":
            quoted = True
            j = script.find("'", i + 1)
            if j < 0:
                raise ScriptError("the script has an unterminated single quote")
            buf.append(script[i + 1:j])
            i = j + 1
        elif c == '"':
            quoted = True
            i, dynamic = _double_quoted(script, i, buf, dynamic)
        elif c == "`":
            raise ScriptError("the script uses a backquote command substitution")
        elif c == "$":
            dynamic = True
            j = _substitution_end(script, i) if script.startswith("$(", i) else i + 1
            buf.append(script[i:j])
            i = j
        else:
            buf.append(c)
            i += 1
    return Word("".join(buf), start, i, dynamic, quoted)


def _double_quoted(script: str, i: int, buf: list[str], dynamic: bool) -> tuple[int, bool]:
    """Read the double-quoted string opening at `i` into buf; the offset past its closing
    quote, and whether the word now holds an expansion."""
    i += 1
    n = len(script)
    while i < n and script[i] != '"':
        c = script[i]
        if c == "\\" and i + 1 < n and script[i + 1] in '$`"\\\n':
            if script[i + 1] != "\n":
                buf.append(script[i + 1])
            i += 2
            continue
        if c == "`":
            raise ScriptError("the script uses a backquote command substitution")
        if c == "$":
            dynamic = True
        buf.append(c)
        i += 1
    if i >= n:
        raise ScriptError("the script has an unterminated double quote")
    return i + 1, dynamic


def _substitution_end(script: str, i: int) -> int:
    """Offset just past the `)` closing the `$(` at `i` (kept as one opaque piece)."""
    depth = 0
    for j in range(i + 1, len(script)):
        if script[j] == "(":
            depth += 1
        elif script[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    raise ScriptError("the script has an unbalanced $( ... )")


@dataclass
class ScriptLaunch:
    words: list[Word]  # the vLLM simple command's words
    server_at: int  # index in words where vLLM's own arguments start
    via_eval: bool = False  # words of the command an `eval` builds (not editable text)
    # Derived once (classify caches the object): vLLM's arguments as text, and the offset
    # where insert_into_script puts the flag.
    server_words: tuple[str, ...] = field(init=False)
    insert_at: int = field(init=False)

    def __post_init__(self) -> None:
        self.server_words = tuple(w.text for w in self.words[self.server_at:])
        self.insert_at = _insert_offset(self.words)


def find_in_script(script: str, positional: Sequence[str] = (), env: Env = ()
                   ) -> Optional[ScriptLaunch]:
    """The one vLLM invocation of a script; None when there is none; ScriptError if unsafe."""
    found = []
    for cmd in split_script(script):
        texts = [w.text for w in cmd]
        at = server_start(texts)
        if at is not None:
            found.append(ScriptLaunch(cmd, at))
        elif texts[0] == "eval" and "vllm" in " ".join(texts):
            found.extend(_in_eval(texts[1:], positional, env))
    if not found:
        if _in_substitution(script):
            raise ScriptError("the vLLM command is inside a command substitution")
        return None
    if len(found) > 1:
        raise ScriptError(f"the script starts vLLM {len(found)} times")
    return found[0]


def _in_eval(texts: Sequence[str], positional: Sequence[str], env: Env) -> list[ScriptLaunch]:
    """The vLLM command an `eval` runs: its arguments expanded (literal env values, "$@"),
    joined and parsed again, as the shell does."""
    values = dict(env)
    quoted = " ".join(shell_quote(p) for p in positional)

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name in ("@", "*"):
            return quoted
        return values.get(name, m.group(0))
    text = _EXPANSION.sub(sub, " ".join(texts))
    try:
        cmds = split_script(text)
    except ScriptError:
        return []
    return [ScriptLaunch(cmd, at, via_eval=True) for cmd in cmds
            if (at := server_start([w.text for w in cmd])) is not None]


_EXPANSION = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*|[@*])\}|([A-Za-z_][A-Za-z0-9_]*|[@*]))")


def shell_quote(word: str) -> str:
    if word and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def _in_substitution(script: str) -> bool:
    """True when a `$( ... )` of the script runs the vLLM server (the kubelet's `$(VAR)` and
    other substitutions do not)."""
    i = script.find("$(")
    while i >= 0:
        try:
            end = _substitution_end(script, i)
        except ScriptError:
            return "vllm" in script[i:]
        body = script[i + 2:end - 1]
        try:
            if any(server_start([w.text for w in c]) is not None for c in split_script(body)):
                return True
        except ScriptError:
            pass
        i = script.find("$(", end)
    return False


_REDIRECT = re.compile(r"^[0-9]*(>>|>&|<&|&>|>\||<>|>|<)(.*)$")


def insert_into_script(script: str, launch: ScriptLaunch, flag: str, value: str) -> str:
    """Insert `flag 'value'` after the last argument of the script's vLLM command (before any
    trailing redirections such as `2>&1`, so the script still reads naturally)."""
    if "'" in value:
        raise ScriptError("the value to insert contains a single quote")
    end = launch.insert_at
    return script[:end] + f" {flag} '{value}'" + script[end:]


def _insert_offset(words: list[Word]) -> int:
    """Offset just past the command's last argument, redirections and their targets aside."""
    last = None
    skip_target = False
    for w in words:
        if skip_target:
            skip_target = False
            continue
        m = _REDIRECT.match(w.text)
        if m:
            skip_target = m.group(2) == ""  # `> file`: the next word is the target
            continue
        last = w
    return (last or words[-1]).end
