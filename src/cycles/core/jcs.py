"""JSON Canonicalization Scheme (RFC 8785): the bytes CyclesEvidence hashes and signs.

Objects with members sorted by the UTF-16 code units of their names, no whitespace, strings escaped as
ECMAScript's JSON.stringify does (only `"`, `\\` and U+0000..U+001F; short forms where they exist), and
numbers in ECMAScript's Number-to-string form. Numbers are IEEE 754 doubles in JCS: an integer beyond
±2**53 is written as the double nearest to it, exactly as a JavaScript producer or verifier would (a
value the envelope states must stay inside that range to be read back exactly; amounts in practice do).

msgspec's sorted encoder writes most documents byte for byte as JCS and is twenty times faster than a
recursive writer, which matters because every emitted envelope is canonicalized on the request's path;
documents it would write differently (floats, large integers, names past the BMP) go through the general
writer below, built on the standard library's C string escaper (which escapes the RFC's way).
"""

from __future__ import annotations

import math
import re
from json.encoder import encode_basestring as _quote  # the C escaper: `"`, `\\`, controls; non-ASCII as is
from typing import Any

import msgspec

SAFE_INTEGER = 2**53


class CanonicalizationError(ValueError):
    """The value has no canonical form (NaN, infinity, a lone surrogate, a non-string key, ...)."""


# A number token inside an object or array follows `:`, `,` or `[` in compact JSON; one that is a float or
# has 16+ digits makes the document ineligible. The same text inside a string only costs the slow path.
_NOT_PLAIN = re.compile(rb"[:,\[]-?[0-9]+(?:[.eE]|[0-9]{15})")
_ASTRAL = re.compile(rb"[\xf0-\xf4]")
_sorted_encode = msgspec.json.Encoder(order="sorted").encode


def dumps(value: Any) -> bytes:
    """The canonical UTF-8 bytes of a JSON value (dict with str keys, list, str, int, float, bool, None)."""
    # msgspec's sorted encoding is byte-identical to JCS unless the document holds a float, an integer
    # of 16 digits or more (JCS writes doubles), or a character past the BMP (JCS sorts names by UTF-16):
    # such numbers are searched for in the bytes; the general writer below handles those documents.
    fast = None
    if isinstance(value, (dict, list)):  # a bare scalar goes the general way (no `:`, `,` or `[` before it)
        try:
            fast = _sorted_encode(value)
        except (TypeError, UnicodeEncodeError, msgspec.EncodeError):
            pass
    if fast is not None and (fast.isascii() or not _ASTRAL.search(fast)) and not _NOT_PLAIN.search(fast):
        return fast
    parts: list[str] = []
    _write(value, parts)
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: not I-JSON, so not canonicalizable
        raise CanonicalizationError(f"string is not valid Unicode: {exc.reason}") from None


def _utf16_key(name: str) -> Any:
    # Code-point order equals UTF-16 order except for characters past the BMP, which UTF-16 sorts
    # (as surrogates 0xD800..0xDFFF) before U+E000..U+FFFF.
    return name.encode("utf-16-be")


def _write(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(_quote(value))
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        for name in value:
            if not isinstance(name, str):
                raise CanonicalizationError(f"object member names must be strings, not {type(name).__name__}")
        names = sorted(value)
        if any(ord(c) > 0xFFFF for name in names for c in name):
            names = sorted(value, key=_utf16_key)
        out.append("{")
        first = True
        for name in names:
            if not first:
                out.append(",")
            first = False
            out.append(_quote(name))
            out.append(":")
            _write(value[name], out)
        out.append("}")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    elif isinstance(value, int):
        out.append(str(value) if -SAFE_INTEGER <= value <= SAFE_INTEGER else number(float(value)))
    elif isinstance(value, float):
        out.append(number(value))
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise CanonicalizationError(f"{type(value).__name__} is not a JSON value")


def number(value: float) -> str:
    """ECMAScript Number::toString for a finite double (RFC 8785 §3.2.2.3)."""
    if math.isnan(value) or math.isinf(value):
        raise CanonicalizationError("NaN and Infinity have no JSON form")
    if value == 0:
        return "0"  # -0 too
    sign = "-" if value < 0 else ""
    # repr gives the shortest digits that read back as the same double, as ECMAScript requires
    mantissa, _, exp = repr(abs(value)).partition("e")
    whole, _, frac = mantissa.partition(".")
    if frac == "0":
        frac = ""
    digits = (whole + frac).lstrip("0")
    # n: where the decimal point goes relative to the digits (value = 0.digits x 10^n)
    n = len(whole.lstrip("0")) if whole.strip("0") else -(len(frac) - len(frac.lstrip("0")))
    n += int(exp or 0)
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        text = (digits if k == 1 else digits[0] + "." + digits[1:]) + ("e+" if e >= 0 else "e-") + str(abs(e))
    return sign + text
