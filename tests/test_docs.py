"""The documentation is executable and complete: README's Python runs as written, docs/attention.md
lists every registered variant with its options and defaults, and no file points outside the repo."""
from __future__ import annotations

import contextlib
import io
import os
import re

import pytest

import efficient_attn as ea
from efficient_attn import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    return f.read()


def python_blocks(path: str) -> list[str]:
  return re.findall(r'^```python\n(.*?)^```', read(path), flags=re.S | re.M)


def run_block(code: str) -> str:
  """Executes `code` as a script would; returns what it printed."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, '<doc>', 'exec'), {'__name__': '__doc__'})  # pylint: disable=exec-used
  return out.getvalue()


def test_readme_python_runs_as_written():
  blocks = python_blocks('README.md')
  assert blocks, 'README.md has no ```python block'
  for code in blocks:
    printed = run_block(code)
    # The README's example prints the shape and the largest difference from the O(n^2) reference.
    shape, error = re.fullmatch(r'(\(.*\)) (\S+)\n', printed).groups()
    assert shape == '(2, 1000, 4, 32)' and float(error) < 1e-4, printed


def test_attention_doc_example_runs():
  printed = run_block(python_blocks('docs/attention.md')[0])
  assert float(printed) <= 1e-5, printed  # the relative error of the fast path against `reference`


def test_attention_doc_table_lists_every_variant_with_its_defaults():
  doc = read('docs/attention.md')
  for name in ea.ATTENTION_NAMES:
    rows = [line for line in doc.splitlines() if line.startswith(f'| `{name}` |')]
    assert len(rows) == 1, f'docs/attention.md: no (or several) table rows for {name!r}'
    options_cell = rows[0].split('|')[2]
    for option, default in models.variant_option_defaults(name).items():
      if option != 'implementation':  # shared by every variant, documented once
        assert f'`{option}={default!r}`' in options_cell, (name, option, default)
  assert doc.count('\n| `') == len(ea.ATTENTION_NAMES), 'a documented variant is not registered'


# Written in two pieces so that this file does not match its own check.
FORBIDDEN = ('/wor' + 'k/', '../sha' + 'red')
SKIP_DIRS = {'.git', '.venv', 'venvs', 'runs', '__pycache__', '.pytest_cache', 'build', 'bench_out'}


def test_nothing_points_outside_the_repository():
  hits = []
  for root, dirs, files in os.walk(REPO):
    dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith('.egg-info')]
    for name in files:
      if not name.endswith(('.py', '.md', '.toml', '.txt', '.ini', '.cfg', '.yaml', '.yml')) and (
          name != 'run'):
        continue
      path = os.path.join(root, name)
      with open(path, encoding='utf-8', errors='replace') as f:
        for number, line in enumerate(f, 1):
          if any(s in line for s in FORBIDDEN):
            hits.append(f'{os.path.relpath(path, REPO)}:{number}: {line.strip()}')
  assert not hits, 'paths outside the repository:\n' + '\n'.join(hits)


@pytest.mark.parametrize('doc', ['README.md', 'docs/attention.md', 'docs/data.md'])
def test_linked_docs_exist(doc):
  for target in re.findall(r'\]\(((?:docs/)?[\w./-]+\.(?:md|png))\)', read(doc)):
    base = REPO if doc == 'README.md' else os.path.join(REPO, 'docs')
    assert os.path.exists(os.path.join(base, target)), (doc, target)
