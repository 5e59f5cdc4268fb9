"""The only values that cross between the trusted HumanEval judge and the sandboxed program: plain builtin data.

A value is plain when its type is exactly (not a subclass of) None, bool, int, float, str or bytes, or exactly
list, tuple, set, frozenset or dict whose members are plain (dict keys and set members hashable). Anything else,
an `int` subclass with a forged `__eq__` included, cannot be encoded, and decoding only ever builds builtin
objects, so whatever the sandboxed program sends, the judge compares builtin values with builtin semantics.

The wire form is one line of JSON: None, bool, str, float (NaN and infinities as JSON's usual extension) and ints
below 4000 bits as themselves, lists as arrays, everything else as a one-key object: {"int": hex} for larger ints
(Python limits decimal conversion), {"bytes": hex}, {"tuple": [...]}, {"set": [...]}, {"frozenset": [...]},
{"dict": [[key, value], ...]}. No pickle, no eval: parsing a hostile line can only fail with WireError.

Stdlib only: the sandboxed runner loads this file by path (the tidar_jax package is not visible in the sandbox).
"""

import json

MAX_INT_BITS = 4000  # larger ints travel as hex: int(str) / str(int) refuse more than 4300 decimal digits
_SEQUENCES = {"tuple": tuple, "set": set, "frozenset": frozenset}


class NotPlain(TypeError):
    """A value is not plain data (see the module docstring), so it may not cross the sandbox boundary."""


class WireError(ValueError):
    """A message is not a well-formed encoding of plain data."""


def _tree(value):
    kind = type(value)
    if value is None or kind in (bool, str, float):
        return value
    if kind is int:
        return value if value.bit_length() < MAX_INT_BITS else {"int": hex(value)}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is list:
        return [_tree(v) for v in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [_tree(v) for v in value]}
    if kind is dict:
        return {"dict": [[_tree(k), _tree(v)] for k, v in value.items()]}
    raise NotPlain(f"a {kind.__module__}.{kind.__qualname__} is not plain data (exact builtin types only)")


def _value(tree):
    kind = type(tree)
    if tree is None or kind in (bool, str, float, int):
        return tree
    if kind is list:
        return [_value(v) for v in tree]
    if kind is not dict or len(tree) != 1:
        raise WireError(f"unexpected {kind.__name__} in a message")
    (tag, body), = tree.items()
    try:
        if tag == "int" and type(body) is str:
            return int(body, 16)
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag in _SEQUENCES and type(body) is list:
            return _SEQUENCES[tag](_value(v) for v in body)
        if tag == "dict" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
            return {_value(k): _value(v) for k, v in body}
    except TypeError as e:  # an unhashable set member or dict key
        raise WireError(str(e)) from None
    raise WireError(f"unknown or malformed tag {tag!r}")


def dumps(message) -> bytes:
    """`message` (plain data) as one newline-terminated line; raises NotPlain otherwise."""
    try:
        return (json.dumps(_tree(message), separators=(",", ":")) + "\n").encode()
    except (RecursionError, ValueError) as e:  # self-containing or absurdly deep structures
        raise NotPlain(f"cannot encode: {e}") from None


def loads(line: bytes):
    """The plain value encoded in `line`; raises WireError for anything that is not such an encoding."""
    try:
        return _value(json.loads(line))
    except WireError:
        raise
    except (ValueError, RecursionError, MemoryError) as e:  # bad JSON / UTF-8, ints over the digit limit, depth
        raise WireError(f"malformed message: {type(e).__name__}") from None
