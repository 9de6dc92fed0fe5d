"""Documents from a folder: .txt, .md, .html/.htm and (with `pypdf`) .pdf, as plain text with their source path.

HTML becomes Markdown-like text (h1..h6 → `#` headings, paragraphs and list items on their own lines, scripts and
styles dropped) so the chunker sees the same heading structure whatever the file type.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ..errors import LmforgeError

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")


@dataclass
class Document:
    text: str
    source: str  # path relative to the folder that was loaded (or whatever name the caller gives)
    metadata: dict = field(default_factory=dict)


class _HtmlToText(HTMLParser):
    """Collects visible text; block tags end lines, headings become `#` lines."""

    BLOCKS = {"p", "div", "br", "li", "tr", "section", "article", "pre", "blockquote", "ul", "ol", "table", "hr"}
    SKIP = {"script", "style", "noscript", "template", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCKS:
            self.parts.append("\n" if tag in ("br", "li") else "\n\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6") or tag in self.BLOCKS:
            self.parts.append("\n\n" if tag != "li" else "\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if not self.skip_depth:
            self.parts.append(re.sub(r"\s+", " ", data))  # keep the spaces around inline tags

    def text(self) -> str:
        lines = [" ".join(line.split()) for line in "".join(self.parts).split("\n")]
        out: list[str] = []
        for line in lines:  # collapse runs of blank lines to one
            if line or (out and out[-1]):
                out.append(line)
        return "\n".join(out).strip()


def html_to_text(html: str) -> tuple[str, str]:
    """(text with `#` headings, <title>) of an HTML page."""
    parser = _HtmlToText()
    parser.feed(html)
    parser.close()
    return parser.text(), parser.title.strip()


def pdf_to_text(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise LmforgeError(f"{path}: reading PDF needs pypdf; pip install pypdf (or leave .pdf files out)") from None
    pages = [page.extract_text() or "" for page in PdfReader(str(path)).pages]
    return "\n\n".join(p.strip() for p in pages if p.strip())


def load_document(path: str | Path, source: str | None = None) -> Document:
    """One file as a Document; the suffix picks the reader."""
    path = Path(path)
    suffix = path.suffix.lower()
    meta: dict = {"path": str(path)}
    if suffix == ".pdf":
        text = pdf_to_text(path)
    elif suffix in (".html", ".htm"):
        text, title = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        if title:
            meta["title"] = title
    elif suffix in SUFFIXES:
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        raise LmforgeError(f"{path}: unsupported document type '{suffix}'; use one of {', '.join(SUFFIXES)}")
    return Document(text=text, source=source or path.name, metadata=meta)


def load_documents(folder: str | Path, suffixes: tuple[str, ...] = SUFFIXES) -> list[Document]:
    """Every supported file under `folder` (recursively, sorted), sources relative to the folder."""
    root = Path(folder)
    if not root.is_dir():
        raise LmforgeError(f"docs folder not found: {root}" if not root.exists() else f"not a folder: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise LmforgeError(f"{root}: no documents found; expected files ending in {', '.join(suffixes)}")
    return [load_document(p, p.relative_to(root).as_posix()) for p in files]
