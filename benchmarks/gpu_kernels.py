"""The fused Pallas block-sparse kernels against the jnp engine, cuDNN and dense attention on one GPU.

  python benchmarks/gpu_kernels.py                    # bf16, batch 1, 16 heads, head_dim 64, n = 131072
  python benchmarks/gpu_kernels.py --lengths 32768,131072 --variants local,bigbird --repeats 20
  python benchmarks/gpu_kernels.py --no-causal        # bidirectional patterns (cuDNN stays causal)
  python benchmarks/gpu_kernels.py --smoke            # tiny sizes, any backend (CPU: interpret mode)

Steps:
  1. Correctness: every variant with implementation='pallas' against 'xla' on a small float32 case
     (forward and the gradients of q, k, v, with padding). A relative error above --tolerance makes the
     script exit with status 1 (after the timings).
  2. Timings, for each length: ours 'xla' and ours 'pallas' for each fixed pattern (options giving
     about --keys keys per query: each class's `preset(keys)`, local window keys/2, ...), cuDNN full
     attention
     (`jax.nn.dot_product_attention(implementation='cudnn')`, always causal) and plain dense attention
     (`dense_attention`) where its compiled temporaries fit --memory_budget_gb. For each: compiled temp
     memory of jit(forward) and jit(forward+backward) (XLA's memory analysis), median wall time over
     --repeats runs after a warm-up, and TFLOP/s on the useful work: 4 * head_dim FLOPs per visible
     (query, key) pair for the forward, 3.5 times that for forward+backward (the backward's five
     matmuls against the forward's two), counted exactly from each pattern's definition.
  3. A Markdown table (with date, JAX version and device) on stdout and in --out/gpu_kernels.md, and
     everything in --out/gpu_kernels.json. The performance targets (H200, n = 131072, local window 256:
     forward <= 1.5 ms, forward+backward <= 6 ms, temporaries <= 1.5 GB) are checked when measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import efficient_attn as ea  # pylint: disable=wrong-import-position
from efficient_attn.attention import patterns as P  # pylint: disable=wrong-import-position
from efficient_attn.attention.api import variant_class  # pylint: disable=wrong-import-position

TARGETS = dict(length=131072, variant='local', window=256, fwd_ms=1.5, fwd_bwd_ms=6.0, temp_gb=1.5)
# The exact full-attention variants: timed only on request (--variants), counted as n^2 pairs.
BASELINES = ('full', 'chunked')
_MASK_COUNT_LIMIT = 16384  # longest length whose visible pairs are counted from a dense mask


def has_dense_mask(name: str) -> bool:
  """Whether variant `name` defines its pattern token by token (`dense_mask`)."""
  return variant_class(name).dense_mask is not ea.Attention.dense_mask


def fixed_patterns() -> tuple[str, ...]:
  """The variants this script times by default: a sparse token pattern fixed before the data is seen
  (`dense_mask`), run by the block engine and so by the fused kernel (`supports_pallas`)."""
  return tuple(n for n in ea.ATTENTION_NAMES if n not in BASELINES and has_dense_mask(n) and
               variant_class(n).supports_pallas)


FIXED_PATTERNS = fixed_patterns()


def preset_options(name: str, keys: int) -> dict[str, Any]:
  """Options giving about `keys` keys per query: the variant class's `preset(keys)`."""
  return variant_class(name).preset(keys)


def machine_name() -> str:
  dev = jax.devices()[0]
  return f'{dev.platform.upper()}: {dev.device_kind}'


# --------------------------------------------------------------------------------------------------
# Useful work: visible (query, key) pairs, counted exactly
# --------------------------------------------------------------------------------------------------


def _count_rows(pred: Callable[[Any, Any], Any], n: int, causal: bool) -> int:
  """Sum over i < n, j < n of pred(i, j) (and j <= i when causal), in row tiles of bounded size."""
  rows = max(1, min(n, 2**26 // n))
  tiles = -(-n // rows)
  j = jnp.arange(n, dtype=jnp.int32)[None, :]

  def tile(t):
    i = (t * rows + jnp.arange(rows, dtype=jnp.int32))[:, None]
    vis = pred(i, j) & (i < n)
    if causal:
      vis = vis & (j <= i)
    return jnp.sum(vis, dtype=jnp.int32)  # at most 2**26 per tile

  if tiles == 1:  # small: no compile needed
    return int(tile(0))
  counts = jax.jit(lambda: jax.lax.map(tile, jnp.arange(tiles)))()
  return int(np.sum(np.asarray(counts, np.int64)))


def visible_pairs(name: str, options: dict, n: int, heads: int, causal: bool, rng) -> int:
  """Visible (query, key) pairs summed over heads: the useful work of one batch element."""
  if name in BASELINES + ('cudnn', 'dense'):
    return heads * (n * (n + 1) // 2 if causal else n * n)
  if name == 'bigbird':  # exact at block level: a pattern of whole blocks
    attn = ea.make_attention(name, **options)
    bs = attn.block_size
    nb = -(-n // bs)
    idx, valid, g = attn.layout(nb, heads, rng)
    blocks = np.zeros((heads, nb, nb), bool)
    h_ix, a_ix = np.meshgrid(np.arange(heads), np.arange(nb), indexing='ij')
    for s in range(idx.shape[-1]):
      ok = np.asarray(valid[..., s])
      blocks[h_ix[ok], a_ix[ok], np.asarray(idx[..., s])[ok]] = True
    blocks[:, list(g)] = True
    size = np.minimum(bs, n - np.arange(nb) * bs).astype(np.int64)
    pairs = size[:, None] * size[None, :]
    if causal:
      a = np.arange(nb)
      pairs = np.where(a[:, None] > a[None, :], pairs, 0) + np.diag(size * (size + 1) // 2)
    return int(np.sum(blocks * pairs[None]))
  w = options.get('window')
  if name == 'local':
    return heads * _count_rows(P.Band(w), n, causal)
  if name == 'dilated':
    dil = options['dilation'] if isinstance(options['dilation'], tuple) else (options['dilation'],)
    per = heads // len(dil)
    return per * sum(_count_rows(P.Dilated(w, d), n, causal) for d in dil)
  if name == 'longformer':
    is_global = np.zeros(n, bool)
    is_global[[g for g in options['global_tokens'] if g < n]] = True
    is_global = jnp.asarray(is_global)
    return heads * _count_rows(lambda i, j: P.BandOrGlobal(w)(i, j, is_global), n, causal)
  if name == 'strided':
    return heads * _count_rows(P.Strided(options['stride']), n, causal)
  if name == 'fixed':
    return heads * _count_rows(P.Fixed(options['stride'], options['summary']), n, causal)
  if has_dense_mask(name) and n <= _MASK_COUNT_LIMIT:  # any other pattern: count its dense mask
    attn = ea.make_attention(name, **options)
    per_head = np.asarray(jax.jit(lambda rng: jnp.sum(  # < 2^31 per head at this length
        attn.dense_mask(n, causal=causal, rng=rng, heads=heads), axis=(1, 2),
        dtype=jnp.int32))(rng), np.int64)
    return int(per_head.sum() if per_head.size == heads else per_head[0] * heads)
  raise ValueError(f'no pair count for {name!r} at n={n}')


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def attention_fn(kind: str, name: str, options: dict, causal: bool, rng):
  """q, k, v -> out for one benchmark row ('xla' / 'pallas' ours, or 'cudnn' / 'dense' full)."""
  if kind == 'cudnn':
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation='cudnn')
  if kind == 'dense':
    def dense(q, k, v):
      n = q.shape[1]
      mask = jnp.tril(jnp.ones((n, n), bool)) if causal else None
      return ea.dense_attention(q, k, v, mask=mask)
    return dense
  attn = ea.make_attention(name, implementation=kind, **options)
  return lambda q, k, v: attn(q, k, v, causal=causal, rng=rng)


def check_correctness(variants, *, length: int, heads: int, head_dim: int, keys: int, causal: bool,
                      tolerance: float) -> list[dict]:
  """'pallas' against 'xla' for every variant: max relative error of out and dq, dk, dv."""
  shape = (2, length, heads, head_dim)
  q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in jax.random.split(
      jax.random.key(0), 3))
  padding = jnp.arange(length)[None, :] < jnp.asarray([length, length - 3])[:, None]
  w = jax.random.normal(jax.random.key(1), shape)
  rng = jax.random.key(2)
  results = []
  for name in variants:
    options = preset_options(name, keys)

    def value_and_grads(impl, name=name, options=options):
      attn = ea.make_attention(name, implementation=impl, **options)
      f = lambda q, k, v: attn(q, k, v, padding_mask=padding, causal=causal, rng=rng)
      out, vjp = jax.vjp(f, q, k, v)
      return (out,) + vjp(w)

    with jax.default_matmul_precision('highest'):  # no TF32 in the float32 reference
      fast = jax.jit(lambda: value_and_grads('pallas'))()
      ref = jax.jit(lambda: value_and_grads('xla'))()
    errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(fast, ref)]
    results.append(dict(variant=name, options=options, length=length, causal=causal,
                        rel_err=dict(zip(('out', 'dq', 'dk', 'dv'), errors)),
                        ok=bool(max(errors) <= tolerance)))
  return results


def _median_seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(kind: str, name: str, length: int, *, batch: int, heads: int, head_dim: int, dtype,
            causal: bool, keys: int, repeats: int, memory_budget: float) -> dict[str, Any]:
  """One table row: compiled temporaries, median times, useful TFLOP/s (or why it was not run)."""
  options = {} if kind in ('cudnn', 'dense') else preset_options(name, keys)
  causal = True if kind == 'cudnn' else causal
  rng = jax.random.key(0)
  row = dict(impl=kind, variant=name, length=length, causal=causal, options=options)
  shape = (batch, length, heads, head_dim)
  scores = 4 * batch * heads * length**2  # f32 bytes of one score matrix
  if (kind == 'dense' or (kind == 'xla' and name == 'full')) and scores > memory_budget:
    # Not even compiled: XLA's GPU autotuner would try to allocate such buffers.
    row['error'] = f'not run: its score matrix alone is {scores / 2**30:.0f} GiB'
    return row
  fn = attention_fn(kind, name, options, causal, rng)
  spec = jax.ShapeDtypeStruct(shape, dtype)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
  try:
    fwd = jax.jit(fn).lower(spec, spec, spec).compile()
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
  except Exception as e:  # noqa: BLE001  (cuDNN off GPU, a kernel that does not compile, ...)
    row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:160]}'
    return row
  row['fwd_temp_bytes'] = int(fwd.memory_analysis().temp_size_in_bytes)
  row['temp_bytes'] = int(fwd_bwd.memory_analysis().temp_size_in_bytes)
  if row['temp_bytes'] > memory_budget:
    row['error'] = f'not run: needs {row["temp_bytes"] / 2**30:.2f} GiB of temporaries'
    return row
  try:
    pairs = batch * visible_pairs(name if kind not in ('cudnn', 'dense') else kind, options, length,
                                  heads, causal, rng)
  except ValueError as e:  # a pattern without an exact count at this length: time it anyway
    pairs, row['pair_count_error'] = None, str(e)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in jax.random.split(jax.random.key(3), 3))
  row['fwd_s'] = _median_seconds(fwd, (q, k, v), repeats)
  row['fwd_bwd_s'] = _median_seconds(fwd_bwd, (q, k, v), repeats)
  if pairs is None:
    row['keys_per_query'] = row['fwd_tflops'] = row['fwd_bwd_tflops'] = None
    return row
  row['keys_per_query'] = pairs / (batch * heads * length)
  flops = 4 * head_dim * pairs
  row['fwd_tflops'] = flops / row['fwd_s'] / 1e12
  row['fwd_bwd_tflops'] = 3.5 * flops / row['fwd_bwd_s'] / 1e12
  return row


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def markdown(header: str, checks: list[dict], rows: list[dict], target_lines: list[str]) -> str:
  lines = [f'**{header}**', '', '| check: pallas vs xla (float32) | out | dq | dk | dv | ok |',
           '|---|---|---|---|---|---|']
  for c in checks:
    e = c['rel_err']
    lines.append(f'| {c["variant"]} (n={c["length"]}) | {e["out"]:.1e} | {e["dq"]:.1e} | '
                 f'{e["dk"]:.1e} | {e["dv"]:.1e} | {"yes" if c["ok"] else "NO"} |')
  lines += ['', '| n | impl | variant | causal | keys/query | fwd ms | fwd+bwd ms | fwd TFLOP/s | '
            'fwd+bwd TFLOP/s | fwd temp MiB | fwd+bwd temp MiB |', '|' + '---|' * 11]
  for r in rows:
    head = f'| {r["length"]} | {r["impl"]} | {r["variant"]} | {"yes" if r["causal"] else "no"} |'
    if 'fwd_s' not in r:
      lines.append(f'{head} | {r["error"]} ||||||')
      continue
    fmt = lambda x, spec: 'n/a' if x is None else format(x, spec)
    lines.append(f'{head} {fmt(r["keys_per_query"], ".1f")} | {r["fwd_s"] * 1e3:.3f} | '
                 f'{r["fwd_bwd_s"] * 1e3:.3f} | {fmt(r["fwd_tflops"], ".3g")} | '
                 f'{fmt(r["fwd_bwd_tflops"], ".3g")} | {r["fwd_temp_bytes"] / 2**20:.1f} | '
                 f'{r["temp_bytes"] / 2**20:.1f} |')
  if target_lines:
    lines += [''] + target_lines
  return '\n'.join(lines)


def check_targets(rows: list[dict]) -> list[str]:
  """The H200 performance targets, for the rows that measure them (pallas local window 256 at 131072)."""
  t = TARGETS
  out = []
  for r in rows:
    if (r['impl'], r['variant'], r['length']) != ('pallas', t['variant'], t['length']) or \
        r['options'].get('window') != t['window'] or 'fwd_s' not in r:
      continue
    verdict = lambda ok: 'met' if ok else 'MISSED'
    out.append(
        f'Target ({"causal" if r["causal"] else "bidirectional"}): forward {r["fwd_s"] * 1e3:.2f} ms '
        f'(<= {t["fwd_ms"]}: {verdict(r["fwd_s"] * 1e3 <= t["fwd_ms"])}), forward+backward '
        f'{r["fwd_bwd_s"] * 1e3:.2f} ms (<= {t["fwd_bwd_ms"]}: '
        f'{verdict(r["fwd_bwd_s"] * 1e3 <= t["fwd_bwd_ms"])}), temporaries '
        f'{r["temp_bytes"] / 1e9:.2f} GB (<= {t["temp_gb"]}: '
        f'{verdict(r["temp_bytes"] / 1e9 <= t["temp_gb"])}).')
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--lengths', default='131072', help='comma-separated sequence lengths')
  parser.add_argument('--variants', default=','.join(FIXED_PATTERNS),
                      help=f'comma-separated fixed patterns ({", ".join(FIXED_PATTERNS)}, full, '
                           'chunked) timed with both implementations')
  parser.add_argument('--baselines', default='cudnn,dense',
                      help='comma-separated full-attention baselines: cudnn, dense (or empty)')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--heads', type=int, default=16)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  parser.add_argument('--causal', action=argparse.BooleanOptionalAction, default=True,
                      help='causal patterns (default) or --no-causal for bidirectional ones')
  parser.add_argument('--keys', type=int, default=512, help='about how many keys each query sees')
  parser.add_argument('--repeats', type=int, default=10, help='timed runs after one warm-up')
  parser.add_argument('--memory_budget_gb', type=float, default=40.0,
                      help='compile but do not run configurations needing more temporaries')
  parser.add_argument('--check_length', type=int, default=1000,
                      help='sequence length of the float32 correctness check')
  parser.add_argument('--tolerance', type=float, default=1e-4,
                      help='largest relative error of the correctness check')
  parser.add_argument('--smoke', action='store_true',
                      help='tiny sizes that run anywhere (CPU: interpret mode), to test this script')
  parser.add_argument('--out', default='bench_out', help='folder for gpu_kernels.json / .md')
  args = parser.parse_args(argv)
  if args.smoke:
    args.lengths, args.heads, args.head_dim, args.keys = '40', 2, 8, 16
    args.repeats, args.check_length, args.batch = 1, 37, 1

  lengths = [int(x) for x in args.lengths.split(',') if x]
  variants = [v for v in args.variants.split(',') if v]
  baselines = [v for v in args.baselines.split(',') if v]
  bad = [v for v in variants if v not in FIXED_PATTERNS + BASELINES]
  bad += [v for v in baselines if v not in ('cudnn', 'dense')]
  if bad or not lengths or min(lengths) < 1:
    parser.error(f'unknown variants or baselines {bad}, or bad lengths {args.lengths!r}')
  dtype = jnp.dtype(args.dtype)
  header = (f'{datetime.date.today()}; jax {jax.__version__}; {machine_name()}; batch {args.batch}, '
            f'{args.heads} heads, head_dim {args.head_dim}, {args.dtype}, '
            f'{"causal" if args.causal else "bidirectional"} patterns, ~{args.keys} keys per query')
  print(header, flush=True)

  checks = check_correctness(variants, length=args.check_length, heads=2, head_dim=args.head_dim,
                             keys=args.keys, causal=args.causal, tolerance=args.tolerance)
  for c in checks:
    print(f'check {c["variant"]}: {c["rel_err"]} {"ok" if c["ok"] else "FAILED"}', flush=True)

  rows = []
  common = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=dtype,
                causal=args.causal, keys=args.keys, repeats=args.repeats,
                memory_budget=args.memory_budget_gb * 2**30)
  for n in lengths:
    todo = [(impl, v) for v in variants for impl in ('xla', 'pallas')] + [(b, 'full') for b in baselines]
    for impl, v in todo:
      row = measure(impl, v, n, **common)
      print(json.dumps({k: row[k] for k in row if k != 'options'}), flush=True)
      rows.append(row)

  targets = check_targets(rows)
  table = markdown(header, checks, rows, targets)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  result = dict(header=header, date=str(datetime.date.today()), jax=jax.__version__,
                device=machine_name(), args=vars(args), checks=checks, rows=rows, targets=targets)
  with open(os.path.join(args.out, 'gpu_kernels.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, 'gpu_kernels.md'), 'w') as f:
    f.write(table + '\n')
  print(f'wrote {args.out}/gpu_kernels.json and {args.out}/gpu_kernels.md')
  result['ok'] = all(c['ok'] for c in checks)
  return result


if __name__ == '__main__':
  sys.exit(0 if main()['ok'] else 1)
