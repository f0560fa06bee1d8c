"""A YAML reader for config files that refuses hostile or malformed input quickly, with one line.

`yaml.safe_load` is safe against code execution but not against inputs that cost time or memory
or silently lose data: alias bombs ("billion laughs", including the merge-key variant that makes
PyYAML copy mappings exponentially), nesting deep enough for a RecursionError, non-UTF-8 bytes,
files of many megabytes, duplicated keys (the last one silently wins) and several documents in
one file. `load_yaml_config` checks all of these before or while composing the node graph, so
nothing is ever expanded, and raises `YamlRefused` carrying one line that names the file, the
line and the fix. Value semantics are those of `yaml.safe_load` (YAML 1.1: `1e-3` stays a string).

Only the standard library and PyYAML are imported here: this runs before anything heavy loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

MAX_BYTES = 1 << 20  # 1 MiB; the shipped configs are a few hundred bytes to 2 KB
MAX_DEPTH = 32  # nested mappings/lists, counting the top-level mapping as 1 (configs use 3 or 4)
MAX_ALIASES = 100  # `*name` references in one file
MAX_NODES = 10_000  # values in the document with every alias expanded (configs have ~100)

_MERGE_TAG = "tag:yaml.org,2002:merge"
# Characters YAML 1.1 allows in a stream (what PyYAML's reader accepts), so a stray control
# character is reported here with its line and column instead of as a multi-line ReaderError.
_NOT_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class YamlRefused(ValueError):
    """The config file was refused; the message is one line naming the file, the line and the fix."""

    def __init__(self, message: str):
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read one YAML document whose top level is a mapping; {} for an empty file."""
    p = Path(path)
    text = _read_text(p)
    bad = _NOT_PRINTABLE.search(text)
    if bad:
        line, col = _line_col(text, bad.start())
        raise YamlRefused(f"{p}: line {line}, column {col}: character {bad.group()!r} is not allowed in YAML; "
                          f"delete it (the file must be plain UTF-8 text)")
    loader = _loader(text)
    try:
        data = loader.get_single_data()
    except YamlRefused as err:
        raise YamlRefused(f"{p}: {err}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        if "maximum nesting depth" in str(err.problem):  # libyaml's own limit (1000), seen while scanning ahead
            raise YamlRefused(f"{p}: {_at(mark)}: values are nested more than {MAX_DEPTH} levels deep; "
                              f"a config needs a few levels, so flatten it") from None
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = _short(err.problem or err.context or "unreadable")
        raise YamlRefused(f"{p}: not valid YAML{where}: {problem}; fix the YAML there") from None
    except yaml.YAMLError as err:  # e.g. a ReaderError, which carries no line
        raise YamlRefused(f"{p}: not valid YAML: {' '.join(str(err).split())}; fix the file") from None
    except RecursionError:  # a safety net: the depth limit should make this unreachable
        raise YamlRefused(f"{p}: nested too deeply to read; a config needs only a few levels") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string"}.get(type(data), type(data).__name__)
        raise YamlRefused(f"{p}: line {loader.root_line}: the top level must be a mapping of sections "
                          f"(model:, parallel:, ...), got {kind}; write `section: {{key: value}}` lines")
    return data


def _read_text(p: Path) -> str:
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise YamlRefused(_too_big(p, size))
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # the file may have grown since stat
    except OSError as err:
        raise YamlRefused(f"{p}: cannot be read ({err.strerror or err}); check the path and its permissions") from None
    if len(raw) > MAX_BYTES:
        raise YamlRefused(_too_big(p, len(raw)))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        col = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        hint = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise YamlRefused(f"{p}: line {line}, column {col} (byte offset {err.start}): byte 0x{raw[err.start]:02x} "
                          f"is not UTF-8{hint}; save the file as UTF-8") from None


def _too_big(p: Path, size: int) -> str:
    return (f"{p}: {size} bytes is over the {MAX_BYTES} byte limit for a config file (configs are a few KB); "
            f"pass the config itself, not a data or log file")


def _line_col(text: str, index: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}" if mark is not None else "line ?"


class _BudgetComposer(Composer):
    """Composer that tracks depth, alias count and the expanded size of every node while composing.

    Sizes and heights are those of the fully expanded tree, so an alias costs what it would cost
    if written out, and a file is refused at the first alias that would take it over a budget:
    nothing is expanded and no recursion goes deeper than MAX_DEPTH + a few frames.
    """

    def __init__(self) -> None:
        super().__init__()
        self.root_line = 1
        self._depth = 0  # depth of the node being composed (the root is 1)
        self._deepest = 0  # deepest expanded depth seen inside the node being composed
        self._nodes = 0  # expanded node count so far
        self._aliases = 0
        self._stats: dict[Node, tuple[int, int]] = {}  # anchored node -> (expanded size, expanded height)
        self._own_pairs: dict[Node, list[tuple[Node, Node]]] = {}  # mapping -> its pairs before merge keys

    def get_single_node(self) -> Node | None:
        self.get_event()  # STREAM-START
        document = None
        if not self.check_event(yaml.StreamEndEvent):
            self.root_line = self.peek_event().start_mark.line + 1
            document = self.compose_document()
        if not self.check_event(yaml.StreamEndEvent):
            mark = self.get_event().start_mark
            raise YamlRefused(f"{_at(mark)}: a second YAML document starts here; a config file holds one "
                              f"document, so remove the `---` or `...` separator and merge or split the file")
        self.get_event()  # STREAM-END
        return document

    def compose_document(self) -> Node:
        node = super().compose_document()
        self._stats = {}
        return node

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        depth = self._depth + 1
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is None:
                return super().compose_node(parent, index)  # raises "found undefined alias"
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlRefused(f"{_at(event.start_mark)}: more than {MAX_ALIASES} aliases (*name); a config "
                                  f"needs a few at most, so write these values out")
            if target not in self._stats:
                raise YamlRefused(f"{_at(event.start_mark)}: alias *{event.anchor} is inside the node it names "
                                  f"(a cycle); a config cannot refer to itself, so remove the alias")
            size, height = self._stats[target]
            self._count(size, event, f"alias *{event.anchor} expands the file past {MAX_NODES} values "
                        f"(an alias bomb); write the values out instead of nesting aliases")
            self._reach(depth - 1 + height, event, f"alias *{event.anchor} nests values")
            return super().compose_node(parent, index)
        self._reach(depth, event, "values are nested")
        self._count(1, event, f"more than {MAX_NODES} values in one file (configs hold about a hundred); "
                    f"pass the config itself, not a data file")
        before, outer_deepest = self._nodes, self._deepest
        self._depth, self._deepest = depth, depth
        node = super().compose_node(parent, index)
        height = self._deepest - depth + 1
        self._depth, self._deepest = depth - 1, max(outer_deepest, self._deepest)
        if event.anchor is not None:
            self._stats[node] = (self._nodes - before, height)
        if isinstance(node, MappingNode):
            self._own_pairs[node] = list(node.value)
        return node

    def _count(self, nodes: int, event: Any, refusal: str) -> None:
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            raise YamlRefused(f"{_at(event.start_mark)}: {refusal}")

    def _reach(self, depth: int, event: Any, what: str) -> None:
        if depth > MAX_DEPTH:
            raise YamlRefused(f"{_at(event.start_mark)}: {what} more than {MAX_DEPTH} levels deep; "
                              f"a config needs a few levels, so flatten it")
        self._deepest = max(self._deepest, depth)


class _CheckedConstructor(SafeConstructor):
    """SafeConstructor that refuses a key repeated in one mapping (merge keys may still be overridden)."""

    _own_pairs: dict[Node, list[tuple[Node, Node]]]

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: dict[Any, Node] = {}
            # The pairs as written: flatten_mapping (merge keys) may already have rewritten node.value.
            for key_node, _ in self._own_pairs.get(node, node.value):
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # unhashable: the base class reports it with its line
                    continue
                if first is not key_node:
                    shown = _short(repr(key_node.value if isinstance(key_node, ScalarNode) else key))
                    raise YamlRefused(f"{_at(key_node.start_mark)}: key {shown} appears twice in one mapping "
                                      f"(first at {_at(first.start_mark)}); keep one of them")
        return super().construct_mapping(node, deep=deep)


class _PyLoader(_BudgetComposer, Reader, Scanner, Parser, _CheckedConstructor, Resolver):
    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        _BudgetComposer.__init__(self)
        _CheckedConstructor.__init__(self)
        Resolver.__init__(self)


if getattr(yaml, "__with_libyaml__", False):
    from yaml._yaml import CParser

    class _CLoader(_BudgetComposer, CParser, _CheckedConstructor, Resolver):
        """libyaml makes the events (fast); composing, with the budgets, and constructing stay in Python."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _BudgetComposer.__init__(self)
            _CheckedConstructor.__init__(self)
            Resolver.__init__(self)


USE_LIBYAML = bool(getattr(yaml, "__with_libyaml__", False))  # tests set it False to check the pure-Python path


def _loader(text: str) -> Any:
    return _CLoader(text) if USE_LIBYAML else _PyLoader(text)
