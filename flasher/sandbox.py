"""Rendering config-header templates that nobody vetted.

A template is untrusted input: a file someone mailed round, a path from a config
file. Rendering one must not reach flasher's secrets (the group key lives in this
process's environment), run code, read files outside the template's own folder,
or take the machine down. So templates render in Jinja2's
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`, tightened further:

* **Reach.** No ``_``-prefixed attribute (the sandbox rule that stops
  ``cycler.__init__.__globals__`` and ``''.__class__.__mro__``); only an allow-list of
  callables: the template's own macros, ``range``/``dict``/``namespace``/``cycler``/
  ``joiner``, a list of plain ``str``/``bytes``/``dict``/``list`` methods (no
  ``format``), and a list of filters. ``{% include %}``, ``import``, ``extends`` see only
  the template's own folder (after following links: nothing outside it, no absolute
  names, no ``..``, regular files only) and the shipped partials (``_*.h.j2``).
* **Output.** Every ``{{ ... }}`` must be a number or come out of a C filter
  (``c_string``, ``c_bytes``, ``c_ident``, ``c_comment``) or a macro; undefined values
  are errors (StrictUndefined).
* **Limits** (:class:`RenderLimits`): the header's size, the text produced on the way,
  a budget of steps (loop iterations, calls, filters, operators, outputs), a
  wall-clock deadline checked at every step, the size of any string or list a template
  builds (``*``, ``~``, ``+``, ``join``, ``replace``, ``%`` ... are checked *before* they
  allocate), the size of numbers (``**``), the nesting of macros and includes, and
  the template file's size.

Anything that goes wrong - a limit, a sandbox refusal, ``{{ 1/0 }}``, an
OverflowError, a RecursionError - is one :class:`~flasher.errors.InputError`:
``template 'X': <what went wrong>``, with any secret in the message masked.

Compiled templates are cached per folder and file (keyed by the file's device,
inode, size, mtime and ctime), so provisioning many boards compiles once.
"""

from __future__ import annotations

import contextvars
import functools
import os
import re
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateNotFound, TemplateSyntaxError, UndefinedError
from jinja2.runtime import BlockReference, LoopContext, Macro, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Joiner, Namespace
from jinja2.visitor import NodeTransformer

from flasher.cliteral import c_bytes, c_comment, c_string
from flasher.errors import InputError
from flasher.eui import EUI64
from flasher.files import file_kind, shipped

TEMPLATE_SUFFIX = ".h.j2"
MASK = "********"


@dataclass(frozen=True)
class RenderLimits:
    """What one render may use. The defaults are far above any real header (a few KiB, a few hundred steps)."""

    output: int = 1 << 20        # bytes of header text
    produced: int = 4 << 20      # text produced in all, counting what macros and blocks build before it is output
    steps: int = 200_000         # loop iterations + calls + filters + operators + outputs + includes
    seconds: float = 5.0         # wall clock, checked at every step
    value_size: int = 1 << 20    # characters + items in any one string or list a template builds
    int_bits: int = 4096         # size of any number a template computes
    depth: int = 64              # macros and includes nested in one another
    source: int = 1 << 20        # bytes of a template file


DEFAULT_LIMITS = RenderLimits()


class Refused(Exception):
    """A template broke a rule or a limit; the message says which (no secret in it).

    ``name``: the template file it is about, when that is not the one being rendered.
    """

    def __init__(self, message: str, name: str | None = None):
        super().__init__(message)
        self.name = name


# --- per-render accounting -----------------------------------------------------------

class _Render:
    __slots__ = ("limits", "deadline", "steps", "produced")

    def __init__(self, limits: RenderLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.steps = 0
        self.produced = 0

    def tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limits.steps:
            raise Refused(f"too much work: more than {self.limits.steps} steps (loop iterations, calls, filters); "
                          f"a loop that does not end?")
        if time.monotonic() > self.deadline:
            raise Refused(f"took longer than {self.limits.seconds:g} s")

    def produce(self, n: int) -> None:
        self.produced += n
        if self.produced > self.limits.produced:
            raise Refused(f"produces more than {_size(self.limits.produced)} of text")

    def check_value(self, value: object) -> object:
        if _too_big(value, self.limits.value_size):
            raise Refused(f"builds a value larger than {self.limits.value_size} characters or items")
        if isinstance(value, int) and value.bit_length() > self.limits.int_bits:
            raise Refused(f"computes a number larger than {self.limits.int_bits} bits")
        return value

    def want(self, estimate: int, what: str) -> None:
        """Refuse an operation before it allocates ``estimate`` characters or items."""
        if estimate > self.limits.value_size:
            raise Refused(f"{what} would build a value larger than {self.limits.value_size} characters or items")


_CURRENT: contextvars.ContextVar[_Render | None] = contextvars.ContextVar("flasher_render", default=None)


def _state() -> _Render:
    st = _CURRENT.get()
    if st is None:  # Jinja tries constant folding at compile time: refuse, so it happens at render time, metered
        raise Refused("not rendering")
    return st


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"


def _too_big(value: object, limit: int) -> bool:
    """Whether ``value`` holds more than ``limit`` characters + items, counted through nested lists/dicts."""
    total = 0
    stack = [value]
    while stack:
        x = stack.pop()
        if isinstance(x, (str, bytes, bytearray)):
            total += len(x)
        elif isinstance(x, (list, tuple, set, frozenset, dict)):
            total += len(x)
            if total > limit:
                return True
            stack.extend(x.items() if isinstance(x, dict) else x)
            continue
        else:
            total += 1
        if total > limit:
            return True
    return False


def _weight(value: object, limit: int) -> int:
    """Characters + items in ``value``, or ``limit + 1`` once it is known to be more."""
    if _too_big(value, limit):
        return limit + 1
    total, stack = 0, [value]
    while stack:
        x = stack.pop()
        if isinstance(x, (str, bytes, bytearray)):
            total += len(x)
        elif isinstance(x, (list, tuple, set, frozenset, dict)):
            total += len(x)
            stack.extend(x.items() if isinstance(x, dict) else x)
        else:
            total += 1
    return total


_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")


def _check_printf(st: _Render, fmt: object, args: object) -> None:
    """``'%5d' % x`` / ``format``: refuse widths that would build a huge string."""
    if not isinstance(fmt, (str, bytes)):
        return
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    estimate = len(text) + _weight(args, st.limits.value_size)
    for m in _PRINTF.finditer(text):
        for part in (m.group(1), m.group(2)):
            if part == "*":
                raise Refused("a '*' width in a format string is not allowed")
            if part:
                if len(part) > 9:
                    raise Refused("a format width larger than the limit")
                estimate += int(part)
    st.want(estimate, "formatting")


# --- the values templates see ---------------------------------------------------------

class CText(str):
    """Text a C filter (or a macro made only of such text) produced: the only strings a template may output."""


def _plain_identifier(value: object, what: str) -> str:
    text = str(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise InputError(f"{what} {text!r}: not a C identifier")
    return text


def _c_filter(fn: Callable[..., str]) -> Callable[..., CText]:
    def apply(value, *args, **kwargs):
        if isinstance(value, Undefined):
            str(value)  # StrictUndefined raises here, naming the missing variable
        st = _state()
        if _too_big(value, st.limits.value_size):
            raise Refused(f"a value larger than {st.limits.value_size} characters or items")
        return CText(fn(value, *args, **kwargs))
    return apply


C_FILTERS: dict[str, Callable[..., CText]] = {
    "c_string": _c_filter(lambda v, what="template value": c_string(v, what)),
    "c_bytes": _c_filter(lambda v, lsb_first=False: c_bytes(v, lsb_first)),
    "c_ident": _c_filter(lambda v, what="identifier": _plain_identifier(v, what)),
    "c_comment": _c_filter(lambda v, what="comment text": c_comment(v, what)),
}

# Jinja2's own filters a header template may use; the rest (HTML escaping, URLs, JSON,
# pprint, random, wordwrap, center, filesizeformat ...) are left out.
ALLOWED_FILTERS = ("abs", "attr", "batch", "capitalize", "count", "d", "default", "dictsort", "first", "float",
                   "format", "groupby", "indent", "int", "items", "join", "last", "length", "list", "lower", "map",
                   "max", "min", "reject", "rejectattr", "replace", "reverse", "round", "select", "selectattr",
                   "slice", "sort", "string", "sum", "title", "trim", "truncate", "unique", "upper")

_STR_METHODS = frozenset({"upper", "lower", "strip", "lstrip", "rstrip", "startswith", "endswith", "split", "rsplit",
                          "splitlines", "replace", "join", "count", "find", "rfind", "isdigit", "isalnum", "isalpha",
                          "isupper", "islower", "isspace", "isdecimal", "isidentifier", "title", "capitalize",
                          "casefold", "swapcase", "zfill", "ljust", "rjust", "center", "partition", "rpartition",
                          "removeprefix", "removesuffix", "encode"})
_BYTES_METHODS = frozenset({"hex", "count", "find", "startswith", "endswith", "decode"})
_DICT_METHODS = frozenset({"items", "keys", "values", "get"})
_SEQ_METHODS = frozenset({"count"})
_INT_METHODS = frozenset({"bit_length", "to_bytes"})


def _as_text(st: _Render, value: object) -> str:
    """``str(value)``, after checking it cannot be huge (filters convert their arguments so)."""
    if isinstance(value, str):
        return value
    if _too_big(value, st.limits.value_size):
        raise Refused(f"a value larger than {st.limits.value_size} characters or items")
    return str(value)


def _replace_estimate(st: _Render, s: object, old: object, new: object, count: object = -1) -> int:
    s, old, new = _as_text(st, s), _as_text(st, old), _as_text(st, new)
    n = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(0, len(new) - len(old))


def _precheck_method(st: _Render, owner: object, name: str, args: tuple, kwargs: dict) -> tuple:
    """Checks for the methods that can build big values; returns args (a join's iterable materialised)."""
    limit = st.limits.value_size
    if name in ("zfill", "ljust", "rjust", "center", "to_bytes"):
        width = args[0] if args else kwargs.get("width", kwargs.get("length", 0))
        if isinstance(width, int):
            st.want(width, f"{name}()")
    elif name == "replace" and isinstance(owner, str) and len(args) >= 2 \
            and isinstance(args[0], str) and isinstance(args[1], str):
        st.want(_replace_estimate(st, owner, *args[:3]), "replace()")
    elif name == "join" and isinstance(owner, str) and args:
        items = list(_bounded_iter(st, args[0]))
        st.want(_weight(items, limit) + len(owner) * len(items), "join()")
        args = (items, *args[1:])
    return args


def _bounded_iter(st: _Render, iterable: Iterable) -> Iterator:
    for n, item in enumerate(iterable):
        if n > st.limits.value_size:
            raise Refused(f"iterates over more than {st.limits.value_size} items")
        yield item


def _wrap_filter(name: str, fn: Callable) -> Callable:
    """A Jinja filter, metered: one step, checks before the calls that can build big values, the result's size after."""
    passes_arg = getattr(fn, "jinja_pass_arg", None) is not None

    @functools.wraps(fn)
    def filtered(*args, **kwargs):
        st = _state()
        st.tick()
        lead, rest = (args[:1], list(args[1:])) if passes_arg else ((), list(args))
        value: Any = rest[0] if rest else None
        limit = st.limits.value_size
        if name in ("string", "join", "sum", "list", "format", "indent", "replace", "sort", "unique") \
                and not isinstance(value, (Iterator, range)):
            if _too_big(value, limit):
                raise Refused(f"{name}: a value larger than {limit} characters or items")
        if name == "join":
            items = list(_bounded_iter(st, value))
            sep = rest[1] if len(rest) > 1 else kwargs.get("d", "")
            st.want(_weight(items, limit) + len(str(sep)) * len(items), "join")
            rest[0] = items
        elif name == "sum":
            start = rest[3] if len(rest) > 3 else kwargs.get("start", 0)
            if isinstance(start, (str, bytes, list, tuple)):
                items = list(_bounded_iter(st, value))
                st.want(_weight(items, limit) + _weight(start, limit), "sum")
                rest[0] = items
        elif name == "replace":
            old = rest[1] if len(rest) > 1 else kwargs.get("old", "")
            new = rest[2] if len(rest) > 2 else kwargs.get("new", "")
            count = rest[3] if len(rest) > 3 else kwargs.get("count", -1)
            st.want(_replace_estimate(st, value, old, new, -1 if count is None else count), "replace")
        elif name == "indent":
            width = rest[1] if len(rest) > 1 else kwargs.get("width", 4)
            w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            st.want(w, "indent")
            text = _as_text(st, value)
            st.want(len(text) + (text.count("\n") + 1) * max(0, w), "indent")
        elif name == "format":
            _check_printf(st, _as_text(st, value), (rest[1:], kwargs))
        elif name in ("batch", "slice"):
            n = rest[1] if len(rest) > 1 else kwargs.get("linecount", kwargs.get("slices", 0))
            if isinstance(n, int):
                st.want(n, name)
        result = fn(*lead, *rest, **kwargs)
        return st.check_value(result)

    return filtered


# --- the sandbox ----------------------------------------------------------------------

def _range(*args: int) -> range:
    st = _state()
    r = range(*args)
    if len(r) > st.limits.steps:
        raise Refused(f"range of {len(r)} items: more than the {st.limits.steps} steps a render may take")
    return r


def _iter_guard(iterable: Iterable) -> Iterator:
    """Every ``{% for %}`` loops through this: one step per item."""
    st = _state()
    if isinstance(iterable, Undefined):
        iter(iterable)  # StrictUndefined raises, naming the missing variable
    for item in iterable:
        st.tick()
        yield item


def _concat(parts: list) -> str:
    """``a ~ b``: checked before it builds the string."""
    st = _state()
    st.tick()
    limit = st.limits.value_size
    st.want(sum(_weight(p, limit) for p in parts), "'~'")
    text = "".join(str(p) for p in parts)
    st.check_value(text)
    return text


def _text(data: str) -> CText:
    """The template's literal text, so it is counted like any other output."""
    return CText(data)


@jinja2.pass_eval_context
def _finalize(eval_ctx, value: object) -> object:
    st = _state()
    st.tick()
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises, naming it
    if isinstance(value, CText):
        st.produce(len(value))
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        st.check_value(value)
        st.produce(len(str(value)))
        return value
    raise Refused(f"an expression outputs raw {type(value).__name__}; "
                  f"pass it through c_string, c_bytes, c_ident or c_comment")


class _Guard(NodeTransformer):
    """Route loops, ``~`` and literal text through the metered hooks above (EnvironmentAttribute
    nodes compile to ``environment.<name>``, which a template cannot rebind)."""

    @staticmethod
    def _call(name: str, arg: nodes.Node, lineno: int | None) -> nodes.Call:
        call = nodes.Call(nodes.EnvironmentAttribute(name), [arg], [], None, None)
        call.set_lineno(lineno or 1)
        return call

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._call("flasher_iter", node.iter, node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._call("flasher_concat", nodes.List(node.nodes), node.lineno)

    def visit_TemplateData(self, node: nodes.TemplateData) -> nodes.Node:
        return self._call("flasher_text", nodes.Const(node.data), node.lineno)


_compiles = 0
_compiles_lock = threading.Lock()


def compile_count() -> int:
    """How many template sources this process has compiled (the cache's effect, for tests and benchmarks)."""
    return _compiles


def _template_frames(env: object) -> int:
    n = 0
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("environment") is env:
            n += 1
        frame = frame.f_back
    return n


class HeaderSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, loader: jinja2.BaseLoader):
        super().__init__(loader=loader, undefined=jinja2.StrictUndefined, autoescape=False,
                         keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                         auto_reload=True, cache_size=64)
        self.flasher_iter = _iter_guard
        self.flasher_concat = _concat
        self.flasher_text = _text
        self.globals = {"range": _range, "dict": dict, "namespace": Namespace, "cycler": Cycler, "joiner": Joiner}
        self.filters = {name: _wrap_filter(name, self.filters[name]) for name in ALLOWED_FILTERS}
        self.filters.update(C_FILTERS)
        self._own = (_iter_guard, _concat, _text, _range, dict, Namespace, Cycler, Joiner)
        self._loading = threading.RLock()

    def _load_template(self, name, globals):  # type: ignore[no-untyped-def]
        """Jinja's cache lookup, or load and compile, one thread at a time: 256 boards rendering their first
        header at once would otherwise each compile the same template before any of them cached it."""
        with self._loading:
            return super()._load_template(name, globals)

    # Every template compiled here goes through the guard.
    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        global _compiles
        with _compiles_lock:
            _compiles += 1
        tree = super()._parse(source, name, filename)
        result = _Guard().visit(tree)
        assert isinstance(result, nodes.Template)
        return result

    def get_template(self, name, parent=None, globals=None):  # type: ignore[override]
        st = _CURRENT.get()
        if st is not None:  # an include / import / extends while rendering
            st.tick()
            if _template_frames(self) > st.limits.depth:
                raise Refused(f"templates nested deeper than {st.limits.depth} (a template that includes itself?)")
        return super().get_template(name, parent, globals)

    def _kind(self, obj: object) -> str:
        """What calling ``obj`` is, or SecurityError if a template may not call it."""
        if any(obj is own for own in self._own):
            return "own"
        if isinstance(obj, (Macro, BlockReference)):
            return "macro"
        if isinstance(obj, (Undefined, LoopContext, Joiner)):
            return "plain"  # an Undefined raises its own error when called; loop(...) recurses (and is metered)
        owner = getattr(obj, "__self__", None)
        name = getattr(obj, "__name__", "")
        if owner is not None and not isinstance(owner, type) and callable(obj):
            allowed = (_STR_METHODS if isinstance(owner, str) else
                       _BYTES_METHODS if isinstance(owner, bytes) else
                       _DICT_METHODS if isinstance(owner, dict) else
                       _SEQ_METHODS if isinstance(owner, (list, tuple)) else
                       _INT_METHODS if isinstance(owner, int) and not isinstance(owner, bool) else
                       {"cycle", "changed"} if isinstance(owner, LoopContext) else
                       {"next", "reset"} if isinstance(owner, Cycler) else
                       {"c_array"} if isinstance(owner, EUI64) else frozenset())
            if name in allowed:
                return "method"
            raise SecurityError(f"calling {type(owner).__name__}.{name}() is not allowed in a template")
        raise SecurityError(f"calling {type(obj).__name__} {name!r} is not allowed in a template".replace(" ''", ""))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own spelling, so kwargs cannot clash)
        st = _state()
        st.tick()
        if __obj is _text:  # literal template text: the most common call by far
            return CText(args[0])
        kind = __self._kind(__obj)
        if kind == "method":
            args = _precheck_method(st, __obj.__self__, __obj.__name__, args, kwargs)
        elif kind == "macro" and _template_frames(__self) >= st.limits.depth:
            raise Refused(f"macros nested deeper than {st.limits.depth} (a macro that calls itself?)")
        result = super().call(__context, __obj, *args, **kwargs)
        if kind == "macro" and isinstance(result, str):
            result = CText(result)  # made of literal text and C-filtered values only
        return st.check_value(result)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        st = _state()
        st.tick()
        limit = st.limits.value_size
        seqs = (str, bytes, list, tuple)
        if operator == "*":
            seq, n = (left, right) if isinstance(left, seqs) else (right, left)
            if isinstance(seq, seqs) and isinstance(n, int):
                st.want(_weight(seq, limit) * max(0, n), "'*'")
            elif isinstance(left, int) and isinstance(right, int) \
                    and left.bit_length() + right.bit_length() > st.limits.int_bits:
                raise Refused(f"computes a number larger than {st.limits.int_bits} bits")
        elif operator == "+" and isinstance(left, seqs) and isinstance(right, seqs):
            st.want(_weight(left, limit) + _weight(right, limit), "'+'")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right > st.limits.int_bits or left.bit_length() * right > st.limits.int_bits:
                raise Refused(f"computes a number larger than {st.limits.int_bits} bits")
        elif operator == "%" and isinstance(left, (str, bytes)):
            _check_printf(st, left, right)
        return st.check_value(self.binop_table[operator](left, right))

    def getitem(self, obj: Any, argument: Any) -> Any:
        if not isinstance(argument, (str, int, slice)) and _too_big(argument, 256):
            raise Refused("a subscript larger than 256 characters or items")
        return super().getitem(obj, argument)


# --- loading: the template's own folder and the shipped partials ------------------------

_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def _check_name(name: str) -> list[str]:
    """The parts of an include name, or Refused: absolute, '..', backslashes, odd characters."""
    if not isinstance(name, str) or not name:
        raise Refused("an include name must be text")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise Refused("refused (an absolute path; name a file in the template's folder)", name)
    parts = name.split("/")
    if any(p == ".." for p in parts):
        raise Refused("refused ('..' leaves the template's folder)", name)
    if not all(_NAME_PART.fullmatch(p) for p in parts):
        raise Refused("refused (letters, digits, _ . + - and / only)", name)
    return parts


def read_template_file(path: str | os.PathLike, limit: int = DEFAULT_LIMITS.source) -> tuple[str, tuple]:
    """``(text, stamp)`` of a template file, refusing (Refused) anything but a regular UTF-8 file up to ``limit``.

    The type is checked with ``stat`` before the file is opened (a FIFO would block an
    open, a device could be endless), then again on the open descriptor. FileNotFoundError
    and PermissionError propagate.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"not a regular file ({file_kind(st.st_mode)})")
    if st.st_size > limit:
        raise Refused(f"larger than {_size(limit)}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st2 = os.fstat(f.fileno())
        if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
            raise Refused("replaced while being read")
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise Refused(f"larger than {_size(limit)}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("cannot read (not UTF-8 text)") from None
    return text, _stamp(st)


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _still(path: str, stamp: tuple) -> bool:
    try:
        return _stamp(os.stat(path)) == stamp
    except OSError:
        return False  # gone or unreadable: load it again, which says what is wrong


def _shipped_source(filename: str) -> str | None:
    res = shipped("templates").joinpath(filename)
    try:
        return res.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


class HeaderLoader(jinja2.BaseLoader):
    """``folder``'s files (nothing that resolves outside it), then the shipped partials.

    ``folder=None`` is the loader for the shipped templates themselves, which may load
    any shipped template.
    """

    def __init__(self, folder: str | None):
        self.folder = folder
        self.filenames: dict[str, str] = {}  # file name -> template name, to place errors

    def get_source(self, environment, template: str):
        parts = _check_name(template)
        if self.folder is not None:
            candidate = os.path.join(self.folder, *parts)
            real = os.path.realpath(candidate)
            if os.path.lexists(candidate):
                if os.path.commonpath([real, self.folder]) != self.folder:
                    raise Refused("refused (it leads outside the template's folder)", template)
                st = _CURRENT.get()
                try:
                    text, stamp = read_template_file(real, (st.limits if st else DEFAULT_LIMITS).source)
                except Refused as exc:
                    raise Refused(str(exc), template) from None
                except OSError as exc:
                    raise Refused(f"cannot read ({exc.strerror or type(exc).__name__})", template) from None
                self.filenames[real] = template
                return text, real, functools.partial(_still, real, stamp)
        if self.folder is None or (len(parts) == 1 and parts[0].startswith("_") and parts[0].endswith(TEMPLATE_SUFFIX)):
            src = _shipped_source(template) if len(parts) == 1 else None
            if src is not None:
                name = f"<shipped {template}>"
                self.filenames[name] = template
                return src, name, lambda: True
        raise TemplateNotFound(template)


_ENVS: OrderedDict[str | None, HeaderSandbox] = OrderedDict()
_ENVS_LOCK = threading.Lock()
_MAX_ENVS = 16


def environment_for(folder: str | None) -> HeaderSandbox:
    """The (cached) sandbox for templates in ``folder`` (a resolved path), or for the shipped ones (None)."""
    with _ENVS_LOCK:
        env = _ENVS.get(folder)
        if env is None:
            env = _ENVS[folder] = HeaderSandbox(HeaderLoader(folder))
            while len(_ENVS) > _MAX_ENVS:
                _ENVS.popitem(last=False)
        else:
            _ENVS.move_to_end(folder)
        return env


# --- rendering --------------------------------------------------------------------------

def _scrub(message: str, secrets: Iterable[str]) -> str:
    """Mask secrets in an error message: whole, and quoted fragments of them (a template can slice a key)."""
    known = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)
    for s in known:
        message = message.replace(s, MASK)
    lowered = [s.lower() for s in known]

    def mask(m: re.Match) -> str:
        token = (m.group(2) or "").lower()
        if len(token) >= 4 and any(token in s or any(s[i:i + 8] in token for i in range(len(s) - 7)) for s in lowered):
            return f"{m.group(1)}{MASK}{m.group(1)}"
        return m.group(0)

    message = re.sub(r"(['\"])(.*?)\1", mask, message)
    message = " ".join(message.split())
    return message if len(message) <= 300 else message[:297] + "..."


def _where(exc: BaseException, loader: HeaderLoader, main: str) -> str:
    """``line N: `` (or ``'inc.h.j2' line N: ``) of the innermost template frame in the traceback."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        name = loader.filenames.get(tb.tb_frame.f_code.co_filename)
        if name is not None:
            found = (name, tb.tb_lineno)
        tb = tb.tb_next
    if found is None:
        return ""
    name, line = found
    return f"line {line}: " if name == main else f"{name!r} line {line}: "


def render(template: str, context: Mapping[str, object], *, folder: str | None, label: str,
           secrets: Iterable[str] = (), limits: RenderLimits | None = None) -> str:
    """Render ``template`` (a name in ``folder``, or a shipped template when ``folder`` is None).

    Every failure is an InputError ``template '<label>': ...``.
    """
    limits = limits or DEFAULT_LIMITS
    env = environment_for(folder)
    loader = env.loader
    assert isinstance(loader, HeaderLoader)
    token = _CURRENT.set(_Render(limits))
    parts: list[str] = []
    try:
        try:
            tmpl = env.get_template(template)
            size = 0
            gen = tmpl.generate(dict(context))
            try:
                for chunk in gen:
                    size += len(chunk)
                    if size > limits.output:
                        raise Refused(f"output larger than {_size(limits.output)}")
                    parts.append(chunk)
            finally:
                gen.close()
        finally:
            _CURRENT.reset(token)
    except Refused as exc:
        about = "" if exc.name in (None, template) else f"include {exc.name!r}: "
        raise _input_error(label, f"{_where(exc, loader, template)}{about}{exc}", secrets) from None
    except TemplateSyntaxError as exc:
        inside = "" if exc.name in (None, template) else f"include {exc.name!r}: "
        raise _input_error(label, f"{inside}syntax error on line {exc.lineno}: {exc.message}", secrets) from None
    except TemplateNotFound as exc:
        raise _input_error(label, f"{_where(exc, loader, template)}include {exc.name!r}: not found", secrets) from None
    except (UndefinedError, SecurityError) as exc:
        raise _input_error(label, _where(exc, loader, template) + (exc.message or type(exc).__name__),
                           secrets) from None
    except jinja2.TemplateError as exc:  # TemplateRuntimeError, FilterArgumentError ...
        raise _input_error(label, _where(exc, loader, template) + (exc.message or type(exc).__name__),
                           secrets) from None
    except InputError as exc:  # a C filter refused a value
        raise _input_error(label, _where(exc, loader, template) + str(exc), secrets) from None
    except RecursionError:
        raise _input_error(label, "nested too deeply (a macro or include that calls itself?)", secrets) from None
    except MemoryError:
        raise _input_error(label, "ran out of memory", secrets) from None
    except Exception as exc:  # anything else an untrusted template can raise: 1/0, OverflowError, TypeError ...
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise _input_error(label, _where(exc, loader, template) + what, secrets) from None
    return "".join(parts)


def _input_error(label: str, message: str, secrets: Iterable[str]) -> InputError:
    return InputError(f"template {label!r}: {_scrub(message, secrets)}")


def resolve_path(template: str, limits: RenderLimits | None = None) -> tuple[str, str]:
    """``(folder, name)`` for a template PATH, after checking (with ``stat``, without opening
    it) that it is a regular file of at most ``limits.source`` bytes; it is read when compiled.

    Links are followed first: the folder whose files the template may include is the
    one the real file is in.
    """
    real = os.path.realpath(template)
    limit = (limits or DEFAULT_LIMITS).source
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise InputError(f"template {template!r}: no such file") from None
    except OSError as exc:
        raise InputError(f"template {template!r}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"template {template!r}: not a regular file ({file_kind(st.st_mode)})")
    if st.st_size > limit:
        raise InputError(f"template {template!r}: larger than {_size(limit)}")
    folder, name = os.path.split(real)
    if not _NAME_PART.fullmatch(name):
        raise InputError(f"template {template!r}: a file name of letters, digits and _ . + - please")
    return folder, name


