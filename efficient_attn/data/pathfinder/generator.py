"""The Pathfinder image generator: `generate(num_images, resolution=, difficulty=, seed=)`.

The task (Linsley et al. 2018, "Learning long-range spatial dependencies with horizontal gated
recurrent units"; LRA, Tay et al. 2021): a grayscale image holds two long dashed contours (chains of
short line segments, "paddles", separated by small gaps and turning smoothly), shorter distractor
contours and single paddles, and two marker dots on contour ends. Label 1: both markers sit on the
same contour; label 0: they sit on different contours. The contours are grown in contours.py (after
the reference `snakes2` generator), drawn in render.py, with the sizes of geometry.py.

Two departures from the reference, both so that nothing but the contours gives the label away:
  - Every pair of distinct objects keeps a clearance wider than the dash gap along a contour (see
    `Geometry.clearance`), so "connected" is well defined at the pixel level: joining ink pixels
    at most `Geometry.link_radius` apart joins the ink of one contour, never of two. The tests
    check this against every generated label, with and without the distractors.
  - Left alone, marker distance predicts the label (ends of one long, fairly straight contour vs
    ends of two: about two thirds right at 128x128). Pairs are kept with a probability that gives
    both labels the same marker-distance distribution (`contours.distance_balancer`); a threshold
    on distance is then at chance.

Difficulty = target contour length in paddles: 'easy' 6, 'intermediate' 9, 'hard' 14. Paddle size,
gaps, marker radius and seed distance grow with the resolution (`GEOMETRIES`). Generating is
vectorised: 10K images of 32x32 take about 16 s of one CPU core; 64x64 and 128x128 about 5 ms per
image.
"""
from __future__ import annotations

import numpy as np

from efficient_attn.data.pathfinder.contours import grow_shapes
from efficient_attn.data.pathfinder.geometry import contour_length, geometry
from efficient_attn.data.pathfinder.render import render, to_uint8
from efficient_attn.data.splits import check_count

# Bumped whenever generated images change, so that stale caches are not reused.
GENERATOR_VERSION = 1


def generate(num_images: int, *, resolution: int = 32, difficulty: str = 'hard', seed: int = 0,
             debug: bool = False):
  """Generates Pathfinder images with balanced labels.

  Args:
    num_images: N, the number of images.
    resolution: R, the image side: 32, 64, 128 (Path-X) or 256.
    difficulty: 'easy', 'intermediate' or 'hard' (target contours of 6, 9 or 14 paddles).
    seed: non-negative integer; the same arguments always give the same images.
    debug: also return the parts of each image (for tests and pictures).

  Returns:
    images: uint8 [N, R, R], black background, white ink.
    labels: int32 [N], 1 where both markers lie on one contour; exactly N // 2 ones, shuffled.
    With debug=True, a third item: a dict with
      'targets': uint8 [N, R, R], the two target contours and the markers only;
      'markers': float32 [N, 2, 2], (row, column) of the two marker centres;
      'tips': float32 [N, 4, 2], the targets' tips: origin 0, origin 1, terminal 0, terminal 1.
  """
  n = check_count(num_images, name='num_images', minimum=0)
  geom = geometry(resolution)
  length = contour_length(difficulty)
  seed = check_count(seed, name='seed', minimum=0)
  root = np.random.SeedSequence([seed, resolution, length, GENERATOR_VERSION])
  chunk = max(16, (1 << 22) // int(round(resolution / geom.field_cell)) ** 2)
  starts = range(0, n, chunk)
  streams = root.spawn(len(starts) + 1)  # the labels', then one per chunk
  labels = np.random.default_rng(streams[0]).permutation(np.arange(n) < n // 2).astype(np.int32)

  images = np.zeros((n, resolution, resolution), np.uint8)
  extra = {'targets': np.zeros_like(images), 'markers': np.zeros((n, 2, 2), np.float32),
           'tips': np.zeros((n, 4, 2), np.float32)} if debug else None
  # Chunks of 2^22 field cells bound the memory of the clearance fields (~40 MB with the pool).
  for start, stream in zip(starts, streams[1:]):
    rng = np.random.default_rng(stream)
    stop = min(n, start + chunk)
    shape = grow_shapes(geom, length, labels[start:stop], rng)
    images[start:stop] = to_uint8(render(geom, shape))
    if debug:
      extra['targets'][start:stop] = to_uint8(render(geom, shape, slots=slice(0, 2 * length)))
      extra['markers'][start:stop] = shape.markers
      extra['tips'][start:stop] = shape.tips
  if debug:
    return images, labels, extra
  return images, labels
