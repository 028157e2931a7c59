"""Cheap guards: what a rule's condition requires of `call.protocol` and `call.outcome`, read
from its CEL tree once at load and checked on the ApiCall itself, before any CEL runs.

Why: cel-python interprets a condition in 100-250 µs, and turning a call into the CEL map the
conditions read costs about 220 µs (measured here with bench/alerts.py), where issue #14 asks
for 50,000 calls/s with ten rules. Most rules name the protocol (and often the outcome) they are
about; a call of another protocol can never match them.

A guard is made of the conjuncts at the top of the condition (`G1 && G2 && rest`) that compare
one of those two fields with string literals: `call.protocol == "http"`, `"dns" ==
call.protocol`, `call.protocol in ["tcp", "tls"]`, `call.outcome == "OUTCOME_ERROR"`. Where a
call fails a guard, the condition is false whatever `rest` would give: CEL's `&&` is false as
soon as one side is false, even when the other is an error (its logical operators are
commutative over errors). So skipping the rule changes nothing but the time; where the call
passes, the whole condition runs as before. An outcome value the enum does not name is not
judged by the guard (the condition runs, and says what it says of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import celpy

from trawl.alerter.compiled import PLAIN_STRING, is_tree, operand
from trawl.v1 import calls_pb2

OUTCOME_NAMES = {value.number: value.name for value in calls_pb2.Outcome.DESCRIPTOR.values}
_GUARDED = ("protocol", "outcome")


@dataclass(frozen=True, slots=True)
class Guard:
    """The values a rule's condition allows for `call.protocol` and `call.outcome` (None: any)."""

    protocols: frozenset[str] | None = None
    outcomes: frozenset[str] | None = None

    def admits(self, call: calls_pb2.ApiCall) -> bool:
        """False only when the condition cannot hold for `call` (see the module docstring)."""
        if self.protocols is not None and call.protocol not in self.protocols:
            return False
        return self.outcomes is None or admits_outcome(self.outcomes, OUTCOME_NAMES.get(call.outcome, ""))


def admits_outcome(outcomes: frozenset[str], name: str) -> bool:
    """Whether an outcome guard lets a call with this outcome name through: a number the enum
    does not name ("") is not judged by the guard (the condition says what it says of it)."""
    return not name or name in outcomes


def guard_of(condition: str) -> Guard | None:
    """The guard of a condition cel-python accepts, or None when it has none."""
    tree = celpy.Environment().compile(condition)
    allowed: dict[str, frozenset[str]] = {}
    for term in _conjuncts(tree):
        found = _comparison(term)
        if found is None:
            continue
        name, values = found
        allowed[name] = allowed[name] & values if name in allowed else values
    if not allowed:
        return None
    return Guard(allowed.get("protocol"), allowed.get("outcome"))


def _conjuncts(tree: Any) -> list[Any]:
    """The operands of the `&&` chain at the top of the expression (the whole of it if none)."""
    node = tree
    # expr -> conditionalor -> conditionaland: only a condition without `?:` and `||` at its top.
    for data in ("expr", "conditionalor"):
        if not is_tree(node, data) or len(node.children) != 1:
            return []
        node = node.children[0]
    terms: list[Any] = []
    pending = [node]
    while pending:
        current = pending.pop()
        if is_tree(current, "conditionaland") and len(current.children) == 2:
            pending.extend(reversed(current.children))
        elif is_tree(current, "conditionaland") and len(current.children) == 1:
            pending.append(current.children[0])
        else:
            terms.append(current)
    return terms


def _comparison(term: Any) -> tuple[str, frozenset[str]] | None:
    """(field, allowed values) for `call.F == "x"`, `"x" == call.F` or `call.F in ["x", ...]`."""
    if not is_tree(term, "relation") or len(term.children) != 2:
        return None
    operator, right = term.children
    if not is_tree(operator, "relation_eq") and not is_tree(operator, "relation_in"):
        return None
    if len(operator.children) != 1:
        return None
    left = operator.children[0]
    if is_tree(operator, "relation_eq"):
        for path_side, literal_side in ((left, right), (right, left)):
            name = _guarded_field(path_side)
            text = _string_literal(literal_side)
            if name is not None and text is not None:
                return name, frozenset({text})
        return None
    name = _guarded_field(left)
    values = _string_list(right)
    if name is None or values is None:
        return None
    return name, values


def _guarded_field(node: Any) -> str | None:
    """`protocol` or `outcome` for the operand `call.protocol` / `call.outcome`."""
    member = operand(node)
    if not is_tree(member, "member") or len(member.children) != 1:
        return None
    dotted = member.children[0]
    if not is_tree(dotted, "member_dot") or len(dotted.children) != 2:
        return None
    inner, attribute = dotted.children
    root = operand(inner)
    if not is_tree(root, "member") or len(root.children) != 1 or not is_tree(root.children[0], "primary"):
        return None
    primary = root.children[0]
    if len(primary.children) != 1 or not is_tree(primary.children[0], "ident"):
        return None
    if str(primary.children[0].children[0]) != "call" or str(attribute) not in _GUARDED:
        return None
    return str(attribute)


def _primary(node: Any) -> Any:
    member = operand(node)
    if not is_tree(member, "member") or len(member.children) != 1 or not is_tree(member.children[0], "primary"):
        return None
    primary = member.children[0]
    return primary.children[0] if len(primary.children) == 1 else None


def _string_literal(node: Any) -> str | None:
    """The text of a plain quoted string literal (no escapes, prefixes or triple quotes)."""
    literal = _primary(node)
    if not is_tree(literal, "literal") or len(literal.children) != 1:
        return None
    found = PLAIN_STRING.match(str(literal.children[0]))
    if found is None:
        return None
    return found.group(1) if found.group(1) is not None else found.group(2)


def _string_list(node: Any) -> frozenset[str] | None:
    """The strings of a list literal made only of plain string literals."""
    listed = _primary(node)
    if not is_tree(listed, "list_lit"):
        return None
    if not listed.children:
        return frozenset()
    exprlist = listed.children[0]
    if len(listed.children) != 1 or not is_tree(exprlist, "exprlist"):
        return None
    values = [_string_literal(item) for item in exprlist.children]
    if any(value is None for value in values):
        return None
    return frozenset(value for value in values if value is not None)
