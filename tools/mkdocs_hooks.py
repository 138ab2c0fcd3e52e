"""mkdocs hook for the notebook pages: one id per heading, and a table of contents that uses them.

mkdocs-jupyter gives a notebook's headings ids with one slug function and builds the table of
contents from a markdown copy of the notebook with another, after dropping code spans. So a
heading that repeats (the section `Recorder` and then the `show_doc` of `Recorder`) or holds code
gets a contents entry whose anchor is not on the page. This hook makes the ids unique on the page
and rebuilds the page's table of contents from the headings as they are.
"""
import html, re

from mkdocs.structure.toc import get_toc

_heading = re.compile(r'<h([1-6])((?:\s[^>]*)?)>(.*?)</h\1>', re.DOTALL)
_id_attr = re.compile(r'''\sid=["']([^"']*)["']''')
TOC_DEPTH = 3


def _slug(text: str) -> str:
    return re.sub(r'[-\s]+', '-', re.sub(r'[^\w\s-]', '', text).strip().lower()) or 'section'


def _text(inner_html: str) -> str:
    return html.unescape(re.sub(r'<[^>]+>', '', inner_html)).replace('¶', '').strip()


def on_page_content(content, page, config, files):
    if not page.file.src_uri.endswith('.ipynb'): return content
    seen, tokens = set(), []
    def fix(m):
        level, attrs, inner = int(m[1]), m[2], m[3]
        text = _text(inner)
        old = _id_attr.search(attrs)
        base = new = old[1] if old else _slug(text)
        n = 0
        while new in seen: n += 1; new = f'{base}_{n}'
        seen.add(new)
        attrs = _id_attr.sub(f' id="{new}"', attrs) if old else f'{attrs} id="{new}"'
        if old: inner = inner.replace(f'href="#{old[1]}"', f'href="#{new}"')
        if level <= TOC_DEPTH: tokens.append(dict(level=level, id=new, name=html.escape(text), children=[]))
        return f'<h{level}{attrs}>{inner}</h{level}>'
    content = _heading.sub(fix, content)
    page.toc = get_toc(_nest(tokens))
    return content


def _nest(flat):
    "Flat heading tokens as a tree: each heading holds the deeper ones that follow it."
    root, stack = [], []
    for t in flat:
        while stack and stack[-1]['level'] >= t['level']: stack.pop()
        (stack[-1]['children'] if stack else root).append(t)
        stack.append(t)
    return root
