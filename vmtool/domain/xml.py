"""XML plumbing for domain documents: descriptors that read and write an lxml tree in place.

Modelled on virt-manager's xmlbuilder (`XMLProperty("./driver/@type")`): a property names an XPath-like
path of plain element steps, optionally ending in `@attr`; reading finds it, writing creates the missing
elements, writing None removes it. Nothing else in the document is touched, so elements and attributes
vmtool does not know survive an edit unchanged (their text, order, comments and whitespace included).
No policy here (that is domain/policy.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Generic, TypeVar, overload

from lxml import etree

from vmtool.errors import DomainError

MAX_XML_BYTES = 1 << 20

T = TypeVar("T", bound="XMLObject")


def parse(data: bytes | str, *, what: str = "domain XML") -> etree._ElementTree:
    """Parse untrusted XML: no DTD, no entities, no network, bounded size; refuse anything else."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_XML_BYTES:
        raise DomainError(f"{what} is larger than {MAX_XML_BYTES >> 10} KiB", hint="give a libvirt domain XML")
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise DomainError(f"{what} has a DOCTYPE or entity declarations, which vmtool refuses",
                          hint="remove the <!DOCTYPE ...> block; libvirt domain XML has none")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
                             remove_blank_text=False)
    try:
        return etree.ElementTree(etree.fromstring(raw, parser))
    except etree.XMLSyntaxError as e:
        raise DomainError(f"{what} is not well-formed XML: {e}", hint="check it with 'xmllint --noout FILE'") from None


def indent_of(node: etree._Element) -> str:
    """The whitespace in front of `node` on its line ('' when unknown)."""
    prev = node.getprevious()
    parent = node.getparent()
    text = prev.tail if prev is not None else (parent.text if parent is not None else None)
    if text and text.strip() == "" and "\n" in text:
        return text.rsplit("\n", 1)[1]
    return ""


def append_child(parent: etree._Element, child: etree._Element, *, index: int | None = None) -> etree._Element:
    """Insert `child` under `parent`, indented like its siblings so the document stays readable."""
    children = list(parent)
    if children:
        ref = children[-1] if index is None or index >= len(children) else children[index]
        ind = indent_of(ref)
        if index is None or index >= len(children):
            child.tail = ref.tail
            ref.tail = "\n" + ind
            parent.append(child)
        else:
            child.tail = "\n" + ind
            ref.addprevious(child)
    else:
        outer = indent_of(parent)
        parent.text = "\n" + outer + "  "
        child.tail = "\n" + outer
        parent.append(child)
    if len(child) and (child.text is None or child.text.strip() == ""):
        reindent(child, indent_of(child))
    return child


_TAG = re.compile(r"<(?![!?])[^>]*>")
_DQ_ATTR = re.compile(r'(\s[^\s=]+)="([^"\']*)"')


def libvirt_style(text: str) -> str:
    """Attributes in single quotes, as libvirt writes them (lxml always writes double quotes), so
    elements vmtool did not touch come out as they went in from `virsh dumpxml`."""
    return _TAG.sub(lambda m: _DQ_ATTR.sub(r"\1='\2'", m.group(0)), text)


def reindent(node: etree._Element, base: str) -> None:
    """Re-indent a freshly built subtree (two spaces per level) under an element indented by `base`."""
    kids = list(node)
    if not kids:
        return
    node.text = "\n" + base + "  "
    for i, k in enumerate(kids):
        k.tail = "\n" + base + ("  " if i < len(kids) - 1 else "")
        reindent(k, base + "  ")


def remove(node: etree._Element) -> None:
    """Remove an element and the whitespace that introduced it, keeping the neighbours' layout."""
    parent = node.getparent()
    if parent is None:
        return
    prev = node.getprevious()
    if prev is not None:
        prev.tail = node.tail
    elif len(parent) == 1:
        # The parent loses its last child: it renders as <x/>, unless it has text of its own
        # (<nvram>PATH<source .../></nvram>), which stays.
        text = (parent.text or "") + (node.tail or "")
        parent.text = text.strip() or None
    parent.remove(node)


def _split(path: str) -> tuple[list[str], str | None]:
    if not path.startswith("./"):
        raise ValueError(f"property path must start with './': {path!r}")
    parts = [p for p in path[2:].split("/") if p]
    attr = None
    if parts and parts[-1].startswith("@"):
        attr = parts.pop()[1:]
    return parts, attr


def find_path(node: etree._Element, steps: list[str]) -> etree._Element | None:
    cur: etree._Element | None = node
    for s in steps:
        assert cur is not None
        cur = cur.find(s)
        if cur is None:
            return None
    return cur


def index_after(parent: etree._Element, tags: tuple[str, ...]) -> int | None:
    """The index just after the first of `tags` found under `parent` (None: not found, append)."""
    for t in tags:
        el = parent.find(t)
        if el is not None:
            return list(parent).index(el) + 1
    return None


def ensure_path(node: etree._Element, steps: list[str], *, after: tuple[str, ...] | None = None) -> etree._Element:
    """The element at `steps`, created where missing. A missing first step goes right after the first
    of `after` found among its siblings (`()`: as the first child; None or none found: at the end)."""
    cur = node
    for i, s in enumerate(steps):
        nxt = cur.find(s)
        if nxt is None:
            index = None
            if i == 0 and after is not None:
                index = index_after(cur, after) if after else 0
            nxt = append_child(cur, etree.Element(s), index=index)
        cur = nxt
    return cur


def remove_all(node: etree._Element, path: str) -> int:
    """Remove every element `path` finds under `node`; how many there were."""
    found = node.findall(path)
    for el in found:
        remove(el)
    return len(found)


class XMLProperty:
    """One value in the document: element text (`./memory`) or an attribute (`./driver/@type`).

    Element text is read stripped, except with strip=False (host paths: libvirt does not trim them, so
    a check of the path must see what libvirt will open). `after` places a missing first element (see
    `ensure_path`), where libvirt's schema or readability wants it."""

    def __init__(self, path: str, *, is_int: bool = False, strip: bool = True, after: tuple[str, ...] | None = None,
                 doc: str = "") -> None:
        self.path = path
        self.steps, self.attr = _split(path)
        self.is_int = is_int
        self.strip = strip
        self.after = after
        self.__doc__ = doc or path

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> XMLProperty: ...
    @overload
    def __get__(self, obj: XMLObject, owner: type) -> Any: ...

    def __get__(self, obj: XMLObject | None, owner: type) -> Any:
        if obj is None:
            return self
        node = find_path(obj.node, self.steps)
        if node is None:
            return None
        raw = node.get(self.attr) if self.attr else node.text
        if raw is None:
            return None
        if self.is_int:
            try:
                return int(raw.strip())
            except ValueError:
                raise DomainError(f"domain XML: {self.path} of <{obj.node.tag}> is not an integer: {raw!r}",
                                  hint="fix the value in the domain XML") from None
        return raw.strip() if not self.attr and self.strip else raw

    def __set__(self, obj: XMLObject, value: Any) -> None:
        if value is None:
            node = find_path(obj.node, self.steps)
            if node is None:
                return
            if self.attr:
                if self.attr in node.attrib:
                    del node.attrib[self.attr]
            elif self.steps:
                remove(node)
            return
        node = ensure_path(obj.node, self.steps, after=self.after)
        if self.attr:
            node.set(self.attr, str(value))
        else:
            node.text = str(value)


class XMLObject:
    """A view of one element of the document; properties read and write it in place."""

    XML_NAME = ""

    def __init__(self, node: etree._Element) -> None:
        self.node = node

    @classmethod
    def new(cls: type[T], tag: str | None = None) -> T:
        """A detached element, to fill with properties before it is put into a document."""
        return cls(etree.Element(tag or cls.XML_NAME))

    @property
    def tag(self) -> str:
        return str(self.node.tag)

    @property
    def text(self) -> str | None:
        """The element's own text, as written (not stripped)."""
        return self.node.text

    @text.setter
    def text(self, value: str | None) -> None:
        self.node.text = value

    @property
    def parent_tag(self) -> str | None:
        parent = self.node.getparent()
        return None if parent is None else str(parent.tag)

    def is_child_of(self, other: XMLObject) -> bool:
        return self.node.getparent() is other.node

    def reindent(self) -> None:
        """Lay a freshly built subtree out like the rest of the document (two spaces a level)."""
        reindent(self.node, indent_of(self.node))

    def remove_all(self, path: str) -> int:
        return remove_all(self.node, path)

    def clear_attributes(self) -> None:
        self.node.attrib.clear()

    def has(self, path: str) -> bool:
        steps, attr = _split(path)
        node = find_path(self.node, steps)
        return node is not None and (attr is None or node.get(attr) is not None)

    def remove(self) -> None:
        remove(self.node)


class XMLChildren(Generic[T]):
    """Repeated children (`./devices/disk`) wrapped in an XMLObject class, in document order."""

    def __init__(self, cls: type[T], path: str) -> None:
        self.cls = cls
        self.steps, attr = _split(path)
        assert attr is None and self.steps
        self.parent_steps, self.tag = self.steps[:-1], self.steps[-1]

    @overload
    def __get__(self, obj: None, owner: type) -> XMLChildren[T]: ...
    @overload
    def __get__(self, obj: XMLObject, owner: type) -> ChildList[T]: ...

    def __get__(self, obj: XMLObject | None, owner: type) -> XMLChildren[T] | ChildList[T]:
        if obj is None:
            return self
        return ChildList(self, obj)


class ChildList(Generic[T]):
    def __init__(self, desc: XMLChildren[T], owner: XMLObject) -> None:
        self.desc = desc
        self.owner = owner

    def _parent(self, create: bool = False) -> etree._Element | None:
        if create:
            return ensure_path(self.owner.node, self.desc.parent_steps)
        return find_path(self.owner.node, self.desc.parent_steps)

    def __iter__(self) -> Iterator[T]:
        parent = self._parent()
        if parent is None:
            return iter(())
        return iter([self.desc.cls(n) for n in parent.findall(self.desc.tag)])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def add(self, **attrs: str) -> T:
        """Append a new child element after the last one of its kind (or at the end)."""
        parent = self._parent(create=True)
        assert parent is not None
        node = etree.Element(self.desc.tag, attrs)
        same = parent.findall(self.desc.tag)
        index = None
        if same:
            index = list(parent).index(same[-1]) + 1
        append_child(parent, node, index=index)
        return self.desc.cls(node)
