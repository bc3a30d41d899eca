"""Speed and memory of every attention variant against sequence length, on this machine.

  python -m efficient_attn.benchmark                       # 1K..16K, every variant, float32
  python -m efficient_attn.benchmark --lengths 4096,65536 --variants local,bigbird --dtype bfloat16
  python -m efficient_attn.benchmark --cudnn               # on a GPU: also jax.nn.dot_product_attention(cudnn)
  python -m efficient_attn.benchmark --lengths 8192,16384 --variants local,dilated --repeats 7

For each (variant, length): the compiled temp memory of `jit(grad)` (XLA's memory analysis, before
running anything), then the median wall time of the forward and of forward+backward over `--repeats` runs
after a warm-up. A configuration whose compiled memory exceeds `--memory_budget_gb` is reported as out of
reach instead of run. Prints a Markdown table with the speed-up and memory ratio against `full` and
`chunked`, and writes `benchmark.json`, `benchmark.md` (the table) and `benchmark.png` (time and memory
against length, log-log) to `--out`. Each variant runs with the options of its class's `preset(keys)`
(about `--keys` keys per query); variants with learned weights get them from their `init`, and
bidirectional-only variants are reported as such under `--causal`.

Whenever `local` is benchmarked, two sliding-window baselines with its window run beside it
(unless `--no_baselines`): `plain_local`, the blocked sliding window anyone writes with jnp
(`plain_local_attention`), and `jax_local`, `jax.nn.dot_product_attention(local_window_size=...)`,
which masks an n x n score matrix (reported out of reach where its temporaries exceed the
budget). The table then gives every row's time and memory relative to `plain_local` at that length.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

import efficient_attn as ea
from efficient_attn.attention.api import variant_class

CUDNN = 'cudnn'  # jax.nn.dot_product_attention(implementation='cudnn'): full attention, GPU only
PLAIN_LOCAL = 'plain_local'  # `plain_local_attention`: the hand-written blocked sliding window
JAX_LOCAL = 'jax_local'  # jax.nn.dot_product_attention(local_window_size=...): masked n x n scores
BASELINES = (PLAIN_LOCAL, JAX_LOCAL)  # run beside `local`, with its window


def preset_options(name: str, keys: int = 512) -> dict[str, Any]:
  """The options under which variant `name` sees about `keys` keys per query: its class's `preset`
  (the sliding-window baselines take `local`'s window)."""
  if name in BASELINES:
    return dict(window=variant_class('local').preset(keys)['window'])
  return {} if name == CUDNN else variant_class(name).preset(keys)


def plain_local_attention(q, k, v, *, window: int, causal: bool = False):
  """The baseline: the sliding window abs(i - j) <= window as anyone writes it with jnp.

  Query blocks of `window` positions (at least 1) each score the keys of three blocks (previous,
  own, next), masked to the window, with a plain softmax; the backward is JAX's autodiff. No
  padding mask.

  Args:
    q, k, v: [batch, length, heads, head_dim].
  Returns:
    [batch, length, heads, head_dim].
  """
  b, n, h, d = q.shape
  block = max(window, 1)
  nb = -(-n // block)
  m = nb * block

  def blocks(x):  # [b, n, h, d] -> [b, h, nb, block, d]
    x = jnp.pad(x, ((0, 0), (0, m - n), (0, 0), (0, 0)))
    return x.reshape(b, nb, block, h, d).transpose(0, 3, 1, 2, 4)

  def neighbours(x):  # [b, h, nb, block, d] -> [b, h, nb, 3 * block, d]: previous, own, next block
    x = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0), (0, 0)))
    return jnp.concatenate([x[:, :, :-2], x[:, :, 1:-1], x[:, :, 2:]], axis=3)

  qb, kc, vc = blocks(q), neighbours(blocks(k)), neighbours(blocks(v))
  s = jnp.einsum('bhqid,bhqjd->bhqij', qb, kc) * d ** -0.5
  i = jnp.arange(m).reshape(nb, block, 1)
  j = (jnp.arange(nb)[:, None, None] - 1) * block + jnp.arange(3 * block)
  mask = (jnp.abs(i - j) <= window) & (j >= 0) & (j < n)
  if causal:
    mask = mask & (j <= i)
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  out = jnp.einsum('bhqij,bhqjd->bhqid', p, vc)
  return out.transpose(0, 2, 3, 1, 4).reshape(b, m, h, d)[:, :n]


def jax_local_attention(q, k, v, *, window: int, causal: bool = False):
  """The library baseline: jax.nn.dot_product_attention with local_window_size (n x n scores)."""
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                      local_window_size=(window, 0 if causal else window))


def machine_name() -> str:
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    model = platform.processor() or platform.machine()
    try:
      with open('/proc/cpuinfo') as f:
        model = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration):
      pass
    return f'CPU: {model}, {os.cpu_count()} cores'
  return f'{dev.platform.upper()}: {dev.device_kind}'


def _attention_fn(name: str, options: dict, causal: bool, shape: tuple[int, int, int, int]):
  """q, k, v -> out of one benchmark row; shape [batch, length, heads, head_dim] sizes learned
  weights."""
  if name == CUDNN:  # the fused reference on NVIDIA GPUs (full attention)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation='cudnn')
  if name in BASELINES:
    fn = plain_local_attention if name == PLAIN_LOCAL else jax_local_attention
    return lambda q, k, v: fn(q, k, v, causal=causal, **options)
  attn = ea.make_attention(name, **options)
  key = jax.random.key(0)
  if attn.learned:  # weights are inputs like any other; their init is not timed
    params = attn.init(jax.random.key(1), length=shape[1], heads=shape[2], head_dim=shape[3])
    return lambda q, k, v: attn(q, k, v, causal=causal, rng=key, params=params)
  return lambda q, k, v: attn(q, k, v, causal=causal, rng=key)


def _median_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # warm-up (compiled already)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(name: str, length: int, *, batch: int, heads: int, head_dim: int, dtype, causal: bool,
            repeats: int, keys: int, memory_budget: float) -> dict[str, Any]:
  """One row: compiled memory, then median forward and forward+backward seconds (or why not run)."""
  options = preset_options(name, keys)
  row = dict(variant=name, length=length, options=options)
  if causal and name not in (CUDNN,) + BASELINES and not variant_class(name).supports_causal:
    row['error'] = 'not run: bidirectional only (no causal form)'
    return row
  shape = (batch, length, heads, head_dim)
  fn = _attention_fn(name, options, causal, shape)
  spec = jax.ShapeDtypeStruct(shape, dtype)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
  fwd = jax.jit(fn)
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  try:
    compiled_fb = fwd_bwd.lower(spec, spec, spec).compile()
    compiled_f = fwd.lower(spec, spec, spec).compile()
  except Exception as e:  # noqa: BLE001  (e.g. cudnn on a backend without it)
    row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
    return row
  row['temp_bytes'] = int(compiled_fb.memory_analysis().temp_size_in_bytes)
  row['fwd_temp_bytes'] = int(compiled_f.memory_analysis().temp_size_in_bytes)
  if row['temp_bytes'] > memory_budget:
    row['error'] = f'out of reach: needs {row["temp_bytes"] / 2**30:.1f} GiB of temporaries'
    return row
  keys_rng = jax.random.split(jax.random.key(length), 3)
  q, k, v = (jax.random.normal(kr, shape, dtype) for kr in keys_rng)
  row['fwd_s'] = _median_time(compiled_f, (q, k, v), repeats)
  row['fwd_bwd_s'] = _median_time(compiled_fb, (q, k, v), repeats)
  return row


def _fmt_ratio(x):
  return '' if x is None else f'{x:.1f}x'


def _fmt_fraction(x):
  """A memory ratio variant / baseline: '1/14.5' when smaller, '2.9x' when larger."""
  return f'1/{1 / x:.1f}' if x < 1 else f'{x:.1f}x'


def _fmt_relative(x):
  return f'{x:.2f}'


def markdown_table(rows: list[dict]) -> str:
  """Rows grouped by length. Speed-up = baseline time / variant time; memory = variant / baseline;
  the `/ plain_local` columns are variant / plain_local (time and memory) where it was measured."""
  by = {(r['variant'], r['length']): r for r in rows}
  lines = ['| n | variant | fwd ms | fwd+bwd ms | temp MiB | speed-up vs full | memory vs full | '
           'speed-up vs chunked | memory vs chunked | time / plain_local | memory / plain_local |',
           '|' + '---|' * 11]
  for n in sorted({r['length'] for r in rows}):
    for r in (r for r in rows if r['length'] == n):
      if 'error' in r:
        lines.append(f'| {n} | {r["variant"]} | {r["error"]} ||||||||| ')
        continue
      cells = [str(n), r['variant'], f'{r["fwd_s"] * 1e3:.1f}', f'{r["fwd_bwd_s"] * 1e3:.1f}',
               f'{r["temp_bytes"] / 2**20:.1f}']
      for base in ('full', 'chunked', PLAIN_LOCAL):
        b = by.get((base, n))
        if b is None or 'error' in b or base == r['variant']:
          cells += ['', '']
        elif base == PLAIN_LOCAL:
          cells += [_fmt_relative(r['fwd_bwd_s'] / b['fwd_bwd_s']),
                    _fmt_relative(r['temp_bytes'] / max(b['temp_bytes'], 1))]
        else:
          cells += [_fmt_ratio(b['fwd_bwd_s'] / r['fwd_bwd_s']),
                    _fmt_fraction(r['temp_bytes'] / max(b['temp_bytes'], 1))]
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
  for name in dict.fromkeys(r['variant'] for r in rows):
    ok = [r for r in rows if r['variant'] == name and 'error' not in r]
    if not ok:
      continue
    n = [r['length'] for r in ok]
    dashed = name in ('full', 'chunked', CUDNN) + BASELINES
    style = dict(marker='o', linestyle='--' if dashed else '-')
    ax_t.plot(n, [r['fwd_bwd_s'] * 1e3 for r in ok], label=name, **style)
    ax_m.plot(n, [r['temp_bytes'] / 2**20 for r in ok], label=name, **style)
  save_length_plot(fig, ((ax_t, 'forward+backward time (ms)'),
                         (ax_m, 'compiled temp memory (MiB)')), path, title)


def save_length_plot(fig, panels, path: str, title: str, legend_columns: int = 1) -> None:
  """Gives each (axes, y label) of `panels` log-log axes over the sequence length, puts the legend
  on the first panel, then saves `fig` to `path` and closes it (shared by the training benchmark)."""
  import matplotlib.pyplot as plt
  for ax, label in panels:
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('sequence length')
    ax.set_ylabel(label)
    ax.grid(True, which='both', alpha=0.3)
  first = panels[0][0]
  if first.lines:
    first.legend(fontsize=8, ncol=legend_columns)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--lengths', default='1024,2048,4096,8192,16384',
                      help='comma-separated sequence lengths')
  parser.add_argument('--variants', default=','.join(ea.ATTENTION_NAMES),
                      help=f'comma-separated, from {", ".join(ea.ATTENTION_NAMES)} (and cudnn on GPU)')
  parser.add_argument('--cudnn', action='store_true',
                      help='add jax.nn.dot_product_attention(implementation="cudnn") (GPU only)')
  parser.add_argument('--no_baselines', action='store_true',
                      help='do not add the sliding-window baselines (plain_local, jax_local) beside local')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--causal', action='store_true', help='causal attention (default bidirectional)')
  parser.add_argument('--keys', type=int, default=512, help='about how many keys each query sees')
  parser.add_argument('--repeats', type=int, default=5, help='timed runs after one warm-up')
  parser.add_argument('--memory_budget_gb', type=float, default=12.0,
                      help='skip configurations whose compiled temporaries exceed this')
  parser.add_argument('--out', default='bench_out', help='folder for benchmark.json / benchmark.png')
  parser.add_argument('--render', metavar='JSON',
                      help='only re-render the table and plot of a saved benchmark.json into --out')
  args = parser.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      saved = json.load(f)
    return _report(saved['rows'], saved['machine'], args.out)

  lengths = [int(x) for x in args.lengths.split(',') if x]
  variants = [v for v in args.variants.split(',') if v] + ([CUDNN] if args.cudnn else [])
  unknown = [v for v in variants if v not in ea.ATTENTION_NAMES + (CUDNN,) + BASELINES]
  if unknown or not lengths or min(lengths) < 1:
    parser.error(f'unknown variants {unknown} (valid: {", ".join(ea.ATTENTION_NAMES)}, cudnn, '
                 f'{", ".join(BASELINES)}) or bad lengths')
  if 'local' in variants and not args.no_baselines:  # the baselines right after local
    at = variants.index('local') + 1
    variants[at:at] = [b for b in BASELINES if b not in variants]
  dtype = jnp.dtype(args.dtype)
  from tqdm import tqdm

  rows = []
  todo = [(n, v) for n in lengths for v in variants]
  bar = tqdm(todo, desc='benchmark', unit='config')
  for n, v in bar:
    bar.set_postfix_str(f'{v} n={n}')
    rows.append(measure(v, n, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                        dtype=dtype, causal=args.causal, repeats=args.repeats, keys=args.keys,
                        memory_budget=args.memory_budget_gb * 2**30))
    os.makedirs(args.out, exist_ok=True)  # keep what is measured so far, should a long sweep stop
    with open(os.path.join(args.out, 'partial.json'), 'w') as f:
      json.dump(rows, f)
  header = (f'{machine_name()}; jax {jax.__version__}; {datetime.date.today()}; batch {args.batch}, '
            f'{args.heads} heads, head_dim {args.head_dim}, {args.dtype}, '
            f'{"causal" if args.causal else "bidirectional"}, ~{args.keys} keys per query')
  return _report(rows, header, args.out)


def _report(rows: list[dict], header: str, out: str) -> list[dict]:
  """Prints the table and writes benchmark.json / .md / .png to `out`."""
  table = markdown_table(rows)
  print(header)
  print(table)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'benchmark.json'), 'w') as f:
    json.dump(dict(machine=header, rows=rows), f, indent=1)
  with open(os.path.join(out, 'benchmark.md'), 'w') as f:
    f.write(f'{header}\n\n{table}\n')
  plot(rows, os.path.join(out, 'benchmark.png'), header)
  print(f'wrote {out}/benchmark.json, benchmark.md and benchmark.png')
  return rows


if __name__ == '__main__':
  main()
