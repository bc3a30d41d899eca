"""Pictures and timings of the Pathfinder generator.

  python -m efficient_attn.data.pathfinder --grid docs/pathfinder_examples.png   # examples, labelled
  python -m efficient_attn.data.pathfinder --time 10000 --resolution 128         # generator speed
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from efficient_attn.data.pathfinder.generator import generate
from efficient_attn.data.pathfinder.geometry import DIFFICULTIES, GEOMETRIES


def save_grid(path: str, *, resolution: int = 32, difficulty: str = 'hard', seed: int = 0,
              rows: int = 4, cols: int = 4) -> None:
  """Saves a rows x cols grid of generated examples, labels in the titles, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  images, labels = generate(rows * cols, resolution=resolution, difficulty=difficulty, seed=seed)
  fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows))
  for ax, image, label in zip(np.ravel(axes), images, labels):
    ax.imshow(image, cmap='gray', vmin=0, vmax=255, interpolation='nearest')
    ax.set_title('connected (1)' if label else 'not connected (0)', fontsize=9)
    ax.axis('off')
  fig.suptitle(f'Pathfinder {resolution}x{resolution}, {difficulty} '
               f'({DIFFICULTIES[difficulty]} paddles), seed {seed}')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


class _OneLineParser(argparse.ArgumentParser):
  """Bad arguments: exit status 2 and one line (argparse would print the usage first)."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def main(argv: list[str] | None = None) -> None:
  parser = _OneLineParser(prog='python -m efficient_attn.data.pathfinder',
                          description=__doc__.split('\n', 1)[0])
  parser.add_argument('--grid', help='write a PNG grid of examples to this path')
  parser.add_argument('--time', type=int, default=0, help='time the generation of this many images')
  parser.add_argument('--resolution', type=int, default=32, choices=sorted(GEOMETRIES))
  parser.add_argument('--difficulty', default='hard', choices=list(DIFFICULTIES))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if not args.grid and not args.time:
    parser.error('nothing to do: pass --grid PATH and/or --time N')
  for name in ('time', 'seed'):
    if getattr(args, name) < 0:
      parser.error(f'--{name} must be >= 0, got {getattr(args, name)}')
  if args.grid:
    save_grid(args.grid, resolution=args.resolution, difficulty=args.difficulty, seed=args.seed)
    print(f'wrote {args.grid}')
  if args.time:
    start, cpu = time.perf_counter(), time.process_time()
    _, labels = generate(args.time, resolution=args.resolution, difficulty=args.difficulty,
                         seed=args.seed)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f'{args.time} images of {args.resolution}x{args.resolution} ({args.difficulty}): '
          f'{seconds:.1f} s wall, {cpu:.1f} s CPU ({1e3 * cpu / args.time:.2f} ms/image), '
          f'{labels.mean():.3f} positive')


if __name__ == '__main__':
  main()
