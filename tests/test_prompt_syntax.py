"""prompt_syntax: A1111's prompt syntax (weights, BREAK, editing, alternation, extra-network tags).

The reference is AUTOMATIC1111/stable-diffusion-webui, ``modules/prompt_parser.py`` as of webui 1.6+
(``get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None,
use_old_scheduling=False)``, ``parse_prompt_attention``) and ``modules/extra_networks.py``
(``parse_prompt``). Its doctests are the first tables below: the same prompts and answers, as tuples
(one stale doctest is explained where it stands).

Oracles:
- schedules: lark itself (only here, never in ldm) runs A1111's grammar. Lark's Earley parser can
  derive some prompts several ways; it resolves by rule order and then by the order of Python sets,
  which in webui's pinned lark 1.1.2 depends on string hashes. `LarkOracle.answers` computes, from
  lark's parse forest, every answer lark's resolution can give under any order of those sets, and our
  answer must be one of them (when there is one, it is *the* answer).
- weights: `reference_attention`, A1111's algorithm written as plainly as possible (a list of entries,
  every range multiplied entry by entry, ``re.split`` for BREAK), against the module's run-based,
  linear version; floats must agree to the bit.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldmcli import prompt_syntax
from ldmcli.limits import MAX_PROMPT_CHARS
from ldmcli.prompt_syntax import BREAK, NetworkTag, extra_network_tags, parse_attention, prompt_schedule

# --- A1111's doctests --------------------------------------------------------------------------------

# get_learned_conditioning_prompt_schedules([p], 10)[0], webui 1.6+ modules/prompt_parser.py
A1111_SCHEDULES_10 = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    # A1111's doctest says [[5, 'a  c'], [10, 'a {b|d{ c']] ("# not handling this right now"). That
    # output is from before alternation existed, when "|" was text. Since webui 1.x "|" is no `plain`
    # character and lark finds no parse (it raises UnexpectedCharacters at the ":"; webui does not run
    # these doctests in CI), so webui uses the prompt whole. `test_stale_a1111_doctest` checks with lark.
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
]

# get_learned_conditioning_prompt_schedules([p], 10, 10)[0]: a hires-fix pass of 10 steps after 10
A1111_SCHEDULES_HIRES = [
    ("a [b:.5] c", [(10, "a b c")]),
    ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")]),
]

# parse_prompt_attention, webui 1.6+ modules/prompt_parser.py
A1111_ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_SCHEDULES_10)
def test_a1111_schedule_doctests(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


@pytest.mark.parametrize(("prompt", "expected"), A1111_SCHEDULES_HIRES)
def test_a1111_hires_schedule_doctests(prompt, expected):
    assert prompt_schedule(prompt, 10, hires_steps=10) == expected


@pytest.mark.parametrize(("prompt", "expected"), A1111_ATTENTION)
def test_a1111_attention_doctests(prompt, expected):
    result = parse_attention(prompt)
    assert result == expected
    assert [w for _, w in result] == [w for _, w in expected]  # == on floats: to the last bit
    assert all(type(w) is float for _, w in result)


def test_module_doctests():
    import doctest

    assert doctest.testmod(prompt_syntax).failed == 0


# --- cases derived from the grammar ----------------------------------------------------------------

# (prompt, steps, expected schedule). The grammar (webui 1.6+):
#   start: (prompt | /[][():]/+)*           prompt: (emphasized | scheduled | alternate | plain | WS)*
#   emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#   scheduled: "[" [prompt ":"] prompt ":" [WS] NUMBER [WS] "]"     alternate: "[" prompt ("|" [prompt])+ "]"
#   plain: /([^\\\[\]():|]|\\.)+/           NUMBER: lark's SIGNED_NUMBER; a failed parse uses the prompt whole
DERIVED_SCHEDULES = [
    # `when` without "." is a step, with "." a fraction; int() truncates; clamped to the steps; a
    # switch below step 1 is no switch point, and `step <= when` is then never true: always "after".
    ("[a:b:3]", 10, [(3, "a"), (10, "b")]),
    ("[a:b:0.35]", 10, [(3, "a"), (10, "b")]),
    ("[a:b:1.0]", 10, [(10, "a")]),  # 1.0 * 10 steps: the switch is after the last step
    ("[a:b:1]", 10, [(1, "a"), (10, "b")]),
    ("[a:b:99]", 10, [(10, "a")]),
    ("[a:b:0]", 10, [(10, "b")]),
    ("[a:b:-3]", 10, [(10, "b")]),
    ("[a:b:+2]", 10, [(2, "a"), (10, "b")]),
    ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),  # "1e1": no ".", so step 10
    ("[a:b:2.5e-1]", 20, [(5, "a"), (20, "b")]),  # has ".": a quarter of 20
    ("[a:b:1.]", 10, [(10, "a")]),  # "1." is a NUMBER (INT "." INT?)
    # webui: float("1e999") is inf and int(inf) raises OverflowError; we switch at the last step.
    ("[a:b:1e999]", 10, [(10, "a")]),
    # whitespace: only around the number, any \s (a newline too); inside the texts it is kept
    ("[ a : b :\n 2 \t]", 10, [(2, " a "), (10, " b ")]),
    ("[a:b:2 3]", 10, [(10, "[a:b:2 3]")]),  # "2 3" is no NUMBER: no scheduled, all text
    ("[a:b:c]", 10, [(10, "[a:b:c]")]),
    ("[a:b:c:1]", 10, [(10, "[a:b:c:1]")]),  # at most two prompts: three colons are text
    ("[::1]", 10, [(1, ""), (10, "")]),  # empty before and after
    ("[:1]", 10, [(1, ""), (10, "")]),
    ("[:]", 10, [(10, "[:]")]),  # no number: "[" ":" "]" are start-level text
    # emphasis stays text, for parse_attention; its ":" and brackets are not editing
    ("(a:1.5) [b]", 10, [(10, "(a:1.5) [b]")]),
    ("[(a:b):2]", 10, [(2, ""), (10, "(a:b)")]),
    ("[a:(b):2]", 10, [(2, "a"), (10, "(b)")]),
    ("[a:(2)]", 10, [(10, "[a:(2)]")]),  # the number part cannot hold a group
    # escapes are plain text and stay escaped (parse_attention unescapes them)
    ("\\[a:1]", 10, [(10, "\\[a:1]")]),
    ("[a\\:b:1]", 10, [(1, ""), (10, "a\\:b")]),
    ("[a\\|b]", 10, [(10, "[a\\|b]")]),
    # no parse at all: the prompt whole, even its valid editing
    ("a|b [c:3]", 10, [(10, "a|b [c:3]")]),  # "|" outside an alternation
    ("(a|b) [c:3]", 10, [(10, "(a|b) [c:3]")]),  # "|" in emphasis
    ("[a:b|c:1]", 10, [(10, "[a:b|c:1]")]),
    ("[a|b [c:3]", 10, [(10, "[a|b [c:3]")]),  # the alternation never closes
    ("[c:3] a\\", 10, [(10, "[c:3] a\\")]),  # a backslash at the end is no token
    ("[c:3] a\\\nb", 10, [(10, "[c:3] a\\\nb")]),  # nor one before a newline (lark's "." is no \n)
    ("[c:3] a\\\rb", 10, [(3, " a\\\rb"), (10, "c a\\\rb")]),  # before \r it is an escape
    # alternation: option (step - 1) % n, nested ones by the same global step, so in "[a|[b|c]]" the
    # inner one is only looked at on even steps, where it always shows "c"
    ("[a|[b|c]]", 4, [(1, "a"), (2, "c"), (3, "a"), (4, "c")]),
    ("[|]", 3, [(1, ""), (2, ""), (3, "")]),
    ("[a|b]", 1, [(1, "a")]),
    ("x[a:[b|c]:2]", 4, [(1, "xa"), (2, "xa"), (3, "xb"), (4, "xc")]),
    # every switch point counts, even those of branches not shown, and equal texts are not merged
    ("[[a:1]:2]", 10, [(1, ""), (2, ""), (10, "a")]),
    ("[[a:b:5]::2]", 10, [(2, "a"), (5, ""), (10, "")]),
    # stray brackets are text; lark's rule order makes the well-formed group the parse: the whole
    # prompt is tried as one `prompt` first, else the last item of `start` is a prompt when possible.
    ("[a:1]]", 10, [(1, "]"), (10, "a]")]),
    ("][a:1](", 10, [(1, "]("), (10, "]a(")]),
    ("(a [b:2]", 10, [(2, "(a "), (10, "(a b")]),
    # Here lark's answer depends on set order (webui's lark 1.1.2: on PYTHONHASHSEED): the trailing
    # "]:" of start can be one bracket run (then "[a:1" is text) or "]" closing "[a:1]" then ":".
    # Likewise the trailing "]:]" of "[: 1]:]". We take the group; both answers are lark's
    # (`test_ambiguous_cases_have_several_lark_answers`).
    ("[[a:1]:2", 10, [(1, "[:2"), (10, "[a:2")]),
    ("[: 1]:]", 10, [(1, ":]"), (10, ":]")]),
]


@pytest.mark.parametrize(("prompt", "steps", "expected"), DERIVED_SCHEDULES)
def test_derived_schedules(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


def test_hires_and_old_scheduling():
    # hires: a `when` without "." counts from the base steps, one with "." from 1.0 (A1111's offsets)
    assert prompt_schedule("[a:b:15]", 10, hires_steps=20) == [(5, "a"), (20, "b")]
    assert prompt_schedule("[a:b:5]", 10, hires_steps=20) == [(20, "b")]  # already past in pass one
    assert prompt_schedule("[a:b:1.25]", 10, hires_steps=20) == [(5, "a"), (20, "b")]
    # old scheduling: below 1 is a fraction, else a step, "." or not; hires_steps is then ignored
    assert prompt_schedule("[a:b:0.5]", 10, use_old_scheduling=True) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:1.0]", 10, use_old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:3]", 10, hires_steps=20, use_old_scheduling=True) == [(3, "a"), (10, "b")]
    with pytest.raises(ValueError):
        prompt_schedule("a", 0)


DERIVED_ATTENTION = [
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),  # no entry at all: A1111's [["", 1.0]]
    ("[a", [("a", 1 / 1.1)]),
    ("a)b]c:d", [("a)b]c:d", 1.0)]),  # stray closers and colons are text
    ("(a:0.5]", [("a:0.5]", 1.1)]),  # ":0.5]" is no weight (needs ")"), so "(" stays open
    ("( a : 1.5 )", [(" a ", 1.5)]),  # spaces around the weight belong to it (webui 1.6+)
    ("(a:-1)", [("a", -1.0)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # webui: ValueError; here the colon is text
    (":1.5)", [(":1.5)", 1.0)]),  # a weight with no "(" open is text
    ("\\\\(a)", [("\\", 1.0), ("a", 1.1)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash vanishes (its text is what follows it: nothing)
    ("((a)", [("a", 1.2100000000000002)]),
    ("[[a]]", [("a", 0.8264462809917354)]),
    ("([a)]", [("a", 1.0)]),  # ranges, not nesting: ")" closes "(" over "a", then "]" closes "["
    # BREAK: a word in capitals, spaces around it taken; parts around it are kept even if empty
    ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("a  BREAK\n b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), (BREAK, -1.0), ("", 1.0)]),
    ("aBREAK b, break", [("aBREAK b, break", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), (BREAK, -1.0), ("", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    # a BREAK in brackets is multiplied like text: webui's CLIP code then encodes the word "BREAK"
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    # merging is by equal weight only, and webui's CLIP code breaks on any piece "BREAK" of weight -1
    ("(BRE\\AK:-1)", [(BREAK, -1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), DERIVED_ATTENTION)
def test_derived_attention(prompt, expected):
    assert parse_attention(prompt) == expected


def test_break_is_a_typed_singleton():
    _, (marker, w2), _ = parse_attention("a BREAK b")
    assert marker is BREAK and marker is prompt_syntax.Break.BREAK and w2 == -1.0
    assert repr(marker) == "BREAK" and not isinstance(marker, str)


def test_split_breaks_spaces_are_re_spaces():
    # _split_breaks walks back over str.isspace() characters where A1111's regex takes \s
    chars = "".join(chr(c) for c in range(sys.maxunicode + 1))
    assert re.findall(r"\s", chars) == [c for c in chars if c.isspace()]


EXTRA_NETWORKS = [
    ("a cat", ("a cat", [])),
    ("<lora:film grain:0.8> cat", (" cat", [NetworkTag("lora", "film grain", ("0.8",))])),
    ("<a:b:c:d><e:f>", ("", [NetworkTag("a", "b", ("c", "d")), NetworkTag("e", "f")])),
    ("<lora:>x", ("<lora:>x", [])),  # nothing after the colon
    ("<lo ra:x>", ("<lo ra:x>", [])),  # kinds are word characters
    ("<lora::1:>", ("", [NetworkTag("lora", "", ("1", ""))])),
    ("<a:<b:c>>", (">", [NetworkTag("a", "<b", ("c",))])),
    ("<a:b", ("<a:b", [])),
]


@pytest.mark.parametrize(("prompt", "expected"), EXTRA_NETWORKS)
def test_extra_network_tags(prompt, expected):
    assert extra_network_tags(prompt) == expected


# --- the oracles ----------------------------------------------------------------------------------

A1111_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


class LarkOracle:
    """Every schedule A1111's grammar gives a prompt under lark's resolution, whatever the set order.

    Lark's ForestToParseTree takes, at each symbol node of the parse forest, the first derivation in
    the order (empty last, rule priority, rule order) that does not loop; derivations equal in that
    order come in set order. Here each such tie is followed, and each derivation evaluated as A1111's
    CollectSteps/AtStep do: a meaning is (switch points, alternates?, the text at every step).
    """

    def __init__(self, lark):
        from lark.parsers.earley_forest import TokenNode

        self.lark = lark
        self.TokenNode = TokenNode
        self.forest = lark.Lark(A1111_GRAMMAR, ambiguity="forest")
        self.resolved = lark.Lark(A1111_GRAMMAR)

    def answers(self, prompt, steps):
        try:
            root = self.forest.parse(prompt)
        except self.lark.exceptions.LarkError:
            return {((steps, prompt),)}
        self.steps, self.memo = steps, {}
        schedules = set()
        for points, alternates, texts in self._symbol(root, ()):
            switches = set(points) | {steps} | (set(range(1, steps + 1)) if alternates else set())
            schedules.add(tuple((s, texts[s - 1]) for s in sorted(switches)))
        return schedules

    def resolved_answer(self, prompt, steps):
        """What lark's own resolution gives (this lark version, this process)."""
        try:
            tree = self.resolved.parse(prompt)
        except self.lark.exceptions.LarkError:
            return ((steps, prompt),)
        points, alternates, texts = self._tree(tree)
        switches = set(points) | {steps} | (set(range(1, steps + 1)) if alternates else set())
        return tuple((s, texts[s - 1]) for s in sorted(switches))

    # meanings
    def _text(self, text):
        return (frozenset(), False, (text,) * self.steps)

    def _concat(self, meanings):
        return (
            frozenset().union(*(m[0] for m in meanings)),
            any(m[1] for m in meanings),
            tuple("".join(m[2][i] for m in meanings) for i in range(self.steps)),
        )

    def _when(self, number):
        v = float(number)
        v = v * self.steps if "." in number else v
        return min(self.steps, int(v))

    def _scheduled(self, prompts, number):
        before, after = (prompts[0], prompts[1]) if len(prompts) == 2 else (self._text(""), prompts[0])
        when = self._when(number)
        texts = tuple(before[2][i] if i + 1 <= when else after[2][i] for i in range(self.steps))
        points = before[0] | after[0] | ({when} if when >= 1 else set())
        return (points, before[1] or after[1], texts)

    def _alternate(self, options):
        texts = tuple(options[i % len(options)][2][i] for i in range(self.steps))
        return (frozenset().union(*(o[0] for o in options)), True, texts)

    # the resolved tree (lark's own answer)
    def _tree(self, tree):
        if isinstance(tree, self.lark.Token):
            return self._text(str(tree))
        kids = [self._tree(c) if c is not None else None for c in tree.children]
        if tree.data == "scheduled":
            prompts = [k for k, c in zip(kids, tree.children, strict=True) if isinstance(c, self.lark.Tree)]
            return self._scheduled(prompts, str(tree.children[-2]))
        if tree.data == "alternate":
            return self._alternate([k if k is not None else self._text("") for k in kids])
        return self._concat([k for k in kids if k is not None])

    # the forest: sets of meanings (symbol nodes) or of child sequences (intermediate nodes)
    def _symbol(self, node, path):
        key = (id(node), tuple(id(p) for p in path if (p.start, p.end) == (node.start, node.end)))
        if key in self.memo:
            return self.memo[key]
        if node in path:
            return None  # a loop: lark discards this derivation
        path = (*path, node)
        result = None
        for _, packed in itertools.groupby(node.children, key=lambda p: (p.is_empty, p.rule.order)):
            found = set()
            for p in packed:
                r = self._packed(p, path)
                if r is not None:
                    found |= r
            if found:
                result = found
                break
        self.memo[key] = result
        return result

    def _packed(self, packed, path):
        parts = []
        for child in (packed.left, packed.right):
            if child is None:
                continue
            if isinstance(child, self.TokenNode):
                parts.append({(("token", child.token.type, str(child.token)),)})
                continue
            r = self._symbol(child, path)
            if r is None:
                return None
            parts.append(r if child.is_intermediate else {(("symbol", child.s.name, m),) for m in r})
        sequences = {tuple(x for part in combo for x in part) for combo in itertools.product(*parts)}
        if packed.parent.is_intermediate:
            return sequences
        return {self._reduce(packed.rule.origin.name, seq) for seq in sequences}

    def _reduce(self, name, seq):
        if name == "scheduled":
            prompts = [m for kind, sym, m in seq if kind == "symbol"]
            number = next(m for kind, typ, m in seq if kind == "token" and typ == "NUMBER")
            return self._scheduled(prompts, number)
        if name == "alternate":
            first, more = (m for kind, _, m in seq if kind == "symbol")
            return self._alternate([first, *more[1]])
        if name.startswith("__alternate_plus"):
            # ("options", [option, ...]): "|" prompt, "|" alone, or more of these before
            options, rest = [], list(seq)
            if rest[0][0] == "symbol" and rest[0][1] == name:
                options = list(rest[0][2][1])
                rest = rest[1:]
            option = rest[1][2] if len(rest) > 1 else self._text("")
            return ("options", (*options, option))
        return self._concat([self._text(m) if kind == "token" else m for kind, _, m in seq])


@pytest.fixture(scope="module")
def lark_oracle():
    import lark  # the test extra installs it: a missing oracle fails these tests, it does not skip them

    return LarkOracle(lark)


def test_oracle_reproduces_a1111_doctests(lark_oracle):
    # the oracle's own check: it gives webui's doctest answers (one answer each: no ties)
    for prompt, expected in A1111_SCHEDULES_10:
        if prompt == "a [{b|d{:.5] c":
            continue
        assert lark_oracle.answers(prompt, 10) == {tuple(expected)}
        assert lark_oracle.resolved_answer(prompt, 10) == tuple(expected)


def test_stale_a1111_doctest(lark_oracle):
    with pytest.raises(lark_oracle.lark.exceptions.LarkError):
        lark_oracle.forest.parse("a [{b|d{:.5] c")


@pytest.mark.parametrize(("prompt", "steps", "expected"), DERIVED_SCHEDULES)
def test_derived_schedules_are_larks(lark_oracle, prompt, steps, expected):
    if "1e999" in prompt:  # webui raises OverflowError
        return
    assert tuple(expected) in lark_oracle.answers(prompt, steps)


def test_ambiguous_cases_have_several_lark_answers(lark_oracle):
    for prompt in ("[[a:1]:2", "[: 1]:]"):
        answers = lark_oracle.answers(prompt, 10)
        assert len(answers) == 2 and ((10, prompt),) in answers
        assert tuple(prompt_schedule(prompt, 10)) in answers


# Bracket soups: the characters that matter to the grammar, and the word BREAK.
SOUP = st.lists(
    st.one_of(st.sampled_from(list("ab :|()[]\\.0123456789")), st.sampled_from(["BREAK", " BREAK ", "\n", "e"])),
    max_size=40,
).map("".join)
SMALL_SOUP = st.lists(st.sampled_from(list("a :|()[]\\.12\n")), max_size=12).map("".join)

# Well-formed syntax (soups rarely close an alternation), then a few stray characters put in.
NUMBERS = st.sampled_from(["0", "1", "2", "3", "7", "99", ".5", "0.25", "1.0", "1.5", "2.", "-1", "+2", "1e1", " 2 "])
WORDS = st.sampled_from(["", "a", "b", "cat", " ", "x y", "\\(", "BREAK"])


def _constructs(inner):
    return st.one_of(
        inner.map(lambda x: f"({x})"),
        st.tuples(inner, NUMBERS).map(lambda t: f"({t[0]}:{t[1]})"),
        inner.map(lambda x: f"[{x}]"),
        st.tuples(inner, NUMBERS).map(lambda t: f"[{t[0]}:{t[1]}]"),
        st.tuples(inner, inner, NUMBERS).map(lambda t: f"[{t[0]}:{t[1]}:{t[2]}]"),
        st.tuples(inner, inner, NUMBERS).map(lambda t: f"[{t[0]}:{t[1]}:{t[0]}:{t[2]}]"),  # one too many
        st.lists(inner, min_size=2, max_size=4).map(lambda xs: "[" + "|".join(xs) + "]"),
        st.lists(inner, min_size=2, max_size=3).map("".join),
    )


def _with_strays(prompt_and_strays):
    prompt, strays = prompt_and_strays
    for position, char in strays:
        position %= len(prompt) + 1
        prompt = prompt[:position] + char + prompt[position:]
    return prompt


SYNTAX = st.tuples(
    st.recursive(WORDS, _constructs, max_leaves=6),
    st.lists(st.tuples(st.integers(0, 100), st.sampled_from(list("[]():|\\\n"))), max_size=2),
).map(_with_strays)
FUZZ = settings(max_examples=400, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.one_of(SMALL_SOUP, SYNTAX.filter(lambda p: len(p) <= 30)), steps=st.integers(1, 12))
def test_schedule_is_one_of_larks(lark_oracle, prompt, steps):
    answers = lark_oracle.answers(prompt, steps)
    assert lark_oracle.resolved_answer(prompt, steps) in answers  # the oracle agrees with lark
    assert tuple(prompt_schedule(prompt, steps)) in answers


def unescaped(text: str, char: str) -> bool:
    """Does `char` occur in `text` outside a backslash escape?"""
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == char:
            return True
        i += 1
    return False


def is_subsequence(small: str, big: str) -> bool:
    chars = iter(big)
    return all(c in chars for c in small)


@FUZZ
@given(prompt=st.one_of(SOUP, SYNTAX), steps=st.integers(1, 50))
def test_schedule_invariants(prompt, steps):
    schedule = prompt_schedule(prompt, steps)
    ends = [end for end, _ in schedule]
    assert ends == sorted(set(ends)) and ends[0] >= 1 and ends[-1] == steps
    assert all(is_subsequence(text, prompt) for _, text in schedule)  # text is only ever left out
    if "[" not in prompt:  # editing and alternation need a "["
        assert schedule == [(steps, prompt)]
    if schedule != [(steps, prompt)]:
        # it parsed, so every "|" was an alternation's, and none is left
        assert not any(unescaped(text, "|") for _, text in schedule)


# --- weights: the reference ---------------------------------------------------------------------

_REFERENCE_TOKENS = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\     # escapes, and a lone backslash
    | \( | \[                                 # openers
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)         # ":1.5)"
    | \) | \]                                 # closers
    | [^\\()\[\]:]+                           # text
    | :
    """,
    re.VERBOSE,
)


def reference_attention(text):
    """A1111's parse_prompt_attention, plainly: entries [text, weight], each range multiplied entry by
    entry when its bracket closes (then the open ones, "(" first), equal neighbours merged. One
    deviation, the module's: a weight float() rejects is a ":" of text where webui raises."""
    entries, rounds, squares = [], [], []

    def times(start, m):
        for entry in entries[start:]:
            entry[1] *= m

    pos = 0
    while pos < len(text):
        match = _REFERENCE_TOKENS.match(text, pos)
        token, weight = match.group(0), match.group("weight")
        pos = match.end()
        if weight is not None and rounds:
            try:
                value = float(weight)
            except ValueError:
                token, pos = ":", match.start() + 1
            else:
                times(rounds.pop(), value)
                continue
        if token.startswith("\\"):
            entries.append([token[1:], 1.0])
        elif token in ("(", "["):
            (rounds if token == "(" else squares).append(len(entries))
        elif token == ")" and rounds:
            times(rounds.pop(), 1.1)
        elif token == "]" and squares:
            times(squares.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(r"\s*\bBREAK\b\s*", token)):
                if i:
                    entries.append(["BREAK", -1])
                entries.append([part, 1.0])
    for start in rounds:
        times(start, 1.1)
    for start in squares:
        times(start, 1 / 1.1)
    if not entries:
        entries = [["", 1.0]]
    merged = [entries[0]]
    for entry in entries[1:]:
        if entry[1] == merged[-1][1]:
            merged[-1][0] += entry[0]
        else:
            merged.append(entry)
    return [(BREAK, -1.0) if t == "BREAK" and w == -1 else (t, float(w)) for t, w in merged]


@FUZZ
@given(text=st.one_of(SOUP, SYNTAX))
def test_attention_matches_reference(text):
    ours, reference = parse_attention(text), reference_attention(text)
    assert ours == reference
    assert [math.copysign(1, w) for _, w in ours] == [math.copysign(1, w) for _, w in reference]


@FUZZ
@given(text=SOUP)
def test_attention_invariants(text):
    result = parse_attention(text)
    assert result and all(isinstance(t, str) or t is BREAK for t, _ in result)
    assert all(w == -1.0 for t, w in result if t is BREAK)
    weights = [w for _, w in result]
    assert all(a != b for a, b in itertools.pairwise(weights))  # runs of equal weight are merged
    if not any(c.isdigit() for c in text):  # no weights written: only brackets, all positive
        assert all(w > 0 or t is BREAK or t == "BREAK" for t, w in result)
    if not set("()[]\\") & set(text) and "BREAK" not in text:  # nothing to read: the text, weight 1
        assert result == [(text, 1.0)]


@FUZZ
@given(text=st.lists(st.sampled_from(list("<>:ab _-1")), max_size=40).map("".join))
def test_extra_network_tags_match_plain_regex(text):
    # the module searches only up to the last ">" (linear time); the plain regex over everything
    tags = []

    def found(m):
        name, *args = m.group(2).split(":")
        tags.append(NetworkTag(m.group(1), name, tuple(args)))
        return ""

    assert extra_network_tags(text) == (re.sub(r"<(\w+):([^>]+)>", found, text), tags)


def test_log_space_weights_agree(monkeypatch):
    prompts = [
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        "((a)b[c(d:-2)e]f)(g:0)h[(i:1e400)j]",
        "(" * 300 + "".join(f"w{i})" for i in range(300)),
    ]
    exact = [parse_attention(p) for p in prompts]
    monkeypatch.setattr(prompt_syntax, "_EXACT_WEIGHT_WORK", -1)
    for prompt, expected in zip(prompts, exact, strict=True):
        approx = parse_attention(prompt)
        assert [t for t, _ in approx] == [t for t, _ in expected]
        for (_, a), (_, b) in zip(approx, expected, strict=True):
            assert a == pytest.approx(b, rel=1e-11) or (math.isnan(a) and math.isnan(b)) or a == b


# --- size: linear time, no recursion ------------------------------------------------------------

N = MAX_PROMPT_CHARS
HOSTILE = {
    "nested [": "[" * (N // 2) + "]" * (N // 2),
    "nested (": "(" * (N // 2) + ")" * (N // 2),
    "open": "([" * (N // 2),
    "nested edits": "[a:" * (N // 5) + "1]" * (N // 5),
    "nested alternations": "[a|" * (N // 4) + "]" * (N // 4),
    "nested text": "(" * (N // 3) + "a)" * (N // 3),
    "alternations": "[a|b]" * (N // 5),
    "periods": "".join(f"[{'|'.join('x' * k)}]" for k in (2, 3, 5, 7, 11, 13) for _ in range(300)),
    "spaces": " " * N,
    "breaks": "a BREAK " * (N // 8),
    "colons": ":" * N,
    "weights": ":1" * (N // 2),
    "tags": "<a:" * (N // 3),
    "tag word": "<" + "a" * (N - 1),
    "escapes": "\\(" * (N // 2),
    "soup": ("[a:(b:1.2)|c]]((:|[" * N)[:N],
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_prompts_take_linear_time(name):
    prompt = HOSTILE[name]
    assert len(prompt) <= MAX_PROMPT_CHARS
    for run in (
        lambda: prompt_schedule(prompt, 1000),
        lambda: parse_attention(prompt),
        lambda: extra_network_tags(prompt),
    ):
        start = time.perf_counter()
        run()
        assert time.perf_counter() - start < 3.0, name


def test_deep_nesting_reads_right():
    depth = 20_000
    assert prompt_schedule("[" * depth + "a" + "]" * depth, 10) == [(10, "[" * depth + "a" + "]" * depth)]
    assert prompt_schedule("[a:" * depth + "b" + ":5]" * depth, 10) == [(5, "a"), (10, "b")]
    ((text, weight),) = parse_attention("(" * depth + "a" + ")" * depth)
    assert text == "a" and weight == math.inf  # 1.1 ** 20000 overflows, in A1111 too
    assert parse_attention("[" * 100 + "a")[0][1] == reference_attention("[" * 100 + "a")[0][1]
