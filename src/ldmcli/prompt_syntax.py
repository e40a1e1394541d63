"""AUTOMATIC1111's prompt syntax: weights, BREAK, prompt editing, alternation, extra-network tags.

The reference semantics are A1111 webui's ``modules/prompt_parser.py`` (1.6 and later:
``parse_prompt_attention`` and ``get_learned_conditioning_prompt_schedules``, whose doctests our
tests repeat) and ``modules/extra_networks.py`` (``parse_prompt``). This is our own code: standard
library only, no lark, no torch. Every string is accepted (none raises), nothing recurses, and the time
is linear in the prompt's length (prompts are at most ``limits.MAX_PROMPT_CHARS`` characters), times
the number of distinct texts for a schedule, which is what it returns.

The syntax, for users
---------------------
Weights (`parse_attention`)::

    (word)        attention to "word" x 1.1; ((word)) x 1.21, and so on
    (word:1.5)    x 1.5 (any number: (word:0.5) weakens it)
    [word]        x 1/1.1
    \\( \\) \\[ \\] \\\\   the literal characters ( ) [ ] \\
    a BREAK b     "b" starts a new chunk of 75 tokens (BREAK in capitals, as a separate word)

A bracket left open weights the rest of the prompt; a stray closing bracket is text.

Prompt editing and alternation (`prompt_schedule`), over a generation of N steps::

    [to:when]         "to" is added after step `when`
    [from::when]      "from" is removed after step `when`
    [from:to:when]    "from" is replaced by "to" after step `when`
    [a|b|c]           a at step 1, b at step 2, c at step 3, a at step 4, ... ([a|] alternates a and nothing)

`when` with a "." is a fraction of the steps ("[cat:dog:0.25]" with 20 steps: cat for steps 1-5, dog
from step 6); without one it is a step number. They nest: "a[b:[c:d:2]:1]e" is "abe" at step 1,
"ace" at step 2 and "ade" after. The texts of a schedule keep their weight syntax, which
`parse_attention` reads afterwards. Weights that read like editing stay weights: "[(a:2):3]".

Extra networks (`extra_network_tags`): ``<lora:name:0.8>``, ``<hypernet:name>``; the tags are cut out
of the prompt and handed over as (kind, name, arguments).

How malformed prompts read (as in A1111)
---------------------------------------
- A well-formed ``[...]`` or ``(...)`` group is interpreted; a bracket that does not close, or closes
  the wrong kind, or a ``:`` that is not part of a group, is plain text: "((a][:b:c [d:3]" edits only
  "[d:3]".
- A prompt that cannot be read at all, because of a ``|`` outside an alternation ("a|b") or a ``\\``
  at its very end or before a newline, has no editing at all: its one text is the prompt itself.

Where we differ from webui, and why
-----------------------------------
- Webui parses schedules with lark's Earley parser; some prompts have several parses (a bracket can be
  text or a group), and lark picks by rule order, then, among equals, by the order of Python sets. With
  webui's pinned lark 1.1.2 those sets hash strings, so "[[a:1]:2" edits "[a:1]" in some webui
  processes and not in others (PYTHONHASHSEED). Wherever lark's rule order decides, we give its
  answer; where only that set order would, we interpret every well-formed group, which is one of the
  answers lark gives (the tests check both against the parse forest of lark 1.3; lark 1.1.2 shared
  fewer forest nodes, and may leave to set order a few choices that 1.3 makes by rule order).
- Where webui raises we answer: a `when` too large for a float ("[a:1e999]", webui: OverflowError)
  switches at the last step; a malformed weight such as "(a:1.2.3)" (webui: ValueError) is text, the
  ``(`` weighting it 1.1 as an ordinary bracket.
- A1111's doctest ``"a [{b|d{:.5] c" -> [[5, 'a  c'], [10, 'a {b|d{ c']]`` predates alternation: with
  the grammar of webui 1.6+ (``|`` is not text), webui cannot parse that prompt and returns it whole,
  and so do we.
- Weights are A1111's floats to the last bit (products taken in A1111's order), except in prompts
  of thousands of nested brackets each holding text (over ``_EXACT_WEIGHT_WORK`` updates, which
  A1111 makes one by one: quadratic time). There they are computed in log space, in linear time, and
  agree with A1111's to about 12 significant digits.
"""

from __future__ import annotations

import bisect
import enum
import math
import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "BREAK",
    "AttentionPiece",
    "Break",
    "NetworkTag",
    "extra_network_tags",
    "parse_attention",
    "prompt_schedule",
]


# --- weights --------------------------------------------------------------------------------------


class Break(enum.Enum):
    """The type of `BREAK`, the one marker `parse_attention` puts between chunks."""

    BREAK = "BREAK"

    def __repr__(self) -> str:
        return "BREAK"


BREAK: Final = Break.BREAK
"""A chunk break in `parse_attention`'s output: the piece ``(BREAK, -1.0)``."""

AttentionPiece = tuple[str | Literal[Break.BREAK], float]
"""A piece of `parse_attention`'s output: (text, weight), or (BREAK, -1.0) for a chunk break."""

ROUND_MULTIPLIER: Final = 1.1
SQUARE_MULTIPLIER: Final = 1 / 1.1

# A1111's tokens, in its order of preference: an escape (backslash and one of ()[]\, or a lone
# backslash), an opening bracket, ":weight)" (group 1: the number), a closing bracket, a run of text,
# a lone colon. They cover every character.
_ATTENTION_TOKEN = re.compile(r"\\[()\[\]\\]?|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK_WORD = re.compile(r"\bBREAK\b")
_SPACES = re.compile(r"\s*")

# Above this many weight updates (runs of text times the brackets closing over them), weights are
# computed in log space (module docstring). Exact work this size takes about 0.1 s.
_EXACT_WEIGHT_WORK = 2_000_000


def _split_breaks(text: str) -> list[str]:
    """``re.split(r"\\s*\\bBREAK\\b\\s*", text)`` in linear time (that pattern is quadratic on long runs
    of spaces): each BREAK takes the spaces around it, those before it back to the previous split."""
    parts: list[str] = []
    start = 0  # where the current part starts (the end of the previous separator)
    for m in _BREAK_WORD.finditer(text):
        cut = m.start()
        while cut > start and text[cut - 1].isspace():  # str.isspace is re's \s (a test checks)
            cut -= 1
        parts.append(text[start:cut])
        start = _SPACES.match(text, m.end()).end()  # type: ignore[union-attr]  # \s* always matches
    parts.append(text[start:])
    return parts


def parse_attention(text: str) -> list[AttentionPiece]:
    """The prompt as pieces of text and their weights, A1111's ``parse_prompt_attention``.

    Adjacent pieces of equal weight are merged; the result is never empty (``""`` gives
    ``[("", 1.0)]``). A chunk break is the piece ``(BREAK, -1.0)``: exactly the pieces webui's CLIP
    code treats as breaks (text "BREAK" with weight -1). A BREAK inside brackets has its -1 multiplied
    like any text, so webui encodes it as the word "BREAK", and so it comes back here as the text
    ``("BREAK", -1.1)``.

    >>> parse_attention("a (red:1.3) [cat], BREAK dog")
    [('a ', 1.0), ('red', 1.3), (' ', 1.0), ('cat', 0.9090909090909091), (',', 1.0), (BREAK, -1.0), ('dog', 1.0)]
    """
    # A1111's list of [text, weight], kept as runs of entries that share every multiplication (a run
    # ends at every bracket and every multiplication): the multiplications then cost runs, not entries.
    run_texts: list[list[str]] = []
    run_weights: list[float] = []
    run_open = False  # may the next entry of weight 1 join the last run?
    round_stack: list[int] = []  # the run index where each open "(" started
    square_stack: list[int] = []
    events: list[tuple[int, int, float]] = []  # (first run, end run, multiplier), in A1111's order
    work = 0

    def add(piece: str, weight: float = 1.0) -> None:
        nonlocal run_open
        if run_open and weight == 1.0:
            run_texts[-1].append(piece)
            return
        run_texts.append([piece])
        run_weights.append(weight)
        run_open = weight == 1.0

    def multiply(start: int, multiplier: float) -> None:
        nonlocal run_open, work
        events.append((start, len(run_texts), multiplier))
        work += len(run_texts) - start
        run_open = False

    pos, end = 0, len(text)
    while pos < end:
        m = _ATTENTION_TOKEN.match(text, pos)
        assert m is not None  # the alternatives cover every character
        token, weight = m.group(0), m.group(1)
        if weight is not None and round_stack:
            try:
                value = float(weight)
            except ValueError:  # "(a:1.2.3)": webui raises; read the colon as text (module docstring)
                token = ":"
            else:
                multiply(round_stack.pop(), value)
                pos = m.end()
                continue
        pos = pos + len(token)
        if token[0] == "\\":
            add(token[1:])
        elif token == "(" or token == "[":
            (round_stack if token == "(" else square_stack).append(len(run_texts))
            run_open = False
        elif token == ")" and round_stack:
            multiply(round_stack.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_stack:
            multiply(square_stack.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_split_breaks(token)):
                if i:
                    add("BREAK", -1.0)
                    run_open = False
                add(part)
    for start in round_stack:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_stack:
        multiply(start, SQUARE_MULTIPLIER)

    if work <= _EXACT_WEIGHT_WORK:
        for start, stop, multiplier in events:
            for r in range(start, stop):
                run_weights[r] *= multiplier
    else:
        run_weights = _log_space_weights(run_weights, events)

    if not run_texts:
        return [("", 1.0)]
    merged: list[tuple[str, float]] = []
    texts, current = ["".join(run_texts[0])], run_weights[0]
    for pieces, weight in zip(run_texts[1:], run_weights[1:], strict=True):
        if weight == current:
            texts.extend(pieces)
        else:
            merged.append(("".join(texts), current))
            texts, current = ["".join(pieces)], weight
    merged.append(("".join(texts), current))
    return [(BREAK, -1.0) if t == "BREAK" and w == -1 else (t, float(w)) for t, w in merged]


def _log_space_weights(initial: list[float], events: list[tuple[int, int, float]]) -> list[float]:
    """The runs' weights, each the product of its initial weight and the multipliers whose ranges cover
    it, in linear time: magnitudes as sums of logs, signs, zeros and infinities counted apart."""
    n = len(initial)
    logs = [0.0] * (n + 1)
    counts = {"neg": [0] * (n + 1), "zero": [0] * (n + 1), "inf": [0] * (n + 1)}
    for start, stop, multiplier in events:
        if multiplier < 0:
            counts["neg"][start] += 1
            counts["neg"][stop] -= 1
        if multiplier == 0:
            kind = "zero"
        elif math.isinf(multiplier):
            kind = "inf"
        else:
            logs[start] += math.log(abs(multiplier))
            logs[stop] -= math.log(abs(multiplier))
            continue
        counts[kind][start] += 1
        counts[kind][stop] -= 1
    weights: list[float] = []
    log_sum, neg, zero, inf = 0.0, 0, 0, 0
    for r in range(n):
        log_sum += logs[r]
        neg += counts["neg"][r]
        zero += counts["zero"][r]
        inf += counts["inf"][r]
        sign = -1.0 if (neg % 2) != (initial[r] < 0) else 1.0
        if zero and inf:
            weights.append(math.nan)
        elif zero:
            weights.append(sign * 0.0)
        elif inf:
            weights.append(sign * math.inf)
        else:
            try:
                weights.append(sign * math.exp(log_sum))
            except OverflowError:
                weights.append(sign * math.inf)
    return weights


# --- prompt editing and alternation ----------------------------------------------------------------


class _Edit:
    """``[before:after:when]`` (before is None for ``[after:when]``)."""

    __slots__ = ("after", "before", "when")

    def __init__(self, before: list[_Piece] | None, after: list[_Piece], when: int) -> None:
        self.before, self.after, self.when = before, after, when


class _Alternation:
    """``[a|b|...]``: option (step - 1) % len at each step."""

    __slots__ = ("options",)

    def __init__(self, options: list[list[_Piece]]) -> None:
        self.options = options


_Piece = str | list | _Edit | _Alternation  # type: ignore[type-arg]
"""Text, a sequence of pieces (a group that stays text, nested without copying), or a node."""

_SPECIAL = "[]():|"
# A1111's `plain` terminal: text and backslash escapes. "." is not a newline: "\" before a newline,
# or at the end, is no token at all, and the prompt cannot be parsed.
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
# A1111's `[WHITESPACE] NUMBER [WHITESPACE]` before the closing "]" (NUMBER is lark's SIGNED_NUMBER).
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*")


class _Unparseable(Exception):
    """The prompt has no parse (A1111's lark raises): it is used whole."""


class _Group:
    """A bracket being read: its opening character and the parts between its separators."""

    __slots__ = ("last_has_group", "opener", "parts", "separators")

    def __init__(self, opener: str) -> None:
        self.opener = opener
        self.parts: list[list[_Piece]] = [[]]
        self.separators = ""  # the ":" and "|" read so far, in order
        self.last_has_group = False  # does the current part hold a bracket group (so it is no `when`)?

    def as_text(self, closer: str = "") -> list[_Piece]:
        """The group as text, its inner groups kept (as a piece: linear time however deep they nest)."""
        pieces: list[_Piece] = [self.opener]
        for i, part in enumerate(self.parts):
            if i:
                pieces.append(self.separators[i - 1])
            pieces.append(part)
        if closer:
            pieces.append(closer)
        return pieces


def _parse(prompt: str, when_of: _WhenRule) -> list[_Piece]:
    """The prompt as text and editing/alternation nodes; raises _Unparseable as A1111's lark does."""
    top: list[_Piece] = []
    stack: list[_Group] = []

    def fail_open_groups() -> None:
        # A group that cannot close is text, and so is every group around it (a bracket inside a group
        # must be a group). A "|" is text nowhere, so a failed group with one fails the whole prompt.
        for group in stack:
            if "|" in group.separators:
                raise _Unparseable
            top.extend(group.as_text())
        stack.clear()

    def emit(pieces: list[_Piece], is_group: bool) -> None:
        if stack:
            stack[-1].parts[-1].extend(pieces)
            stack[-1].last_has_group |= is_group
        else:
            top.extend(pieces)

    pos, end = 0, len(prompt)
    while pos < end:
        c = prompt[pos]
        if c not in _SPECIAL:
            m = _PLAIN.match(prompt, pos)
            if m is None:  # a backslash at the end or before a newline
                raise _Unparseable
            emit([m.group(0)], False)
            pos = m.end()
            continue
        pos += 1
        group = stack[-1] if stack else None
        if c == "(" or c == "[":
            stack.append(_Group(c))
        elif group is None:
            if c == "|":
                raise _Unparseable
            top.append(c)  # a stray ":", ")" or "]"
        elif c == "|":
            if group.opener != "[" or ":" in group.separators:
                raise _Unparseable
            group.separators += "|"
            group.parts.append([])
            group.last_has_group = False
        elif c == ":":
            limit = 1 if group.opener == "(" else 2
            if "|" in group.separators or len(group.separators) >= limit:
                fail_open_groups()
                top.append(c)
            else:
                group.separators += ":"
                group.parts.append([])
                group.last_has_group = False
        elif (c == ")") != (group.opener == "("):  # closes the wrong kind of group
            fail_open_groups()
            top.append(c)
        else:
            closed = _close(stack.pop(), c, when_of)
            if closed is None:
                stack.append(group)
                fail_open_groups()
                top.append(c)
            else:
                emit(closed, True)
    fail_open_groups()
    return top


def _close(group: _Group, closer: str, when_of: _WhenRule) -> list[_Piece] | None:
    """The pieces a group that closes here stands for, or None if it is no well-formed group."""
    parts, separators = group.parts, group.separators
    if not separators or group.opener == "(":  # emphasis: its brackets stay, for parse_attention
        return [group.as_text(closer)]
    if separators[0] == "|":
        return [_Alternation(parts)]
    # [after:when] or [before:after:when]: the last part must be the number, nothing else
    last = parts[-1]
    if group.last_has_group or not last:
        return None
    m = _WHEN.fullmatch("".join(last))  # type: ignore[arg-type]  # only str pieces without groups
    if m is None:
        return None
    before = parts[0] if len(parts) == 3 else None
    return [_Edit(before, parts[-2], when_of(m.group(1)))]


class _WhenRule:
    """A1111's conversion of a `when` to a step (``CollectSteps.scheduled``)."""

    def __init__(self, steps: int, int_offset: int, float_offset: float, old: bool) -> None:
        self.steps, self.int_offset, self.float_offset, self.old = steps, int_offset, float_offset, old

    def __call__(self, number: str) -> int:
        v = float(number)
        if self.old:
            v = v * self.steps if v < 1 else v
        elif "." in number:
            v = (v - self.float_offset) * self.steps
        else:
            v = v - self.int_offset
        if math.isinf(v):  # webui: OverflowError (module docstring)
            return self.steps if v > 0 else 0
        return min(self.steps, int(v))


def prompt_schedule(
    prompt: str,
    steps: int,
    *,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[tuple[int, str]]:
    """The prompt's texts over a generation: [(end_at_step, text), ...], A1111's schedule.

    Each text holds up to and including its step; the steps are increasing and the last is the number
    of steps. There is one entry per step at which anything may switch (every editing step of the
    prompt, and every step if it alternates), even where the text does not change, as in A1111.
    `hires_steps` and `use_old_scheduling` are A1111's: with `hires_steps` the schedule is for a
    hires-fix pass of that many steps, where a `when` without "." counts from the first pass's `steps`
    and one with "." from 1.0 ("[a:b:1.5]" switches halfway through the second pass);
    `use_old_scheduling` is webui's "Use old prompt editing timelines" (a `when` below 1 is a fraction).
    Any prompt is accepted; ValueError if `steps` (or `hires_steps`) is below 1.

    >>> prompt_schedule("a [b:c:.5] d", 10)
    [(5, 'a b d'), (10, 'a c d')]
    """
    if steps < 1 or (hires_steps is not None and hires_steps < 1):
        raise ValueError(f"steps must be at least 1, not {steps} (hires_steps {hires_steps})")
    if hires_steps is None or use_old_scheduling:
        rule = _WhenRule(steps, 0, 0.0, use_old_scheduling)
    else:
        rule = _WhenRule(hires_steps, steps, 1.0, False)
    total = rule.steps
    try:
        pieces = _parse(prompt, rule)
    except _Unparseable:
        return [(total, prompt)]

    switches = {total}
    whens: set[int] = set()  # every edit's step: the text at a step depends on which it is past
    periods: set[int] = set()  # every alternation's number of options
    pending: list[list[_Piece]] = [pieces]
    while pending:
        for piece in pending.pop():
            if isinstance(piece, list):
                pending.append(piece)
            elif isinstance(piece, _Edit):
                whens.add(piece.when)
                if piece.when >= 1:
                    switches.add(piece.when)
                pending.append(piece.after)
                if piece.before is not None:
                    pending.append(piece.before)
            elif isinstance(piece, _Alternation):
                periods.add(len(piece.options))
                pending.extend(piece.options)
    if periods:
        switches.update(range(1, total + 1))

    # Steps in the same state (past the same edits, at the same option of every alternation) have
    # the same text: "[a|b]" over 1000 steps renders two texts, not a thousand.
    sorted_whens, sorted_periods = sorted(whens), sorted(periods)
    texts: dict[tuple[int, tuple[int, ...]], str] = {}
    schedule: list[tuple[int, str]] = []
    for step in sorted(switches):
        state = (bisect.bisect_left(sorted_whens, step), tuple((step - 1) % k for k in sorted_periods))
        if state not in texts:
            texts[state] = _text_at(pieces, step)
        schedule.append((step, texts[state]))
    return schedule


def _text_at(pieces: list[_Piece], step: int) -> str:
    """The text at a step (A1111's ``AtStep``), without recursion."""
    out: list[str] = []
    stack = [iter(pieces)]
    while stack:
        for piece in stack[-1]:
            if isinstance(piece, str):
                out.append(piece)
                continue
            if isinstance(piece, list):
                stack.append(iter(piece))
            elif isinstance(piece, _Edit):
                stack.append(iter((piece.before or []) if step <= piece.when else piece.after))
            else:
                stack.append(iter(piece.options[(step - 1) % len(piece.options)]))
            break
        else:
            stack.pop()
    return "".join(out)


# --- extra networks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkTag:
    """An extra-network tag ``<kind:name:arg:...>``: ``<lora:film grain:0.8>`` is
    NetworkTag("lora", "film grain", ("0.8",)). The arguments are A1111's, as written."""

    kind: str
    name: str
    args: tuple[str, ...] = ()


_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


def extra_network_tags(text: str) -> tuple[str, list[NetworkTag]]:
    """The prompt without its extra-network tags, and the tags in order (A1111's ``parse_prompt``).

    A tag is ``<`` word characters ``:`` anything but ``>`` ``>``; its part after the first colon is
    split on ":" into the name and the arguments. Nothing else of the prompt changes.

    >>> extra_network_tags("a cat <lora:film:0.8>")
    ('a cat ', [NetworkTag(kind='lora', name='film', args=('0.8',))])
    """
    # No tag ends after the last ">": searching only up to it keeps the regex linear (after a "<" with
    # no ">" anywhere behind it, `[^>]+` would scan to the end and back again, for every such "<").
    last = text.rfind(">")
    if last < 0:
        return text, []
    tags: list[NetworkTag] = []

    def found(m: re.Match[str]) -> str:
        name, *args = m.group(2).split(":")
        tags.append(NetworkTag(m.group(1), name, tuple(args)))
        return ""

    return _NETWORK_TAG.sub(found, text[: last + 1]) + text[last + 1 :], tags
