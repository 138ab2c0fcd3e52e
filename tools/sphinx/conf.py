"""Sphinx settings for the docs site. Build it with `make docs` (tools/build_docs.py), not a bare
`sphinx-build`: the pages are nbdev-processed copies of nbs/ that the script writes to _proc/site/."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))   # minifast_site.py, beside this file

project = 'minifast'
html_title = 'minifast'
copyright = 'the minifast developers, Apache-2.0'
html_baseurl = 'https://minifast.github.io/minifast/'

extensions = ['myst_nb', 'minifast_site']   # minifast_site: math as MathML, nbdev's heading anchors
exclude_patterns = ['_build', '**.ipynb_checkpoints']
smartquotes = False               # the prose says what the notebook says, `'` included
nb_execution_mode = 'off'          # nbdev-test ran the notebooks; their saved outputs are the page
nb_merge_streams = True
myst_enable_extensions = ['dollarmath']
myst_heading_anchors = 4           # links to `page.ipynb#heading` resolve against headings

# nbdev's doc links end in the symbol's heading as quarto names it (`#learner.fit`, `#cross_entropy`)
myst_heading_slug_func = 'minifast_site.heading_slug'

html_theme = 'sphinx_book_theme'
html_theme_options = {
    'repository_url': 'https://github.com/minifast/minifast',
    'use_repository_button': True,     # a plain link: nothing is fetched from GitHub
    'use_download_button': False,
    'show_toc_level': 2,
    'navigation_with_keys': False,
}
html_context = {'default_mode': 'auto'}   # light or dark as the reader's system; unset, the theme logs an error
html_static_path = ['_static']
html_css_files = ['minifast.css']
html_favicon = '_static/favicon.svg'   # else browsers ask for /favicon.ico and log a 404
html_copy_source = False           # the pages, not a second copy of every notebook
html_show_sourcelink = False
html_math_renderer = 'mathml'

