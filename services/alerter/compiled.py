"""Rule expressions compiled to Python functions over the ApiCall itself, for the common part of CEL.

Why: cel-python interprets a condition in 100-250 µs, after turning the call into the CEL map the
conditions read (about 260 µs), measured with bench/alerts.py, where issue #14 asks for 50,000
calls/s with ten rules (2 µs a rule). Google's compiled CEL (cel-expr-python, 1.9 µs here) reads
the ApiCall message with proto types, where these rules read a map (enums by name, every field
present): the same rules would mean other things. So the expressions cel-python parses (its lark
tree, the same parser) are turned into Python that reads the ApiCall's fields directly, for the
part of CEL rules are made of: `call.<field>...` of scalar fields, string, int and bool literals,
`== != < <= > >=`, `in [...]`, `&& || !`, `?:`, `+` of strings or ints, `has()`, `int()`,
`string()`, `size()`, `startsWith()`, `endsWith()`, `contains()`.

Each expression becomes the source of one function (straight-line statements, a local a
value), compiled once by Python. A first form made a closure a node: `call.protocol == "http"
&& int(call.status) >= 500` was a dozen Python calls, and `Alerter.evaluate` took 5.5 µs an HTTP
call with bench/alerts.py's ten rules (three of which an HTTP call meets), where the alerter was
the most expensive stage a call in `trawl up`. As functions: 3.7 µs (3.7 -> 3.2 µs a call over
every fixture's calls, bench/alerts.py). The types of fields and literals are known when
compiling, so the type checks cel-python's semantics need are written only where a type is not
(a `?:` of two types).

cel-python stays the reference and the judge of everything else. An expression with any other
construct is not compiled (`compile_expression` gives None: cel-python runs it), nor one nested
beyond what Python compiles. A compiled one that meets a value it is not certain to treat as
cel-python does (values of two types compared, an integer out of CEL's range, `int()` of a text
that is not plain digits, an enum number without a name, a non-bool where a bool is needed)
raises `Fallback`, and the caller runs cel-python on that call. CEL's errors (a protocol detail
that is not set, as a map key that is not there) are `CelError`, absorbed by `&&` and `||`
exactly as CEL absorbs them (`false && error` is false, `true || error` is true).
tests/unit/test_alerter_compiled.py holds the two to the same alerts and counts on generated
rules and calls.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import celpy
import lark
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from trawl.v1 import calls_pb2

Value = str | int | bool
Evaluator = Callable[[calls_pb2.ApiCall], Value]

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
PLAIN_STRING = re.compile(r'^(?:"([^"\\\n]*)"|\'([^\'\\\n]*)\')$')
_PLAIN_INT = re.compile(r"^-?[0-9]{1,18}$")
_LOCAL = re.compile(r"^v[0-9]+$")
# Integer fields whose values may pass CEL's int (int64): the others always fit.
_WIDE_INT_TYPES = frozenset({FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64})
_INT_FIELD_TYPES = _WIDE_INT_TYPES | frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_OPERATORS = {
    "relation_eq": "==",
    "relation_ne": "!=",
    "relation_lt": "<",
    "relation_le": "<=",
    "relation_gt": ">",
    "relation_ge": ">=",
}
_ORDERED = frozenset({"relation_lt", "relation_le", "relation_gt", "relation_ge"})
_PASS_THROUGH = frozenset({"conditionalor", "conditionaland", "relation", "addition", "multiplication", "unary"})
_METHODS = {"startsWith": "{0}.startswith({1})", "endsWith": "{0}.endswith({1})", "contains": "({1} in {0})"}


class Unsupported(Exception):
    """A construct the compiled form does not have: cel-python runs the whole expression."""


class Fallback(Exception):
    """A value the compiled form is not certain to treat as cel-python does: run cel-python."""


class CelError(Exception):
    """A CEL error value (a map key that is not there): absorbed by && and || as CEL does."""


def compile_expression(text: str) -> Evaluator | None:
    """The expression as a function of an ApiCall, or None when cel-python must run it."""
    try:
        return _Compiler().function(celpy.Environment().compile(text), text)
    except (Unsupported, RecursionError):
        return None


# What the generated code calls where a type is known only when it runs (a `?:` of two types).


def _same_type(left: Value, right: Value) -> None:
    if type(left) is not type(right):
        raise Fallback


def _same_types(value: Value, items: tuple[Value, ...]) -> None:
    for item in items:
        _same_type(value, item)


def _boolean(value: Value) -> bool:
    if type(value) is not bool:
        raise Fallback
    return value


def _not_bool(value: Value) -> None:
    if type(value) is bool:
        raise Fallback  # CEL orders bools; kept for cel-python


def _plus(first: Value, second: Value) -> Value:
    _same_type(first, second)
    if isinstance(first, str):
        return first + str(second)
    if isinstance(first, bool):
        raise Fallback
    total = first + int(second)
    if not _INT64_MIN <= total <= _INT64_MAX:
        raise Fallback
    return total


def _to_int(value: Value) -> int:
    if isinstance(value, bool):
        raise Fallback
    if isinstance(value, int):
        return value
    if not _PLAIN_INT.match(value):
        raise Fallback  # cel-python's to judge (an error, or a form it reads)
    return int(value)


def _to_string(value: Value) -> str:
    if isinstance(value, bool):
        raise Fallback
    return value if isinstance(value, str) else str(value)


def _size(value: Value) -> int:
    if not isinstance(value, str):
        raise Fallback
    return len(value)


def _text(value: Value) -> str:
    if not isinstance(value, str):
        raise Fallback
    return value


_RUNTIME: dict[str, Any] = {
    "Fallback": Fallback,
    "CelError": CelError,
    "_PLAIN_INT": _PLAIN_INT,
    "_INT64_MIN": _INT64_MIN,
    "_INT64_MAX": _INT64_MAX,
    "_same_type": _same_type,
    "_same_types": _same_types,
    "_boolean": _boolean,
    "_not_bool": _not_bool,
    "_plus": _plus,
    "_to_int": _to_int,
    "_to_string": _to_string,
    "_size": _size,
    "_text": _text,
}

# A compiled value: a Python expression without side effects (a local, a literal, a constant's
# name) and its type when known at compile time (str, int, bool; _MESSAGE for has()'s parent).
_MESSAGE = object
Operand = tuple[str, type | None]


class _Compiler:
    """Writes one function's statements, a lark node at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 1
        self.locals = 0
        self.constants: dict[str, object] = {}

    def function(self, tree: Any, text: str) -> Evaluator:
        result, _ = self.expr(tree)
        source = "\n".join(["def compiled_rule(call):", *self.lines, f"    return {result}", ""])
        namespace = dict(_RUNTIME, **self.constants)
        try:
            code = compile(source, f"<rule expression {text[:60]!r}>", "exec")
        except (SyntaxError, RecursionError, MemoryError):  # nested beyond what Python compiles
            raise Unsupported from None
        exec(code, namespace)  # the source is written here from a parsed tree: literals as repr()
        evaluator: Evaluator = namespace["compiled_rule"]
        return evaluator

    # Writing code.

    def line(self, text: str) -> None:
        self.lines.append("    " * self.depth + text)

    @contextlib.contextmanager
    def block(self, header: str) -> Iterator[None]:
        self.line(header)
        self.depth += 1
        written = len(self.lines)
        yield
        if len(self.lines) == written:
            self.line("pass")
        self.depth -= 1

    def local(self, expression: str) -> str:
        self.locals += 1
        name = f"v{self.locals}"
        self.line(f"{name} = {expression}")
        return name

    def constant(self, value: object) -> str:
        name = f"c{len(self.constants)}"
        self.constants[name] = value
        return name

    def require_bool(self, value: Operand) -> str:
        """`value` where a bool is needed: a Fallback for anything else."""
        text, kind = value
        if kind is None:
            return self.local(f"_boolean({text})")
        if kind is not bool:
            self.line("raise Fallback")
        return text

    def require_same(self, left: Operand, right: Operand) -> None:
        if left[1] is None or right[1] is None:
            self.line(f"_same_type({left[0]}, {right[0]})")
        elif left[1] is not right[1]:
            self.line("raise Fallback")

    # The grammar's nodes.

    def expr(self, node: Any) -> Operand:
        if not is_tree(node, "expr"):
            return self.node(node)
        if len(node.children) == 1:
            return self.node(node.children[0])
        if len(node.children) != 3:
            raise Unsupported
        test = self.require_bool(self.node(node.children[0]))
        self.locals += 1
        result = f"v{self.locals}"
        with self.block(f"if {test}:"):
            then = self.node(node.children[1])
            self.line(f"{result} = {then[0]}")
        with self.block("else:"):
            otherwise = self.node(node.children[2])
            self.line(f"{result} = {otherwise[0]}")
        return result, then[1] if then[1] is otherwise[1] else None

    def node(self, node: Any) -> Operand:
        if not isinstance(node, lark.Tree):
            raise Unsupported
        data = node.data
        if data == "expr":
            return self.expr(node)
        if data in _PASS_THROUGH and len(node.children) == 1:
            return self.node(node.children[0])
        if data == "conditionalor" and len(node.children) == 2:
            return self.logical(node, absorbing=True)
        if data == "conditionaland" and len(node.children) == 2:
            return self.logical(node, absorbing=False)
        if data == "relation" and len(node.children) == 2:
            return self.relation(node.children[0], node.children[1])
        if data == "addition" and len(node.children) == 2 and is_tree(node.children[0], "addition_add"):
            return self.add(node.children[0].children[0], node.children[1])
        if data == "unary" and len(node.children) == 2 and is_tree(node.children[0], "unary_not"):
            value = self.require_bool(self.node(node.children[1]))
            return self.local(f"not {value}"), bool
        if data == "member":
            return self.member(node)
        if data == "primary":
            return self.primary(node)
        raise Unsupported

    def logical(self, node: Any, absorbing: bool) -> Operand:
        """A chain of `||` (absorbing True) or `&&` (absorbing False), with CEL's error
        absorption: operands in order until one is the absorbing value, an error in one kept
        until the end (`a && b && c` as ((a && b) && c) gives it, in one loop, not nested)."""
        operands: list[Any] = []
        pending = [node]
        while pending:
            current = pending.pop()
            if is_tree(current, node.data) and len(current.children) == 2:
                pending.extend(reversed(current.children))
            else:
                operands.append(current)
        self.locals += 1
        result, failed = f"v{self.locals}", f"e{self.locals}"
        self.line(f"{failed} = False")
        with self.block("while True:"):
            for operand_node in operands:
                with self.block("try:"):
                    value = self.require_bool(self.node(operand_node))
                    if not _LOCAL.match(value):  # a literal: `is` wants a name
                        value = self.local(value)
                with self.block("except CelError:"):
                    self.line(f"{failed} = True")
                with self.block("else:"), self.block(f"if {value} is {absorbing}:"):
                    self.line(f"{result} = {absorbing}")
                    self.line("break")
            self.line(f"if {failed}: raise CelError")
            self.line(f"{result} = {not absorbing}")
            self.line("break")
        return result, bool

    def relation(self, operator_node: Any, right_node: Any) -> Operand:
        if not isinstance(operator_node, lark.Tree) or len(operator_node.children) != 1:
            raise Unsupported
        if operator_node.data == "relation_in":
            left = self.node(operator_node.children[0])
            items = self.literal_list(right_node)
            if left[1] is None:
                self.line(f"_same_types({left[0]}, {self.constant(items)})")
            elif any(type(item) is not left[1] for item in items):
                self.line("raise Fallback")
            return self.local(f"{left[0]} in {self.constant(frozenset(items))}"), bool
        operator = _OPERATORS.get(operator_node.data)
        if operator is None:
            raise Unsupported
        left = self.node(operator_node.children[0])
        right = self.node(right_node)
        self.require_same(left, right)
        if operator_node.data in _ORDERED:
            if left[1] is None:
                self.line(f"_not_bool({left[0]})")
            elif left[1] is bool:
                self.line("raise Fallback")
        return self.local(f"{left[0]} {operator} {right[0]}"), bool

    def add(self, left_node: Any, right_node: Any) -> Operand:
        first, second = self.node(left_node), self.node(right_node)
        kind = first[1] if first[1] is second[1] else None
        if kind is None or first[1] is None or second[1] is None:
            if first[1] is not None and second[1] is not None:
                self.line("raise Fallback")  # two types, known now
            return self.local(f"_plus({first[0]}, {second[0]})"), None
        if kind is bool:
            self.line("raise Fallback")
        total = self.local(f"{first[0]} + {second[0]}")
        if kind is int:
            self.line(f"if not _INT64_MIN <= {total} <= _INT64_MAX: raise Fallback")
        return total, kind

    def member(self, node: Any) -> Operand:
        if len(node.children) != 1:
            raise Unsupported
        child = node.children[0]
        if is_tree(child, "primary"):
            return self.primary(child)
        if is_tree(child, "member_dot"):
            return self.field(_dotted(child))
        if is_tree(child, "member_dot_arg"):
            return self.method(child)
        raise Unsupported

    def method(self, node: Any) -> Operand:
        target_node, name = node.children[0], str(node.children[1])
        arguments = node.children[2:]
        if name not in _METHODS or len(arguments) != 1:
            raise Unsupported
        exprlist = arguments[0]
        if not is_tree(exprlist, "exprlist") or len(exprlist.children) != 1:
            raise Unsupported
        target, argument = self.node(target_node), self.node(exprlist.children[0])
        texts = []
        for text, kind in (target, argument):
            if kind is None:
                text = self.local(f"_text({text})")
            elif kind is not str:
                self.line("raise Fallback")
            texts.append(text)
        return self.local(_METHODS[name].format(*texts)), bool

    def primary(self, node: Any) -> Operand:
        if len(node.children) != 1:
            raise Unsupported
        child = node.children[0]
        if is_tree(child, "literal"):
            value = _literal(child)
            return repr(value), type(value)
        if is_tree(child, "paren_expr") and len(child.children) == 1:
            return self.expr(child.children[0])
        if is_tree(child, "ident_arg"):
            return self.call(child)
        raise Unsupported

    def call(self, node: Any) -> Operand:
        """has(), int(), string(), size()."""
        name = str(node.children[0])
        if len(node.children) != 2 or not is_tree(node.children[1], "exprlist"):
            raise Unsupported
        arguments = node.children[1].children
        if len(arguments) != 1:
            raise Unsupported
        if name == "has":
            return self.has(arguments[0])
        if name not in ("int", "string", "size"):
            raise Unsupported
        text, kind = self.node(arguments[0])
        if kind is None:
            helper = {"int": "_to_int", "string": "_to_string", "size": "_size"}[name]
            return self.local(f"{helper}({text})"), str if name == "string" else int
        if kind is bool or (name == "size" and kind is not str):
            self.line("raise Fallback")
            return text, int if name != "string" else str
        if name == "int":
            if kind is int:
                return text, int
            self.line(f"if not _PLAIN_INT.match({text}): raise Fallback")  # cel-python's to judge
            return self.local(f"int({text})"), int
        if name == "string":
            return (text, str) if kind is str else (self.local(f"str({text})"), str)
        return self.local(f"len({text})"), int

    def has(self, node: Any) -> Operand:
        """has(call.a.b): the last field present in its (map) parent; every field is, but a
        protocol detail that is not set (a oneof member), and whatever is under one."""
        member = operand(node)
        if not is_tree(member, "member") or len(member.children) != 1 or not is_tree(member.children[0], "member_dot"):
            raise Unsupported
        path = _dotted(member.children[0])
        last = _resolve(path)[-1]

        def present(parent: str) -> str:
            return f"{parent}.HasField({last.name!r})" if last.containing_oneof is not None else "True"

        if len(path) <= 2:
            return self.local(present("call")), bool
        self.locals += 1
        result = f"v{self.locals}"
        with self.block("try:"):
            parent, _ = self.field(path[:-1], message=True)
        with self.block("except CelError:"):
            self.line(f"{result} = False")  # cel-python: has() through a key that is not there is false
        with self.block("else:"):
            self.line(f"{result} = {present(parent)}")
        return result, bool

    def field(self, path: list[str], message: bool = False) -> Operand:
        """call.a.b... read from the message; a oneof member that is not set is a CelError. A
        message as the value only where `message` (has()'s parent): cel-python's otherwise."""
        fields = _resolve(path)
        leaf = fields[-1]
        if leaf.message_type is not None and not message:
            raise Unsupported
        reading = "call"
        for fd in fields:
            if fd.containing_oneof is not None:
                if reading != "call":
                    reading = self.local(reading)
                self.line(f"if not {reading}.HasField({fd.name!r}): raise CelError")
            reading = f"{reading}.{fd.name}"
        value = self.local(reading)
        if leaf.message_type is not None:
            return value, _MESSAGE
        if leaf.is_repeated:
            raise Unsupported
        if leaf.enum_type is not None:
            names = {member.number: member.name for member in leaf.enum_type.values}
            return self.local(f"{self.constant(names)}.get({value}) or str({value})"), str
        if leaf.type in _INT_FIELD_TYPES:
            if leaf.type in _WIDE_INT_TYPES:
                self.line(f"if {value} > _INT64_MAX: raise Fallback")
            return value, int
        if leaf.type == FieldDescriptor.TYPE_BOOL:
            return value, bool
        if leaf.type == FieldDescriptor.TYPE_STRING:
            return value, str
        raise Unsupported  # bytes, doubles: cel-python's

    def literal_list(self, node: Any) -> tuple[Value, ...]:
        listed = operand(node)
        if is_tree(listed, "member") and len(listed.children) == 1:
            listed = listed.children[0]
        if is_tree(listed, "primary") and len(listed.children) == 1:
            listed = listed.children[0]
        if not is_tree(listed, "list_lit"):
            raise Unsupported
        if not listed.children:
            return ()
        exprlist = listed.children[0]
        if len(listed.children) != 1 or not is_tree(exprlist, "exprlist"):
            raise Unsupported
        values = []
        for item in exprlist.children:
            primary = operand(item)
            if is_tree(primary, "member") and len(primary.children) == 1:
                primary = primary.children[0]
            if not is_tree(primary, "primary") or not is_tree(primary.children[0], "literal"):
                raise Unsupported
            values.append(_literal(primary.children[0]))
        return tuple(values)


def _resolve(path: list[str]) -> list[FieldDescriptor]:
    """The fields of `call.a.b...` (path with "call" first), each a singular field of its parent."""
    if len(path) < 2 or path[0] != "call":
        raise Unsupported
    descriptor: Descriptor | None = calls_pb2.ApiCall.DESCRIPTOR
    fields = []
    for name in path[1:]:
        if descriptor is None:
            raise Unsupported
        fd = descriptor.fields_by_name.get(name)
        if fd is None or fd.is_repeated:
            raise Unsupported
        fields.append(fd)
        descriptor = fd.message_type
    return fields


def _dotted(node: Any) -> list[str]:
    names: list[str] = []
    current = node
    while True:
        if is_tree(current, "member_dot") and len(current.children) == 2:
            names.append(str(current.children[1]))
            current = current.children[0]
        elif is_tree(current, "member") and len(current.children) == 1:
            current = current.children[0]
        elif is_tree(current, "primary") and len(current.children) == 1 and is_tree(current.children[0], "ident"):
            names.append(str(current.children[0].children[0]))
            return names[::-1]
        else:
            raise Unsupported


def _literal(node: Any) -> Value:
    if len(node.children) != 1:
        raise Unsupported
    token = node.children[0]
    kind, text = getattr(token, "type", ""), str(token)
    if kind == "STRING_LIT":
        found = PLAIN_STRING.match(text)
        if found is None:
            raise Unsupported
        return found.group(1) if found.group(1) is not None else found.group(2)
    if kind == "INT_LIT" and _PLAIN_INT.match(text):
        return int(text)
    if kind == "BOOL_LIT":
        return text == "true"
    raise Unsupported


def operand(node: Any) -> Any:
    """The node under the single-child wrappers cel-python's grammar puts around an operand."""
    while (is_tree(node, "expr") or is_tree(node, *_PASS_THROUGH)) and len(node.children) == 1:
        node = node.children[0]
    return node


def is_tree(node: object, *data: str) -> bool:
    """A lark tree node of one of the rule names `data`."""
    return isinstance(node, lark.Tree) and node.data in data
