"""Rule expressions compiled to Python closures over the ApiCall itself, for the common part of CEL.

Why: cel-python interprets a condition in 100-250 µs, after turning the call into the CEL map the
conditions read (about 260 µs), measured with bench/alerts.py, where issue #14 asks for 50,000
calls/s with ten rules (2 µs a rule). Google's compiled CEL (cel-expr-python, 1.9 µs here) reads
the ApiCall message with proto types, where these rules read a map (enums by name, every field
present): the same rules would mean other things. So the expressions cel-python parses (its lark
tree, the same parser) are turned into closures that read the ApiCall's fields directly, for the
part of CEL rules are made of: `call.<field>...` of scalar fields, string, int and bool literals,
`== != < <= > >=`, `in [...]`, `&& || !`, `?:`, `+` of strings or ints, `has()`, `int()`,
`string()`, `size()`, `startsWith()`, `endsWith()`, `contains()`.

cel-python stays the reference and the judge of everything else. An expression with any other
construct is not compiled (`compile_expression` gives None: cel-python runs it). A compiled one
that meets a value it is not certain to treat as cel-python does (values of two types compared,
an integer out of CEL's range, `int()` of a text that is not plain digits, an enum number without
a name, a non-bool where a bool is needed) raises `Fallback`, and the caller runs cel-python on
that call. CEL's errors (a protocol detail that is not set, as a map key that is not there) are
`CelError`, absorbed by `&&` and `||` exactly as CEL absorbs them (`false && error` is false,
`true || error` is true). tests/unit/test_alerter_compiled.py holds the two to the same alerts
and counts on generated rules and calls.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
_INT_FIELD_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_COMPARISONS = frozenset({"relation_eq", "relation_ne", "relation_lt", "relation_le", "relation_gt", "relation_ge"})
_PASS_THROUGH = frozenset({"conditionalor", "conditionaland", "relation", "addition", "multiplication", "unary"})


class Unsupported(Exception):
    """A construct the compiled form does not have: cel-python runs the whole expression."""


class Fallback(Exception):
    """A value the compiled form is not certain to treat as cel-python does: run cel-python."""


class CelError(Exception):
    """A CEL error value (a map key that is not there): absorbed by && and || as CEL does."""


def compile_expression(text: str) -> Evaluator | None:
    """The expression as a closure over an ApiCall, or None when cel-python must run it."""
    try:
        return _Compiler().expr(celpy.Environment().compile(text))
    except Unsupported:
        return None


def _same_type(left: Value, right: Value) -> None:
    if type(left) is not type(right):
        raise Fallback


def _int_result(value: int) -> int:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise Fallback
    return value


def _compare(operator: str) -> Callable[[Value, Value], bool]:
    def equal(left: Value, right: Value) -> bool:
        _same_type(left, right)
        return left == right

    def not_equal(left: Value, right: Value) -> bool:
        _same_type(left, right)
        return left != right

    def ordered(test: Callable[[Any, Any], bool]) -> Callable[[Value, Value], bool]:
        def compare(left: Value, right: Value) -> bool:
            _same_type(left, right)
            if isinstance(left, bool):
                raise Fallback  # CEL orders bools; kept for cel-python
            return test(left, right)

        return compare

    return {
        "relation_eq": equal,
        "relation_ne": not_equal,
        "relation_lt": ordered(lambda a, b: a < b),
        "relation_le": ordered(lambda a, b: a <= b),
        "relation_gt": ordered(lambda a, b: a > b),
        "relation_ge": ordered(lambda a, b: a >= b),
    }[operator]


def _boolean(value: Value) -> bool:
    if not isinstance(value, bool):
        raise Fallback
    return value


class _Compiler:
    def expr(self, node: Any) -> Evaluator:
        if not is_tree(node, "expr"):
            return self.node(node)
        if len(node.children) == 1:
            return self.node(node.children[0])
        if len(node.children) != 3:
            raise Unsupported
        test, then, otherwise = (self.node(child) for child in node.children)

        def choose(call: calls_pb2.ApiCall) -> Value:
            return then(call) if _boolean(test(call)) else otherwise(call)

        return choose

    def node(self, node: Any) -> Evaluator:
        if not isinstance(node, lark.Tree):
            raise Unsupported
        data = node.data
        if data == "expr":
            return self.expr(node)
        if data in _PASS_THROUGH and len(node.children) == 1:
            return self.node(node.children[0])
        if data == "conditionalor" and len(node.children) == 2:
            return self.logical(node.children, absorbing=True)
        if data == "conditionaland" and len(node.children) == 2:
            return self.logical(node.children, absorbing=False)
        if data == "relation" and len(node.children) == 2:
            return self.relation(node.children[0], node.children[1])
        if data == "addition" and len(node.children) == 2 and is_tree(node.children[0], "addition_add"):
            return self.add(node.children[0].children[0], node.children[1])
        if data == "unary" and len(node.children) == 2 and is_tree(node.children[0], "unary_not"):
            operand = self.node(node.children[1])
            return lambda call: not _boolean(operand(call))
        if data == "member":
            return self.member(node)
        if data == "primary":
            return self.primary(node)
        raise Unsupported

    def logical(self, children: list[Any], absorbing: bool) -> Evaluator:
        """`||` (absorbing True) or `&&` (absorbing False), with CEL's error absorption."""
        left, right = self.node(children[0]), self.node(children[1])

        def combine(call: calls_pb2.ApiCall) -> Value:
            try:
                first: Value | None = _boolean(left(call))
            except CelError:
                first = None
            if first is absorbing:
                return absorbing
            try:
                second: Value | None = _boolean(right(call))
            except CelError:
                second = None
            if second is absorbing:
                return absorbing
            if first is None or second is None:
                raise CelError
            return not absorbing

        return combine

    def relation(self, operator_node: Any, right_node: Any) -> Evaluator:
        if not isinstance(operator_node, lark.Tree) or len(operator_node.children) != 1:
            raise Unsupported
        left = self.node(operator_node.children[0])
        if operator_node.data == "relation_in":
            items = self.literal_list(right_node)

            def contained(call: calls_pb2.ApiCall) -> Value:
                value = left(call)
                for item in items:
                    _same_type(value, item)
                return value in items

            return contained
        if operator_node.data not in _COMPARISONS:
            raise Unsupported
        compare = _compare(operator_node.data)
        right = self.node(right_node)
        return lambda call: compare(left(call), right(call))

    def add(self, left_node: Any, right_node: Any) -> Evaluator:
        left, right = self.node(left_node), self.node(right_node)

        def plus(call: calls_pb2.ApiCall) -> Value:
            first, second = left(call), right(call)
            _same_type(first, second)
            if isinstance(first, str):
                return first + str(second)
            if isinstance(first, bool):
                raise Fallback
            return _int_result(first + int(second))

        return plus

    def member(self, node: Any) -> Evaluator:
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

    def method(self, node: Any) -> Evaluator:
        target_node, name = node.children[0], str(node.children[1])
        arguments = node.children[2:]
        if name not in ("startsWith", "endsWith", "contains") or len(arguments) != 1:
            raise Unsupported
        exprlist = arguments[0]
        if not is_tree(exprlist, "exprlist") or len(exprlist.children) != 1:
            raise Unsupported
        target, argument = self.node(target_node), self.node(exprlist.children[0])
        test = {"startsWith": str.startswith, "endsWith": str.endswith, "contains": str.__contains__}[name]

        def call_method(call: calls_pb2.ApiCall) -> Value:
            value, operand = target(call), argument(call)
            if not isinstance(value, str) or not isinstance(operand, str):
                raise Fallback
            return bool(test(value, operand))

        return call_method

    def primary(self, node: Any) -> Evaluator:
        if len(node.children) != 1:
            raise Unsupported
        child = node.children[0]
        if is_tree(child, "literal"):
            value = _literal(child)
            return lambda call: value
        if is_tree(child, "paren_expr") and len(child.children) == 1:
            return self.expr(child.children[0])
        if is_tree(child, "ident_arg"):
            return self.function(child)
        raise Unsupported

    def function(self, node: Any) -> Evaluator:
        name = str(node.children[0])
        if len(node.children) != 2 or not is_tree(node.children[1], "exprlist"):
            raise Unsupported
        arguments = node.children[1].children
        if len(arguments) != 1:
            raise Unsupported
        if name == "has":
            return self.has(arguments[0])
        operand = self.node(arguments[0])
        if name == "int":

            def to_int(call: calls_pb2.ApiCall) -> Value:
                value = operand(call)
                if isinstance(value, bool):
                    raise Fallback
                if isinstance(value, int):
                    return value
                if not _PLAIN_INT.match(value):
                    raise Fallback  # cel-python's to judge (an error, or a form it reads)
                return int(value)

            return to_int
        if name == "string":

            def to_string(call: calls_pb2.ApiCall) -> Value:
                value = operand(call)
                if isinstance(value, bool):
                    raise Fallback
                return value if isinstance(value, str) else str(value)

            return to_string
        if name == "size":

            def size(call: calls_pb2.ApiCall) -> Value:
                value = operand(call)
                if not isinstance(value, str):
                    raise Fallback
                return len(value)

            return size
        raise Unsupported

    def has(self, node: Any) -> Evaluator:
        """has(call.a.b): the last field present in its (map) parent; every field is, but a
        protocol detail that is not set (a oneof member), and whatever is under one."""
        member = operand(node)
        if not is_tree(member, "member") or len(member.children) != 1 or not is_tree(member.children[0], "member_dot"):
            raise Unsupported
        path = _dotted(member.children[0])
        last = _resolve(path)[-1]
        parent = self.field(path[:-1], message=True) if len(path) > 2 else None

        def present(call: calls_pb2.ApiCall) -> Value:
            try:
                message: Any = call if parent is None else parent(call)
            except CelError:
                return False  # cel-python: has() through a key that is not there is false, not an error
            return bool(message.HasField(last.name)) if last.containing_oneof is not None else True

        return present

    def field(self, path: list[str], message: bool = False) -> Evaluator:
        """call.a.b... read from the message; a oneof member that is not set is a CelError. A
        message as the value only where `message` (has()'s parent): cel-python's otherwise."""
        fields = _resolve(path)
        if fields[-1].message_type is not None and not message:
            raise Unsupported
        steps = [(fd.name, fd.containing_oneof is not None) for fd in fields]
        leaf = fields[-1]
        convert = _converter(leaf) if leaf.message_type is None else None

        def read(call: calls_pb2.ApiCall) -> Any:
            value: Any = call
            for name, in_oneof in steps:
                if in_oneof and not value.HasField(name):
                    raise CelError
                value = getattr(value, name)
            return convert(value) if convert is not None else value

        return read

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


def _converter(leaf: FieldDescriptor) -> Callable[[Any], Value]:
    if leaf.is_repeated:
        raise Unsupported
    if leaf.enum_type is not None:
        names = {member.number: member.name for member in leaf.enum_type.values}
        return lambda number: names.get(number) or str(number)
    if leaf.type in _INT_FIELD_TYPES:
        return _int_result
    if leaf.type == FieldDescriptor.TYPE_BOOL:
        return bool
    if leaf.type == FieldDescriptor.TYPE_STRING:
        return str
    raise Unsupported  # bytes, doubles: cel-python's


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
