"""Bounded decoding of YAML and JSON text into plain Python data.

Manifest and scenario files are untrusted input for a process that must not die or stall: a
file of a few hundred bytes can otherwise cost minutes and gigabytes (an alias bomb), or raise
RecursionError or ValueError from deep inside a library. Every limit here is checked before
the expensive step it protects:

- nesting depth: at most MAX_DEPTH levels of mappings and sequences. libyaml stops at 1000
  levels while scanning, and the node graph is measured before any Python object is built.
  json's C parser stops at Python's recursion limit (RecursionError, caught), and the text's
  brackets are measured once it parsed, before the data is used.
- aliases: YAML aliases are allowed (kubectl accepts them), but the nodes they stand for,
  counted as if copied, may add at most MAX_ALIAS_NODES to a document; recursive aliases are
  refused. Checked on the node graph, before construction.
- integers: number scalars longer than MAX_NUMBER_CHARS characters are refused before
  conversion (Python refuses more than 4300 digits with ValueError, and sexagesimal or binary
  forms have no such limit).
- duplicate keys in one mapping are errors (the API server's strict field validation refuses
  them too; a duplicate silently keeps the last value).

File sizes are bounded by the caller (sources.files), which reads at most MAX_FILE_BYTES.
Errors are DecodeError with a line and column where known.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from kube_network_policies.errors import InputError
from kube_network_policies.model.errors import shown

MAX_DEPTH = 64  # Kubernetes objects need about 20 (a List item's pod affinity terms)
MAX_ALIAS_NODES = 100_000  # per document, nodes added by aliases as if they were copied
MAX_NUMBER_CHARS = 100  # int64 needs 20; far beyond any value a Kubernetes field takes

_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"


class DecodeError(InputError):
    """Text that is not valid, or exceeds a limit. `line` and `column` are 1-based (0: unknown),
    `document` the 1-based YAML document (0: unknown, or JSON); `syntax` names the format of a
    syntax error ("YAML" or "JSON"), empty for a limit or a duplicate key."""

    def __init__(self, problem: str, line: int = 0, column: int = 0, document: int = 0, syntax: str = "") -> None:
        self.problem = problem
        self.line = line
        self.column = column
        self.document = document
        self.syntax = syntax
        super().__init__(self.describe())

    def describe(self) -> str:
        at = f" at line {self.line}, column {self.column}" if self.line and self.column else f" at line {self.line}" if self.line else ""
        if self.syntax:
            return f"invalid {self.syntax}{at}: {self.problem}"
        return f"{self.problem}{at}"


def _libyaml_limits_nesting() -> bool:
    """libyaml (0.2.5) refuses more than 1000 nesting levels while scanning, so its recursive
    composer cannot exhaust the C stack. Older builds may not: then use the Python composer."""
    if not getattr(yaml, "__with_libyaml__", False):
        return False
    depth = 1100  # just past libyaml's limit: a build without one recurses only this deep
    try:
        yaml.compose("[" * depth + "]" * depth, Loader=yaml.CSafeLoader)
    except yaml.YAMLError:
        return True
    return False


def _loader_class(base: Any) -> Any:
    class _Loader(base):  # type: ignore[misc]
        """SafeLoader (libyaml's when it is safe) with limits on numbers, duplicate keys and,
        for the Python composer, nesting while composing."""

        _depth = 0

        def compose_node(self, parent: Node | None, index: object) -> Node:  # only the Python composer calls this
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH + 1:
                    raise _limit(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
                node: Node = super().compose_node(parent, index)
                return node
            finally:
                self._depth -= 1

        def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
            if isinstance(node, MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    tag = key_node.tag
                    if tag == _MERGE_TAG:
                        continue  # merged keys may be overridden: that is what merging is for
                    # Plain string keys compare by their text (the usual case, and cheap);
                    # others by the constructed key, as the dict would (1 and true are one key).
                    key = key_node.value if tag == _STR_TAG else self.construct_object(key_node, deep=deep)
                    try:
                        first = seen.get(key)
                    except TypeError:
                        continue  # unhashable: the base class reports it
                    if first is not None:
                        raise ConstructorError(None, None, f"duplicate key {shown(key)} (first at line {first})", key_node.start_mark)
                    seen[key] = key_node.start_mark.line + 1
            result: dict[Any, Any] = super().construct_mapping(node, deep=deep)
            return result

        def construct_yaml_int(self, node: ScalarNode) -> int:
            _check_number(node)
            value: int = super().construct_yaml_int(node)
            return value

        def construct_yaml_float(self, node: ScalarNode) -> float:
            _check_number(node)
            value: float = super().construct_yaml_float(node)
            return value

    _Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
    _Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
    return _Loader


PYTHON_LOADER = _loader_class(yaml.SafeLoader)
LOADER = _loader_class(yaml.CSafeLoader) if _libyaml_limits_nesting() else PYTHON_LOADER


def _check_number(node: ScalarNode) -> None:
    if len(node.value) > MAX_NUMBER_CHARS:
        raise ConstructorError(None, None, f"number of {len(node.value)} characters refused (at most {MAX_NUMBER_CHARS})", node.start_mark)


def _limit(problem: str, mark: Any) -> ConstructorError:
    return ConstructorError(None, None, problem, mark)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def check_node_graph(root: Node) -> None:
    """Depth and alias expansion of a composed document, before anything is constructed.

    A document without shared collections (no alias to a mapping or sequence: the usual case)
    is a tree, and only its depth is measured. Aliases to scalars add one node each and no
    more than the text holds, so only a collection met twice sends the document to the full
    measure (`_check_shared`).
    """
    if isinstance(root, ScalarNode):
        return
    seen: set[int] = set()
    stack: list[tuple[Node, int]] = [(root, 1)]
    pop, push, add = stack.pop, stack.append, seen.add
    while stack:
        node, depth = pop()
        if id(node) in seen:
            _check_shared(root)
            return
        add(id(node))
        if depth > MAX_DEPTH:
            raise _limit(f"nested deeper than {MAX_DEPTH} levels", node.start_mark)
        depth += 1
        if node.__class__ is SequenceNode:
            for child in node.value:
                if child.__class__ is not ScalarNode:
                    push((child, depth))
        else:
            for key, value in node.value:
                if key.__class__ is not ScalarNode:
                    push((key, depth))
                if value.__class__ is not ScalarNode:
                    push((value, depth))


def _check_shared(root: Node) -> None:
    """The full measure for a document whose node graph shares collections (aliases): every
    node is visited once, and its expanded size (the tree a consumer walking the data would
    see) computed from its children's; a node that contains itself is refused.
    """
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    started: set[int] = set()
    distinct = 0
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        nid = id(node)
        if finished:
            kids = _children(node)
            size[nid] = 1 + sum(size[id(k)] for k in kids)
            height[nid] = 0 if isinstance(node, ScalarNode) else 1 + max((height[id(k)] for k in kids), default=0)
            if height[nid] > MAX_DEPTH:
                raise _limit(f"nested deeper than {MAX_DEPTH} levels", node.start_mark)
            if size[nid] - distinct > MAX_ALIAS_NODES:
                raise _limit(f"aliases expand to more than {MAX_ALIAS_NODES} additional nodes", node.start_mark)
            continue
        if nid in size:
            continue
        if nid in started:
            raise _limit("recursive alias (a node that contains itself)", node.start_mark)
        started.add(nid)
        distinct += 1
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)


def _mark_error(exc: yaml.YAMLError, document: int) -> DecodeError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
    problem = getattr(exc, "problem", None) or str(exc)
    limit = isinstance(exc, ConstructorError) and getattr(exc, "context", None) is None
    if problem == "exceeded maximum nesting depth":  # libyaml's own limit (1000 levels)
        problem, limit = f"nested deeper than {MAX_DEPTH} levels", True
    return DecodeError(shown(problem, 300, quote=False), line, column, document, syntax="" if limit else "YAML")


def load_yaml(text: str, loader_class: Any = None) -> list[Any]:
    """Every document of a YAML stream (None for empty ones); raises DecodeError.
    `loader_class`: LOADER (the default) or PYTHON_LOADER."""
    loader = (loader_class or LOADER)(text)
    docs: list[Any] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            check_node_graph(node)
            docs.append(loader.construct_document(node))
    except yaml.YAMLError as exc:
        raise _mark_error(exc, len(docs) + 1) from None
    except RecursionError:  # defence in depth: the checks above should make this unreachable
        raise DecodeError(f"nested deeper than {MAX_DEPTH} levels", document=len(docs) + 1) from None
    finally:
        loader.dispose()
    return docs


# --- JSON ---------------------------------------------------------------------------------------

_JSON_PLAIN_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


_LONG_NUMBER = re.compile(rf"-?[0-9]{{{MAX_NUMBER_CHARS + 1},}}")


class _LongNumber(Exception):
    pass


def _json_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _LongNumber
    return int(text)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return out


# Only ever run over text json.loads accepted (up to the point where it stopped), so every
# string is terminated and the scans are linear.
_JSON_TOKEN = re.compile(r'("(?:[^"\\]|\\.)*+")(\s*:)?|[\[\]{}]', re.DOTALL)


def _json_depth(text: str) -> tuple[int, int]:
    """(deepest nesting, offset of the first bracket beyond MAX_DEPTH) of valid JSON text."""
    # Strings out, escapes first: in valid JSON a backslash only starts an escape inside a
    # string, and str.replace pairs them left to right as a JSON reader does.
    bare = _JSON_PLAIN_STRING.sub("", text.replace("\\\\", "").replace('\\"', ""))
    brackets = _NOT_BRACKET.sub("", bare)
    if not brackets or max(accumulate(_DEPTH_STEP[c] for c in brackets)) <= MAX_DEPTH:
        return 0, 0
    depth = 0
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()
        if c in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                return depth, m.start()
        elif c in ("]", "}"):
            depth -= 1
    return depth, 0


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _locate_duplicate(text: str, key: str) -> int:
    """Offset of the first key that repeats one of its object (called once json.loads found one)."""
    stack: list[set[str] | None] = []
    for m in _JSON_TOKEN.finditer(text):
        tok = m.group()
        if tok in ("{", "["):
            stack.append(set() if tok == "{" else None)
        elif tok in ("}", "]"):
            if stack:
                stack.pop()
        elif m.group(2) and stack and stack[-1] is not None:
            name = json.loads(m.group(1))
            if name == key and name in stack[-1]:
                return m.start()
            stack[-1].add(name)
    return -1


def load_json(text: str) -> Any:
    """One JSON document; raises DecodeError."""
    try:
        data = json.loads(text, parse_int=_json_int, object_pairs_hook=_json_object)
    except json.JSONDecodeError as exc:
        raise DecodeError(shown(exc.msg, 300, quote=False), exc.lineno, exc.colno, syntax="JSON") from None
    except _Duplicate as dup:
        at = _locate_duplicate(text, dup.key)
        line, col = _line_col(text, at) if at >= 0 else (0, 0)
        raise DecodeError(f"duplicate key {shown(dup.key)}", line, col) from None
    except _LongNumber:
        m = _LONG_NUMBER.search(text)
        line, col = _line_col(text, m.start()) if m else (0, 0)
        raise DecodeError(f"number of more than {MAX_NUMBER_CHARS} characters refused", line, col) from None
    except RecursionError:
        # The C parser guards its recursion; anything this deep is far beyond MAX_DEPTH.
        raise DecodeError(f"nested deeper than {MAX_DEPTH} levels") from None
    deepest, at = _json_depth(text)
    if deepest > MAX_DEPTH:
        line, col = _line_col(text, at)
        raise DecodeError(f"nested deeper than {MAX_DEPTH} levels", line, col)
    return data
