"""A small Sphinx extension for the docs site: math as MathML at build time (so no page loads
MathJax from a CDN; browsers render MathML themselves), and heading anchors named as nbdev names them."""
import re

from docutils import nodes
from latex2mathml.converter import convert as latex_to_mathml


def heading_slug(text: str) -> str:
    "A heading's anchor as quarto (and so nbdev's doc links) writes it: `Learner.fit` -> `learner.fit`."
    return re.sub(r'\s+', '-', text.strip().lower())


def to_mathml(latex: str, display: str) -> str:
    "MathML for `latex`; a lone `\\mathrm` letter as text (latex2mathml would set it in italics)."
    latex = re.sub(r'\\mathrm\{(\w)\}', r'\\text{\1}', latex.strip())
    return latex_to_mathml(latex, display=display)


def visit_inline(self, node):
    self.body.append(to_mathml(node.astext(), 'inline'))
    raise nodes.SkipNode


def visit_block(self, node):
    self.body.append(f'<div class="math-block">{to_mathml(node.astext(), "block")}</div>')
    raise nodes.SkipNode


def setup(app):
    app.add_html_math_renderer('mathml', (visit_inline, None), (visit_block, None))
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
