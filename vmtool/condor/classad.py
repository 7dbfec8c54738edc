"""Just enough ClassAd for a file-transfer plugin, in the standard library only.

Reads new-format ads (`[ A = 1; B = "s" ]`, back to back or separated, or a `{ [..], [..] }` list)
and old-format ads (`Name = expr` lines). Literal values become Python values; any other expression
(a function call, an attribute reference, arithmetic) is kept as an Expr holding its text, so ads
with attributes vmtool does not know still parse. Names are case-insensitive (stored lower-case).
Writes new-format ads with the escapes HTCondor's unparser uses (src/classad/sink.cpp).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union


class ClassAdError(ValueError):
    pass


@dataclass(frozen=True)
class Expr:
    """An expression that is not a literal: kept as text, never evaluated."""

    text: str


class Undefined:
    def __repr__(self) -> str:
        return "undefined"


UNDEFINED = Undefined()
Value = Union[str, int, float, bool, Undefined, Expr, "Ad", list["Value"]]


class Ad(dict[str, Value]):
    """A ClassAd: lower-cased attribute names to values."""

    def get_ci(self, name: str) -> Value | None:
        return self.get(name.lower())


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<qname>'(?:[^'\\]|\\.)*')
  | (?P<real>(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)
  | (?P<int>0[xX][0-9a-fA-F]+|\d+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<op>=\?=|=!=|==|!=|<=|>=|&&|\|\||<<|>>>|>>|[\[\]{}();,=<>+\-*/%!?:.&|^~])
    """,
    re.VERBOSE | re.DOTALL,
)
_ESC = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "b": "\b",
    "f": "\f",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "?": "?",
    "a": "\a",
    "v": "\v",
}


def _unescape(body: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\" or i + 1 >= len(body):
            out.append(c)
            i += 1
            continue
        n = body[i + 1]
        if n in "01234567":
            m = re.match(r"[0-7]{1,3}", body[i + 1 :])
            assert m is not None
            out.append(chr(int(m.group(0), 8)))
            i += 1 + len(m.group(0))
            continue
        out.append(_ESC.get(n, n))
        i += 2
    text = "".join(out)
    # Octal escapes carry bytes: re-read any that spell UTF-8.
    try:
        return (
            text.encode("latin-1").decode("utf-8") if any(0x80 <= ord(ch) < 0x100 for ch in text) else text
        )
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


@dataclass
class _Tok:
    kind: str
    text: str
    pos: int


def _tokens(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ClassAdError(f"unexpected character {text[pos]!r} at offset {pos}")
        kind = m.lastgroup or ""
        if kind != "ws":
            toks.append(_Tok(kind, m.group(0), pos))
        pos = m.end()
    return toks


class _Parser:
    def __init__(self, text: str, *, old_strings: bool = False) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.old_strings = old_strings

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> _Tok:
        t = self.peek()
        if t is None:
            raise ClassAdError("unexpected end of input" + (f" (expected {want!r})" if want else ""))
        if want is not None and t.text != want:
            raise ClassAdError(f"expected {want!r} at offset {t.pos}, found {t.text!r}")
        self.i += 1
        return t

    def string(self, t: _Tok) -> str:
        body = t.text[1:-1]
        if self.old_strings:
            return body.replace('\\"', '"')
        return _unescape(body)

    def ad(self) -> Ad:
        self.take("[")
        ad = Ad()
        while True:
            t = self.peek()
            if t is None:
                raise ClassAdError("unterminated ClassAd (missing ']')")
            if t.text == "]":
                self.i += 1
                return ad
            if t.text == ";":
                self.i += 1
                continue
            name_tok = self.take()
            if name_tok.kind == "name":
                name = name_tok.text
            elif name_tok.kind == "qname":
                name = _unescape(name_tok.text[1:-1])
            else:
                raise ClassAdError(
                    f"expected an attribute name at offset {name_tok.pos}, found {name_tok.text!r}"
                )
            self.take("=")
            ad[name.lower()] = self.expr(("]", ";"))
            nxt = self.peek()
            if nxt is not None and nxt.text not in (";", "]"):
                raise ClassAdError(f"expected ';' or ']' at offset {nxt.pos}, found {nxt.text!r}")

    def expr(self, stops: tuple[str, ...]) -> Value:
        start = self.i
        value = self._primary()
        t = self.peek()
        if value is not None and (t is None or t.text in stops or t.text == ","):
            return value
        # Not a plain literal: skip the whole expression, balancing brackets.
        self.i = start
        depth = 0
        first = self.peek()
        if first is None:
            raise ClassAdError("missing expression")
        begin = first.pos
        end = begin
        while True:
            t = self.peek()
            if t is None:
                if depth:
                    raise ClassAdError("unbalanced brackets in expression")
                break
            if depth == 0 and (t.text in stops or t.text == ","):
                break
            if t.text in "([{":
                depth += 1
            elif t.text in ")]}":
                depth -= 1
                if depth < 0:
                    raise ClassAdError(f"unbalanced {t.text!r} at offset {t.pos}")
            end = t.pos + len(t.text)
            self.i += 1
        if end == begin:
            raise ClassAdError(f"missing expression at offset {begin}")
        return Expr(self.text[begin:end])

    def _primary(self) -> Value | None:
        t = self.peek()
        if t is None:
            return None
        neg = False
        if t.text == "-" and self.i + 1 < len(self.toks) and self.toks[self.i + 1].kind in ("int", "real"):
            neg = True
            self.i += 1
            t = self.toks[self.i]
        if t.kind == "str":
            self.i += 1
            return self.string(t)
        if t.kind == "int":
            self.i += 1
            v = int(t.text, 16) if t.text[:2].lower() == "0x" else int(t.text)
            return -v if neg else v
        if t.kind == "real":
            self.i += 1
            f = float(t.text)
            return -f if neg else f
        if t.kind == "name" and t.text.lower() in ("true", "false", "undefined"):
            self.i += 1
            low = t.text.lower()
            return UNDEFINED if low == "undefined" else low == "true"
        if t.text == "[":
            return self.ad()
        if t.text == "{":
            self.i += 1
            items: list[Value] = []
            while True:
                nxt = self.peek()
                if nxt is None:
                    raise ClassAdError("unterminated list (missing '}')")
                if nxt.text == "}":
                    self.i += 1
                    return items
                items.append(self.expr(("}",)))
                if self.peek() is not None and self.peek().text == ",":  # type: ignore[union-attr]
                    self.i += 1
        return None


def parse_ads(text: str) -> list[Ad]:
    """New-format ads, back to back or separated by whitespace or commas, or inside one { } list."""
    p = _Parser(text)
    ads: list[Ad] = []
    in_list = False
    while p.peek() is not None:
        t = p.peek()
        assert t is not None
        if t.text == "{" and not ads and not in_list:
            p.i += 1
            in_list = True
            continue
        if t.text == "," or (in_list and t.text == "}"):
            p.i += 1
            continue
        if t.text != "[":
            raise ClassAdError(f"expected '[' at offset {t.pos}, found {t.text!r}")
        ads.append(p.ad())
    return ads


def parse_old(text: str) -> list[Ad]:
    """Old-format ads: `Name = expr` lines; a blank line separates ads."""
    ads: list[Ad] = []
    cur = Ad()
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            if cur:
                ads.append(cur)
                cur = Ad()
            continue
        if s.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*)$", s)
        if not m or not m.group(2):
            raise ClassAdError(f"line {n}: not 'Name = value'")
        p = _Parser(m.group(2), old_strings=True)
        cur[m.group(1).lower()] = p.expr(())
    if cur:
        ads.append(cur)
    return ads


def quote(s: str) -> str:
    """A new-format string literal (sink.cpp's escapes; non-printable bytes as octal)."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\{o:03o}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def render(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.15E}"
    if isinstance(v, str):
        return quote(v)
    if isinstance(v, Expr):
        return v.text
    if isinstance(v, Undefined) or v is None:
        return "undefined"
    if isinstance(v, dict):
        return unparse(v)
    if isinstance(v, (list, tuple)):
        return "{ " + ", ".join(render(x) for x in v) + " }"
    raise TypeError(f"cannot write {type(v).__name__} in a ClassAd")


def unparse(ad: dict[str, object]) -> str:
    """`[ A = 1; B = "s" ]` in insertion order."""
    if not ad:
        return "[  ]"
    return "[ " + "; ".join(f"{k} = {render(v)}" for k, v in ad.items()) + " ]"


def old_value(v: object) -> str:
    """A value for an old-format line: strings lose backslashes and newlines (the starter reads lines)."""
    if isinstance(v, str):
        clean = v.replace("\\", "/").replace("\r", " ").replace("\n", " ").replace('"', "'")
        return f'"{clean}"'
    return render(v)


def unparse_old(ad: dict[str, object]) -> str:
    return "".join(f"{k} = {old_value(v)}\n" for k, v in ad.items())
