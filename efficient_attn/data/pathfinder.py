"""Pathfinder and Path-X (Long Range Arena): a vectorised generator, a reader and the task loader.

The task (Linsley et al. 2018, "Learning long-range spatial dependencies with horizontal gated
recurrent units"; LRA, Tay et al. 2021): a grayscale image holds two long dashed contours (chains of
short line segments, "paddles", separated by small gaps and turning smoothly), shorter distractor
contours and single paddles, and two marker dots on contour ends. Label 1: both markers sit on the
same contour; label 0: they sit on different contours. Images are flattened row by row into
R * R pixel tokens (1024 for the LRA Pathfinder at 32x32, 16384 for Path-X at 128x128).

The procedure follows the reference generator (the `snakes2` script of the pathfinder repository,
with LRA's settings): two target contours grow paddle by paddle from origin tips `seed_distance`
apart; each new paddle turns by at most `max_turn` from the previous one and must keep its clearance
from everything already drawn (a contour that gets stuck backtracks a few paddles; a pair that stays
stuck is redrawn); then distractor contours of a third of the target length and single paddles are
added while room remains; a marker goes on the origin tip of one target and on the terminal tip of
the same target (label 1) or of the other (label 0). Here the targets grow one after the other, all
images of a batch at once in numpy.

Two departures from the reference, both so that nothing but the contours gives the label away:
  - Every pair of distinct objects keeps a clearance wider than the dash gap along a contour (see
    `Geometry.clearance`), so "connected" is well defined at the pixel level: joining ink pixels
    at most `Geometry.link_radius` apart joins the ink of one contour, never of two. The tests
    check this against every generated label, with and without the distractors.
  - Left alone, marker distance predicts the label (ends of one long, fairly straight contour vs
    ends of two: about two thirds right at 128x128). Pairs are kept with a probability that gives
    both labels the same marker-distance distribution (`_distance_balancer`); a threshold on
    distance is then at chance.

Difficulty = target contour length in paddles: 'easy' 6, 'intermediate' 9, 'hard' 14 (LRA's
curv_baseline, curv_contour_length_9 and curv_contour_length_14). Paddle size, gaps, marker radius
and seed distance grow with the resolution (`GEOMETRIES`, after LRA's settings per resolution).
Generating is vectorised: 10K images of 32x32 take about 16 s of one CPU core; 64x64 and 128x128
about 5 ms per image.

Data options read from `config.data` by `load_pathfinder` (defaults: `pathfinder_data_config()`):
  resolution:     image side, one of 32 (LRA Pathfinder), 64, 128 (Path-X), 256. Default 32.
  difficulty:     'easy', 'intermediate' or 'hard'. Default 'hard' (the LRA split).
  num_train:      images generated for training. Default 160_000.
  num_validation: images generated for validation. Default 20_000.
  num_test:       images generated for test. Default 20_000. LRA used 200K images per difficulty,
                  split 80/10/10, which these defaults reproduce: at 32x32, ~5 CPU-minutes once,
                  then 200 MB of cache that loads at once; Path-X at 128x128, ~20 CPU-minutes and
                  3.3 GB. `pathfinder_data_config(quick=True)`: 3K images of 32x32, seconds.
  seed:           base seed; the three splits use distinct derived seeds. Default 0.
  cache_dir:      generated (or decoded LRA) images go to <cache_dir>/pathfinder/ as .npy files,
                  keyed by every option above (and GENERATOR_VERSION); '' disables caching.
                  Default 'data_cache'.
  path:           optional folder of the LRA release's images (`lra_release/pathfinder32`, one of
                  its difficulty folders, or their parent), laid out as
                  `<difficulty_dir>/imgs/<n>/sample_<k>.png` with metadata files
                  `<difficulty_dir>/metadata/<n>.npy` whose rows are
                  `[imgs_subdir, filename, image_index, label, ...]` (text lines, as released, or
                  saved numpy string arrays). Its images are shuffled with `seed` and split
                  80/10/10, each split then capped at num_train / num_validation / num_test.
                  Default None (generate).

Run `python -m efficient_attn.data.pathfinder --grid docs/pathfinder_examples.png` for a picture of
examples, `--time 10000` to time the generator.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import time
from typing import Any

from absl import logging
import ml_collections
from ml_collections import config_dict
import numpy as np

from efficient_attn.data.base import TaskData

DIFFICULTIES = {'easy': 6, 'intermediate': 9, 'hard': 14}
# The LRA release's folder for each difficulty.
LRA_DIFFICULTY_DIRS = {'easy': 'curv_baseline', 'intermediate': 'curv_contour_length_9',
                       'hard': 'curv_contour_length_14'}
# Bumped whenever generated images change, so that stale caches are not reused.
GENERATOR_VERSION = 1
VOCAB_SIZE = 257  # pixel intensity + 1; 0 is padding


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Drawing parameters for one resolution, in pixels (pixel centres at integer coordinates).

  Attributes:
    resolution: image side R.
    paddle_length: length of one paddle (a line segment).
    gap: distance between consecutive paddles of a contour, along the contour.
    paddle_width: width of a paddle's fully inked core; ink fades to 0 over half a pixel beyond.
    marker_radius: radius of a marker's fully inked disk.
    seed_distance: distance between the origin tips of the two target contours.
    max_turn: largest change of direction between consecutive paddles, radians (the turn is
      uniform in [-max_turn, max_turn]; our reading of the reference's `continuity`).
    border: smallest distance between any inked core and the image edge.
    distractor_budget: distractor contours per image = distractor_budget // distractor length
      (LRA's num_distractor_snakes).
    num_single_paddles: single-paddle distractors attempted per image.
    field_cell: cell size of the clearance field used while placing paddles.
  """
  resolution: int
  paddle_length: float
  gap: float
  paddle_width: float
  marker_radius: float
  seed_distance: float
  max_turn: float
  border: float
  distractor_budget: int
  num_single_paddles: int
  field_cell: float

  def __post_init__(self):
    # link_radius assumes that ink reaches sqrt(2)/2 from any core point (see there).
    if self.paddle_width / 2 + 0.5 < math.sqrt(0.5):
      raise ValueError(f'paddle_width must be >= {2 * math.sqrt(0.5) - 1:.3f}, got '
                       f'{self.paddle_width}.')

  @property
  def link_radius(self) -> float:
    """Ink pixels of one contour chain up with links of at most this length (the dash gap).

    Every point lies within sqrt(2)/2 of a pixel centre, and ink reaches half a pixel past a core of
    half-width >= sqrt(2)/2 - 1/2, so every core point has an inked pixel within sqrt(2)/2; two
    consecutive paddles, `gap` apart, thus have inked pixels at most gap + sqrt(2) apart.
    """
    return self.gap + math.sqrt(2.0) + 0.05

  @property
  def clearance(self) -> float:
    """Smallest core-to-core distance between distinct objects (contours, paddles, markers).

    Ink lies within half a pixel of a core, so the ink of two objects is more than
    clearance - 1 = link_radius apart: no chain of short links joins two objects.
    """
    return self.link_radius + 1.0 + 0.05


# After LRA's generator settings per resolution (paddle length, thickness, margin, marker radius,
# seed distance, distractor budget), adjusted so that dashes stay visible (gap >= paddle width + 0.5
# at 64+) and the clearance rule leaves room (seed distance 8 instead of 7 at 32x32).
GEOMETRIES = {
    32: Geometry(32, paddle_length=2.0, gap=1.0, paddle_width=0.6, marker_radius=1.5,
                 seed_distance=8.0, max_turn=0.9, border=0.5, distractor_budget=20,
                 num_single_paddles=6, field_cell=1.0),
    64: Geometry(64, paddle_length=4.0, gap=1.5, paddle_width=1.0, marker_radius=2.5,
                 seed_distance=12.0, max_turn=0.5, border=1.0, distractor_budget=22,
                 num_single_paddles=12, field_cell=1.0),
    128: Geometry(128, paddle_length=5.0, gap=2.5, paddle_width=1.5, marker_radius=3.0,
                  seed_distance=20.0, max_turn=0.45, border=1.0, distractor_budget=35,
                  num_single_paddles=40, field_cell=1.0),
    256: Geometry(256, paddle_length=8.0, gap=3.0, paddle_width=2.0, marker_radius=5.0,
                  seed_distance=27.0, max_turn=0.4, border=2.0, distractor_budget=30,
                  num_single_paddles=80, field_cell=2.0),
}

_FAR = np.float32(1e4)  # clearance-field value where nothing has been drawn nearby
_TURN_CANDIDATES = (4, 8)  # turn angles tried per paddle (in stages) before backtracking
_SEED_CANDIDATES = (8, 24)  # (position, direction) pairs tried for a contour's first paddle
_BACKTRACKS_PER_PADDLE = 1  # a contour gives up after `length` dead ends...
_ROUNDS_PER_PADDLE = 3  # ... or after 3 * length placement rounds
_BACKTRACK_DEPTH = 3  # a dead end drops up to this many paddles
_SECOND_TRIES = 3  # starts of the second target contour tried before redrawing the first
_MAX_TARGET_ROUNDS = 50  # rounds of drawing target pairs before giving up (1-3 are typical)
_DISTANCE_BINS = 32  # histogram bins of the marker-distance balancing


def geometry(resolution: int) -> Geometry:
  """The drawing parameters for `resolution` (ValueError unless one of GEOMETRIES)."""
  if isinstance(resolution, bool) or resolution not in GEOMETRIES:
    raise ValueError(f'resolution must be one of {sorted(GEOMETRIES)}, got {resolution!r}.')
  return GEOMETRIES[resolution]


def _contour_length(difficulty: str) -> int:
  if difficulty not in DIFFICULTIES:
    raise ValueError(f'difficulty must be one of {list(DIFFICULTIES)}, got {difficulty!r}.')
  return DIFFICULTIES[difficulty]


# --------------------------------------------------------------------------------------------------
# Geometry helpers. Coordinates come as separate y (row) and x (column) arrays: numpy is much faster
# on them than on a trailing axis of size 2.


def _segment_distance(py, px, ay, ax, by, bx):
  """Distance from points p to segments [a, b]; all arguments broadcast together."""
  dy, dx = by - ay, bx - ax
  length2 = np.maximum(dy * dy + dx * dx, np.float32(1e-12))
  t = np.clip(((py - ay) * dy + (px - ax) * dx) / length2, 0.0, 1.0)
  ey, ex = py - ay - t * dy, px - ax - t * dx
  return np.sqrt(ey * ey + ex * ex)


class _Clearance:
  """Distance fields over a batch: at each cell centre, the distance to the nearest drawn core.

  A field is float32 [n, G, G] with cells of side q covering the image [-0.5, R - 0.5]^2. Stamping
  writes exact distances into a square patch around the new object, large enough to cover every cell
  closer than the largest distance any check asks about; `ok` turns cell values back into a bound
  on the distance from an arbitrary point (the field is 1-Lipschitz).
  """

  def __init__(self, geom: Geometry, sample_step: float):
    self.geom = geom
    self.q = np.float32(geom.field_cell)
    self.cells = int(round(geom.resolution / geom.field_cell))
    self.sample_step = np.float32(sample_step)
    # A check reads cells up to sqrt(2) q from a sample and asks for at most `most` (a marker's
    # room), so a stamp must write every cell within most + sqrt(2) q of the object's core; cells
    # farther out may keep larger values. The patch is a square around the object's centre cell.
    most = geom.clearance + geom.marker_radius + sample_step / 2 + math.sqrt(2.0) * geom.field_cell
    self.half_width = {'paddle': geom.paddle_width / 2, 'marker': geom.marker_radius}
    self.offsets = {}
    for kind, half_length in (('paddle', geom.paddle_length / 2), ('marker', 0.0)):
      half = int(math.ceil((half_length + self.half_width[kind] + most) / geom.field_cell + 0.5))
      self.offsets[kind] = np.arange(-half, half + 1)

  def new(self, n: int) -> np.ndarray:
    return np.full((n, self.cells, self.cells), _FAR, np.float32)

  def _cell(self, v):
    return np.clip(np.floor((v + 0.5) / self.q).astype(np.int64), 0, self.cells - 1)

  def _centre(self, c):
    return (c.astype(np.float32) + 0.5) * self.q - 0.5

  def stamp(self, field, rows, ay, ax, by, bx, kind):
    """Draws one paddle per row, or a marker disk (a == b), into field.

    Args:
      field: float32 [n, G, G], contiguous, updated in place.
      rows: int [m], the field rows to draw into (distinct).
      ay, ax, by, bx: float32 [m], segment ends.
      kind: 'paddle' or 'marker'.
    """
    if rows.size == 0:
      return
    my, mx = (ay + by) / 2, (ax + bx) / 2
    dy, dx = by - ay, bx - ax
    length = np.sqrt(dy * dy + dx * dx)
    safe = np.maximum(length, np.float32(1e-6))
    uy, ux = np.where(length > 0, dy / safe, 1.0), np.where(length > 0, dx / safe, 0.0)
    # Clipping at the image edge repeats cells; they get identical values, so the scatter is safe.
    offsets = self.offsets[kind]
    ci = np.clip(self._cell(my)[:, None] + offsets, 0, self.cells - 1)  # [m, P]
    cj = np.clip(self._cell(mx)[:, None] + offsets, 0, self.cells - 1)
    ry = self._centre(ci) - my[:, None]
    rx = self._centre(cj) - mx[:, None]
    # Along and across the segment, a cell centre's coordinates are a row term plus a column term.
    along = (ry * uy[:, None])[:, :, None] + (rx * ux[:, None])[:, None, :]  # [m, P, P]
    across = (ry * -ux[:, None])[:, :, None] + (rx * uy[:, None])[:, None, :]
    np.abs(along, out=along)
    along -= (length / 2)[:, None, None]
    np.maximum(along, 0, out=along)
    along *= along
    across *= across
    along += across
    dist = np.sqrt(along, out=along)
    dist -= np.float32(self.half_width[kind])
    flat = (rows * self.cells * self.cells)[:, None, None] + (ci * self.cells)[:, :, None] + cj[
        :, None, :]
    values = field.reshape(-1)
    values[flat] = np.minimum(values[flat], dist)

  def ok(self, field, rows, py, px, need):
    """True where every sample is at least `need` (core gap + own half-width) from drawn cores.

    The field is 1-Lipschitz, so a cell centre c bounds the distance at a sample p from below by
    field(c) - |p - c|. Most samples pass with the nearest centre and the worst-case offset; the
    rest take the best bound of the four centres around them, which is nearly exact.

    Args:
      field: float32 [n, G, G], contiguous.
      rows: int [m], the field row of each candidate group.
      py, px: float32 [m, C, S], S samples along each of C candidates, `sample_step` apart.
      need: float32, broadcastable to [m, C, S]: required distance from each sample to any core.

    Returns:
      bool [m, C].
    """
    values = field.reshape(-1)
    g = self.cells
    need = np.broadcast_to(need, py.shape) + self.sample_step / 2  # for points between samples
    base = np.broadcast_to((rows * g * g)[:, None, None], py.shape)
    near = values[base + self._cell(py) * g + self._cell(px)]
    passed = near - self.q * np.float32(0.7072) >= need
    hard = np.flatnonzero(~passed)
    if hard.size:
      y, x, b, n = (a.reshape(-1)[hard] for a in (py, px, base, need))
      iy = np.floor((y + 0.5) / self.q - 0.5).astype(np.int64)
      ix = np.floor((x + 0.5) / self.q - 0.5).astype(np.int64)
      best = np.full(hard.size, -np.inf, np.float32)
      for ci in (np.clip(iy, 0, g - 1), np.clip(iy + 1, 0, g - 1)):
        dy2 = np.square(y - self._centre(ci))
        for cj in (np.clip(ix, 0, g - 1), np.clip(ix + 1, 0, g - 1)):
          bound = values[b + ci * g + cj] - np.sqrt(dy2 + np.square(x - self._centre(cj)))
          np.maximum(best, bound, out=best)
      passed.reshape(-1)[hard] = best >= n
    return np.all(passed, axis=-1)


@dataclasses.dataclass
class _Shapes:
  """Paddles, tips and markers of a batch of images.

  Attributes:
    ay, ax, by, bx: float32 [n, P], paddle ends; slots [0, 2L) are the two targets' paddles.
    valid: bool [n, P], slots holding a paddle.
    tips: float32 [n, 4, 2], (y, x) of the origin and terminal tips of targets 0 and 1:
      [origin 0, origin 1, terminal 0, terminal 1].
    markers: float32 [n, 2, 2], (y, x) of the two marker centres (an origin tip, a terminal tip).
  """
  ay: np.ndarray
  ax: np.ndarray
  by: np.ndarray
  bx: np.ndarray
  valid: np.ndarray
  tips: np.ndarray
  markers: np.ndarray


class _Grower:
  """Grows contours paddle by paddle, in many images at once, backtracking where one gets stuck."""

  def __init__(self, geom: Geometry, rng: np.random.Generator):
    self.geom = geom
    self.rng = rng
    # Samples at most half a pixel apart, whatever the field's cell size.
    self.samples = int(math.ceil(geom.paddle_length / min(0.5, geom.field_cell))) + 1
    self.clear = _Clearance(geom, geom.paddle_length / (self.samples - 1))
    self.t = np.linspace(0.0, geom.paddle_length, self.samples, dtype=np.float32)
    self.hw = np.float32(geom.paddle_width / 2)
    self.gap_need = np.float32(geom.clearance) + self.hw
    # A tip sample needs room for its marker disk.
    self.tip_need = np.float32(geom.clearance + geom.marker_radius)
    # Centre lines stay `border` plus a core half-width inside the image [-0.5, R - 0.5]^2.
    lo = geom.border - 0.5
    hi = geom.resolution - 0.5 - geom.border
    self.lo = np.float32(lo + self.hw)
    self.hi = np.float32(hi - self.hw)
    self.marker_lo = np.float32(lo + geom.marker_radius)
    self.marker_hi = np.float32(hi - geom.marker_radius)
    # Own paddles two or more back must stay a dash gap away.
    self.self_need = np.float32(geom.gap + geom.paddle_width)

  def _check(self, field, rows, py, px, tip_first, tip_last):
    """Bounds and clearance of candidate paddles.

    Args:
      field: float32 [n, G, G] clearance field of everything already committed, or None if
        nothing is.
      rows: int [m] field rows.
      py, px: float32 [m, C, S] samples along C candidate paddles per row.
      tip_first, tip_last: bool [m], whether the first / last sample is a tip that may carry a
        marker (then it needs the marker's room).

    Returns:
      bool [m, C].
    """
    m = rows.size
    # A paddle is straight and the allowed region a box: checking its two ends is enough.
    ok = np.ones(py.shape[:2], bool)
    for flag, k in ((tip_first, 0), (tip_last, -1)):
      lo = np.where(flag, self.marker_lo, self.lo)[:, None]
      hi = np.where(flag, self.marker_hi, self.hi)[:, None]
      y, x = py[..., k], px[..., k]
      ok &= (y >= lo) & (y <= hi) & (x >= lo) & (x <= hi)
    if field is None:  # nothing drawn yet
      return ok
    need = np.full((m, 1, self.samples), self.gap_need, np.float32)
    need[tip_first, 0, 0] = self.tip_need
    need[tip_last, 0, -1] = self.tip_need
    return ok & self.clear.ok(field, rows, py, px, need)

  def _candidates(self, sy, sx, theta):
    """Samples [m, C, S] along paddles starting at (sy, sx) [m, C] in directions theta [m, C]."""
    py = sy[..., None] + np.sin(theta)[..., None] * self.t
    px = sx[..., None] + np.cos(theta)[..., None] * self.t
    return py, px

  @staticmethod
  def _choose(ok, py, px, theta):
    """The first acceptable candidate per row (candidates come in random order).

    Returns:
      found bool [m] and the chosen paddle's (ay, ax, by, bx, theta), float32 [m] each.
    """
    pick = np.argmax(ok, axis=1)
    rows = np.arange(ok.shape[0])
    return ok.any(axis=1), (py[rows, pick, 0], px[rows, pick, 0], py[rows, pick, -1],
                            px[rows, pick, -1], theta[rows, pick])

  @staticmethod
  def _staged(propose, m, counts):
    """Runs `propose(idx, c)` -> (found, chosen) on rows idx with c candidates, in stages.

    Most rows accept one of the first few candidates, so later stages (more candidates) run only on
    the rows still without one: the same search for a fraction of the work.
    """
    found = np.zeros(m, bool)
    chosen = [np.zeros(m, np.float32) for _ in range(5)]
    idx = np.arange(m)
    for c in counts:
      if idx.size == 0:
        break
      ok, values = propose(idx, c)
      for out, value in zip(chosen, values):
        out[idx[ok]] = value[ok]
      found[idx[ok]] = True
      idx = idx[~ok]
    return found, chosen

  def _first(self, field, rows, origin, tip_first, tip_last):
    """Places paddle 0: anywhere, or with the origin tip seed_distance from `origin` (y, x)."""

    def propose(idx, c):
      m = idx.size
      theta = self.rng.uniform(0, 2 * np.pi, (m, c)).astype(np.float32)
      if origin is None:
        sy, sx = self.rng.uniform(self.lo, self.hi, (2, m, c)).astype(np.float32)
      else:
        phi = self.rng.uniform(0, 2 * np.pi, (m, c)).astype(np.float32)
        dist = np.float32(self.geom.seed_distance)
        sy = origin[0][idx, None] + dist * np.sin(phi)
        sx = origin[1][idx, None] + dist * np.cos(phi)
      py, px = self._candidates(sy, sx, theta)
      ok = self._check(field, rows[idx], py, px, tip_first[idx], tip_last[idx])
      return self._choose(ok, py, px, theta)

    return self._staged(propose, rows.size, _SEED_CANDIDATES)

  def _next(self, field, rows, paddles, theta, k, tip_last):
    """Places paddle k [m] >= 1 of each row: a gap, then a turn of at most max_turn."""
    length = paddles.shape[-1]
    gap = np.float32(self.geom.gap)

    def propose(idx, c):
      m = idx.size
      turn = self.rng.uniform(-self.geom.max_turn, self.geom.max_turn, (m, c)).astype(np.float32)
      kk = k[idx]
      new_theta = theta[idx, kk - 1][:, None] + turn
      sy = paddles[2, idx, kk - 1][:, None] + gap * np.sin(new_theta)
      sx = paddles[3, idx, kk - 1][:, None] + gap * np.cos(new_theta)
      py, px = self._candidates(sy, sx, new_theta)
      ok = self._check(field, rows[idx], py, px, np.zeros(m, bool), tip_last[idx])
      # The candidate's far end against own paddles 0..k-2 (the field holds committed objects
      # only): a contour turning back towards itself gets there first. This keeps contours from
      # running into themselves, which would shorten the path to follow; labels do not depend on
      # it, so the cheap end-only test is enough.
      earlier = np.arange(length) <= (kk - 2)[:, None]  # [m, L]
      ay, ax, by, bx = (v[idx, None, :] for v in paddles)
      dist = _segment_distance(py[..., -1:], px[..., -1:], ay, ax, by, bx)  # [m, C, L]
      ok &= np.where(earlier[:, None, :], dist, np.inf).min(axis=-1) >= self.self_need
      return self._choose(ok, py, px, new_theta)

    return self._staged(propose, rows.size, _TURN_CANDIDATES)

  def contour(self, field, rows, length, origin=None, *, tips: bool):
    """Grows one contour of `length` paddles in each row; nothing is committed to `field`.

    A row that finds no acceptable next paddle drops its last 1 to _BACKTRACK_DEPTH paddles and goes
    on; it gives up after `_BACKTRACKS_PER_PADDLE * length` such dead ends, or when the
    `_ROUNDS_PER_PADDLE * length` rounds are over.

    Args:
      field: float32 [n, G, G] clearance field to keep away from, or None if nothing is drawn.
      rows: int [m] field rows.
      length: paddles per contour.
      origin: optional (y, x) float32 [m] arrays: the origin tip must lie seed_distance from it.
      tips: whether the contour's two tips may carry markers.

    Returns:
      ok: bool [m], rows where the contour reached full length.
      paddles: float32 [4, m, length], (ay, ax, by, bx) of each paddle.
    """
    m = rows.size
    paddles = np.zeros((4, m, length), np.float32)
    theta = np.zeros((m, length), np.float32)
    k = np.zeros(m, np.int64)
    budget = np.full(m, _BACKTRACKS_PER_PADDLE * length)
    # Rounds are capped too: a few rows stuck in long backtracking would otherwise keep the whole
    # batch looping; they fail and their image is redrawn with the next batch of failures.
    for _ in range(_ROUNDS_PER_PADDLE * length):
      todo = (k < length) & (budget >= 0)
      if not todo.any():
        break
      fresh = np.flatnonzero(todo & (k == 0))
      grow = np.flatnonzero(todo & (k > 0))
      if fresh.size:
        seed_at = None if origin is None else (origin[0][fresh], origin[1][fresh])
        flags = np.full(fresh.size, tips)
        found, chosen = self._first(field, rows[fresh], seed_at, flags, flags & (length == 1))
        good = fresh[found]
        paddles[:, good, 0] = np.stack(chosen[:4])[:, found]
        theta[good, 0] = chosen[4][found]
        k[good] = 1
        budget[fresh[~found]] -= 1
      if grow.size:
        kk = k[grow]
        found, chosen = self._next(field, rows[grow], paddles[:, grow], theta[grow], kk,
                                   tips & (kk == length - 1))
        good, at = grow[found], kk[found]
        paddles[:, good, at] = np.stack(chosen[:4])[:, found]
        theta[good, at] = chosen[4][found]
        k[good] += 1
        bad = grow[~found]
        # Dropping a random 1..BACKTRACK_DEPTH paddles gets out of pockets that one cannot.
        k[bad] = np.maximum(k[bad] - self.rng.integers(1, _BACKTRACK_DEPTH + 1, bad.size), 0)
        budget[bad] -= 1
    return k == length, paddles

  def commit(self, field, rows, paddles, *, tips: bool):
    """Stamps contours (paddles float32 [4, m, L]) into field rows [m], tips as marker disks."""
    for k in range(paddles.shape[-1]):
      self.clear.stamp(field, rows, *paddles[:, :, k], 'paddle')
    if tips:
      for y, x in ((paddles[0, :, 0], paddles[1, :, 0]), (paddles[2, :, -1], paddles[3, :, -1])):
        self.clear.stamp(field, rows, y, x, y, x, 'marker')


def _distance_balancer(tips: np.ndarray, resolution: int):
  """Acceptance probabilities that give both labels the same marker-distance distribution.

  Positive markers sit at the two ends of one contour, negative ones at the ends of two; left
  alone, their distances differ enough to guess the label from them alone (at 128x128, about two
  thirds of the time). Accepting a pair of distance d with probability min(1, f_other(d) / f(d))
  leaves both labels distributed as min(f_pos, f_neg), normalised.

  Args:
    tips: float32 [k, 4, 2], origin 0, origin 1, terminal 0, terminal 1 of k >= 1 target pairs.
    resolution: the image side.

  Returns:
    accept(label int [m], distance float [m]) -> probability float [m].
  """
  pos = np.concatenate([_distance(tips[:, 0], tips[:, 2]), _distance(tips[:, 1], tips[:, 3])])
  neg = np.concatenate([_distance(tips[:, 0], tips[:, 3]), _distance(tips[:, 1], tips[:, 2])])
  # Bins of equal mass put the resolution where the distances are; the outer bins extend to 0 and
  # to the image diagonal.
  inner = np.quantile(np.concatenate([pos, neg]), np.linspace(0, 1, _DISTANCE_BINS + 1)[1:-1])
  edges = np.unique(np.concatenate([[0.0], inner, [resolution * math.sqrt(2.0)]]))
  bins = edges.size - 1
  # Add-one smoothing keeps rare distances possible when few pairs are seen.
  f_pos = (np.histogram(pos, edges)[0] + 1) / (pos.size + bins)
  f_neg = (np.histogram(neg, edges)[0] + 1) / (neg.size + bins)
  table = np.stack([np.minimum(1, f_pos / f_neg), np.minimum(1, f_neg / f_pos)])  # [label, bin]

  def accept(label, distance):
    return table[label, np.clip(np.searchsorted(edges, distance, side='right') - 1, 0, bins - 1)]

  return accept


def _distance(a, b):
  return np.sqrt(np.sum(np.square(a - b), axis=-1))


def _grow_shapes(geom: Geometry, contour_length: int, labels: np.ndarray,
                 rng: np.random.Generator) -> _Shapes:
  """Targets, tips, markers and distractors for n images with the given labels (int [n])."""
  n = labels.size
  grower = _Grower(geom, rng)
  length = contour_length
  distractor_length = max(1, length // 3)
  num_distractors = geom.distractor_budget // distractor_length
  slots = 2 * length + num_distractors * distractor_length + geom.num_single_paddles
  shape = _Shapes(*(np.zeros((n, slots), np.float32) for _ in range(4)),
                  valid=np.zeros((n, slots), bool), tips=np.zeros((n, 4, 2), np.float32),
                  markers=np.zeros((n, 2, 2), np.float32))
  field = grower.clear.new(n)

  def record(rows, paddles, slot):
    for i, arr in enumerate((shape.ay, shape.ax, shape.by, shape.bx)):
      arr[rows, slot:slot + paddles.shape[-1]] = paddles[i]
    shape.valid[rows, slot:slot + paddles.shape[-1]] = True

  # The targets: contour 0 anywhere, then contour 1 from an origin seed_distance from contour 0's,
  # keeping clear of it. Pairs where either gets stuck are dropped. Each round draws more pairs than
  # it needs (from the yield so far): rounds over a few leftovers would cost as much as a full one.
  empty = np.ones(n, bool)
  accept, rate = None, 0.5
  for _ in range(_MAX_TARGET_ROUNDS):
    m = int(math.ceil(empty.sum() / rate * 1.1)) + 8
    pool = np.arange(m)
    pool_field = grower.clear.new(m)
    ok0, first = grower.contour(None, pool, length, tips=True)
    pool, first = pool[ok0], first[:, ok0]
    grower.commit(pool_field, pool, first, tips=True)
    second = np.zeros_like(first)
    ok1 = np.zeros(pool.size, bool)
    for _ in range(_SECOND_TRIES):
      again = np.flatnonzero(~ok1)
      ok, paddles = grower.contour(pool_field, pool[again], length,
                                   (first[0, again, 0], first[1, again, 0]), tips=True)
      second[:, again[ok]] = paddles[:, ok]
      ok1[again[ok]] = True
    pool, first, second = pool[ok1], first[:, ok1], second[:, ok1]
    # Tips: origin 0, origin 1, terminal 0, terminal 1.
    tips = np.stack([first[:2, :, 0], second[:2, :, 0], first[2:, :, -1], second[2:, :, -1]],
                    axis=1).transpose(2, 1, 0)  # [k, 4, 2]
    if accept is None:
      if not pool.size:
        continue
      accept = _distance_balancer(tips, geom.resolution)
    # Markers: the origin of target s, and the terminal tip of the same target (label 1) or of the
    # other (label 0). Each pair is offered to a random label and kept with the balancing
    # probability for its marker distance; kept pairs fill the empty rows of their label.
    k = pool.size
    offer = rng.integers(0, 2, k)
    s = rng.integers(0, 2, k)
    t = 2 + np.where(offer == 1, s, 1 - s)
    markers = np.stack([tips[np.arange(k), s], tips[np.arange(k), t]], axis=1)  # [k, 2, 2]
    kept = rng.random(k) < accept(offer, _distance(markers[:, 0], markers[:, 1]))
    chosen, rows = [], []
    for label in (0, 1):
      pairs = np.flatnonzero(kept & (offer == label))
      slots_open = np.flatnonzero(empty & (labels == label))
      take = min(pairs.size, slots_open.size)
      chosen.append(pairs[:take])
      rows.append(slots_open[:take])
    chosen, rows = np.concatenate(chosen), np.concatenate(rows)
    rate = max(0.05, (rate + chosen.size / m) / 2)
    grower.commit(pool_field, pool[chosen], second[:, chosen], tips=True)
    field[rows] = pool_field[pool[chosen]]
    record(rows, first[:, chosen], 0)
    record(rows, second[:, chosen], length)
    shape.tips[rows] = tips[chosen]
    shape.markers[rows] = markers[chosen]
    empty[rows] = False
    if not empty.any():
      break
  else:
    raise RuntimeError(f'Could not place the target contours in {empty.sum()} images after '
                       f'{_MAX_TARGET_ROUNDS} rounds ({geom}, contour_length={length}).')

  # Distractors, while room remains: an object that cannot be placed is left out of that image, and
  # an image where two objects in a row found no room is full (the reference generator also stops
  # when little room is left).
  slot = 2 * length
  misses = np.zeros(n, np.int64)
  objects = [distractor_length] * num_distractors + [1] * geom.num_single_paddles
  for i, obj_length in enumerate(objects):
    if i and obj_length != objects[i - 1]:
      misses[:] = 0  # a single paddle may fit where a contour did not
    rows = np.flatnonzero(misses < 2)
    ok, paddles = grower.contour(field, rows, obj_length, tips=False)
    misses[rows] = np.where(ok, 0, misses[rows] + 1)
    rows, paddles = rows[ok], paddles[:, ok]
    grower.commit(field, rows, paddles, tips=False)
    record(rows, paddles, slot)
    slot += obj_length
  return shape


# --------------------------------------------------------------------------------------------------
# Rendering.


def _render(geom: Geometry, shape: _Shapes, slots: slice | None = None):
  """Anti-aliased rendering: float32 [n, R, R] in [0, 1].

  Ink at distance d from a core of half-width h is clip(h + 0.5 - d, 0, 1): full inside the core,
  fading to zero half a pixel beyond it.

  Args:
    geom: the drawing parameters.
    shape: the paddles (only the `slots` columns are drawn; all by default) and markers.
    slots: which paddle slots to draw.
  """
  markers = shape.markers
  n, r = markers.shape[0], geom.resolution
  image = np.zeros((n, r, r), np.float32)
  rows = np.arange(n)[:, None, None]

  def draw(ay, ax, by, bx, half_width, valid):
    reach = math.ceil(max(geom.paddle_length / 2, 0) + half_width + 1.0)
    offsets = np.arange(-reach, reach + 1)
    ci = np.clip(np.rint((ay + by) / 2).astype(np.int32)[:, None] + offsets, 0, r - 1)
    cj = np.clip(np.rint((ax + bx) / 2).astype(np.int32)[:, None] + offsets, 0, r - 1)
    dist = _segment_distance(ci[:, :, None].astype(np.float32), cj[:, None, :].astype(np.float32),
                             ay[:, None, None], ax[:, None, None], by[:, None, None],
                             bx[:, None, None])
    ink = np.clip(np.float32(half_width + 0.5) - dist, 0.0, 1.0) * valid[:, None, None]
    index = (rows, ci[:, :, None], cj[:, None, :])
    image[index] = np.maximum(image[index], ink)

  columns = range(shape.valid.shape[1])[slots or slice(None)]
  hw = geom.paddle_width / 2
  for p in columns:
    draw(shape.ay[:, p], shape.ax[:, p], shape.by[:, p], shape.bx[:, p], hw, shape.valid[:, p])
  for j in range(2):
    y, x = markers[:, j, 0], markers[:, j, 1]
    draw(y, x, y, x, geom.marker_radius, np.ones(n, bool))
  return image


def _to_uint8(image: np.ndarray) -> np.ndarray:
  return np.rint(image * 255.0).astype(np.uint8)


def _check_count(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


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
  n = _check_count('num_images', num_images, 0)
  geom = geometry(resolution)
  length = _contour_length(difficulty)
  seed = _check_count('seed', seed, 0)
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
    shape = _grow_shapes(geom, length, labels[start:stop], rng)
    images[start:stop] = _to_uint8(_render(geom, shape))
    if debug:
      extra['targets'][start:stop] = _to_uint8(_render(geom, shape, slots=slice(0, 2 * length)))
      extra['markers'][start:stop] = shape.markers
      extra['tips'][start:stop] = shape.tips
  if debug:
    return images, labels, extra
  return images, labels


# --------------------------------------------------------------------------------------------------
# The task: splits, cache, LRA files, loader.


class PathfinderSplit:
  """A split of Pathfinder images (a `base.Split`).

  Attributes:
    images: uint8 [N, R, R] (a numpy array or a read-only memmap of the cache file).
    labels: int [N].
    num_examples: N.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
      raise ValueError(f'images must be uint8 [N, R, R], got {images.dtype} {images.shape}.')
    labels = np.asarray(labels)
    if labels.shape != images.shape[:1]:
      raise ValueError(f'labels must have shape [{images.shape[0]}], got {labels.shape}.')
    if labels.size and not np.isin(labels, (0, 1)).all():
      raise ValueError('labels must be 0 or 1.')
    self.images = images
    self.labels = labels
    self.num_examples = int(images.shape[0])

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `indices` (int [k]).

    Returns:
      {'inputs': int32 [k, R*R] (pixel + 1, row by row), 'mask': bool [k, R*R] (all True),
       'labels': int32 [k]}.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
      raise ValueError(f'indices must be a 1-D integer array, got {idx.dtype} {idx.shape}.')
    if idx.size and (idx.min() < 0 or idx.max() >= self.num_examples):
      raise ValueError(f'indices must be in [0, {self.num_examples}), got range '
                       f'[{idx.min()}, {idx.max()}].')
    idx = idx.astype(np.int64)
    length = self.images.shape[1] * self.images.shape[2]
    pixels = self.images[idx].reshape(idx.size, length).astype(np.int32)
    return {'inputs': pixels + 1, 'mask': np.ones(pixels.shape, bool),
            'labels': self.labels[idx].astype(np.int32)}


def pathfinder_data_config(quick: bool = False) -> ml_collections.ConfigDict:
  """The data options of the Pathfinder task (see the module docstring).

  Args:
    quick: a small 32x32 set (2000 / 500 / 500 images, a few seconds to generate) for smoke runs.
  """
  c = ml_collections.ConfigDict()
  c.task = 'pathfinder'
  c.resolution = 32  # 32: LRA Pathfinder; 128: Path-X
  c.difficulty = 'hard'  # the LRA split (contours of 14 paddles)
  # LRA: 200K images per difficulty, split 80/10/10.
  c.num_train = 2_000 if quick else 160_000
  c.num_validation = 500 if quick else 20_000
  c.num_test = 500 if quick else 20_000
  c.seed = 0
  c.cache_dir = 'data_cache'
  c.path = config_dict.placeholder(str)  # LRA release folder; unset: generate
  return c


_SPLITS = ('train', 'validation', 'test')


def _option(data_config: Any, name: str, default: Any) -> Any:
  value = data_config.get(name, default) if hasattr(data_config, 'get') else getattr(
      data_config, name, default)
  return default if value is None else value


def _cache_paths(cache_dir: str, key: dict[str, Any]) -> tuple[str, str]:
  """(images path, labels path) of the cache entry for `key`, readable and collision-free."""
  text = repr(sorted(key.items()))
  digest = hashlib.sha256(text.encode()).hexdigest()[:16]
  stem = os.path.join(os.path.expanduser(cache_dir), 'pathfinder',
                      f"pathfinder{key['resolution']}_{key['difficulty']}_{key['split']}_{digest}")
  return stem + '.images.npy', stem + '.labels.npy'


def _save_atomic(path: str, array: np.ndarray) -> None:
  # Written under a temporary name and renamed, so that a concurrent reader never sees half a file.
  tmp = f'{path}.{os.getpid()}.tmp.npy'
  np.save(tmp, array)
  os.replace(tmp, path)


def _cached(cache_dir: str, key: dict[str, Any], make) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) from the cache entry for `key`, else from make() (then stored)."""
  if not cache_dir:
    return make()
  images_path, labels_path = _cache_paths(cache_dir, key)
  if os.path.exists(images_path) and os.path.exists(labels_path):
    logging.info('Pathfinder: loading %s', images_path)
    return np.load(images_path, mmap_mode='r'), np.load(labels_path)
  images, labels = make()
  os.makedirs(os.path.dirname(images_path), exist_ok=True)
  _save_atomic(images_path, images)
  _save_atomic(labels_path, labels)
  return images, labels


def _read_metadata(path: str) -> list[list[str]]:
  """Rows of one LRA metadata file: text lines of space-separated fields, or a saved string array.
  """
  with open(path, 'rb') as f:
    raw = f.read()
  if raw.startswith(b'\x93NUMPY'):
    with open(path, 'rb') as f:
      array = np.load(f, allow_pickle=False)
    rows = [[str(v) for v in row] for row in np.atleast_2d(array)]
  else:
    rows = [line.split() for line in raw.decode('utf-8').splitlines() if line.strip()]
  for row in rows:
    if len(row) < 4:
      raise ValueError(f'{path}: metadata rows need >= 4 fields [imgs_subdir, filename, index, '
                       f'label, ...], got {row!r}.')
  return rows


def find_lra_dir(path: str, resolution: int, difficulty: str) -> str:
  """The LRA difficulty folder (holding imgs/ and metadata/) for `path`; ValueError if none."""
  name = LRA_DIFFICULTY_DIRS[difficulty]
  root = os.path.expanduser(path)
  candidates = [root, os.path.join(root, name),
                os.path.join(root, f'pathfinder{resolution}', name),
                os.path.join(root, 'lra_release', f'pathfinder{resolution}', name)]
  for folder in candidates:
    if os.path.isdir(os.path.join(folder, 'metadata')) and os.path.isdir(
        os.path.join(folder, 'imgs')):
      # A difficulty folder named differently from the one asked for is a configuration mistake.
      base = os.path.basename(os.path.normpath(folder))
      if base in LRA_DIFFICULTY_DIRS.values() and base != name:
        raise ValueError(f'{folder} holds {base}, but difficulty {difficulty!r} needs {name}.')
      return folder
  raise ValueError(
      f'No LRA Pathfinder layout found for path={path!r} (resolution {resolution}, difficulty '
      f'{difficulty!r}): expected a folder with metadata/<n>.npy and imgs/<n>/sample_<k>.png among '
      f'{candidates}.')


def read_lra(path: str, resolution: int, difficulty: str) -> tuple[np.ndarray, np.ndarray]:
  """All images and labels of one LRA release difficulty folder, in metadata order.

  Returns:
    images uint8 [N, R, R] and labels int32 [N]. Rows whose image file is missing are skipped with a
    warning (the Path-X release is known to lack a few).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only this reader needs Pillow)

  folder = find_lra_dir(path, resolution, difficulty)
  meta_dir = os.path.join(folder, 'metadata')
  files = [f for f in os.listdir(meta_dir) if f.endswith('.npy')]
  if not files:
    raise ValueError(f'{meta_dir} holds no metadata .npy files.')
  # Numeric order (0, 1, 2, ..., 10), as the files are named by batch number.
  files.sort(key=lambda f: (int(f[:-4]) if f[:-4].isdigit() else math.inf, f))
  images, labels, missing = [], [], 0
  for name in files:
    for row in _read_metadata(os.path.join(meta_dir, name)):
      image_path = os.path.join(folder, row[0], row[1])
      if not os.path.exists(image_path):
        missing += 1
        continue
      with Image.open(image_path) as img:
        pixels = np.asarray(img.convert('L'), np.uint8)
      if pixels.shape != (resolution, resolution):
        raise ValueError(f'{image_path} is {pixels.shape}, expected ({resolution}, {resolution}).')
      label = int(float(row[3]))
      if label not in (0, 1):
        raise ValueError(f'{name}: label must be 0 or 1, got {row[3]!r}.')
      images.append(pixels)
      labels.append(label)
  if missing:
    logging.warning('Pathfinder: %d images listed in %s are missing; skipped.', missing, meta_dir)
  if not images:
    raise ValueError(f'No images found under {folder}.')
  return np.stack(images), np.asarray(labels, np.int32)


def _split_seed(seed: int, index: int) -> int:
  # Injective in (seed, index): no two (seed, split) pairs share a generator seed.
  return 3 * seed + index


def load_pathfinder(data_config: Any) -> TaskData:
  """The Pathfinder task (generated, or read from LRA files) as a 'classify' TaskData."""
  resolution = _option(data_config, 'resolution', 32)
  geometry(resolution)
  difficulty = _option(data_config, 'difficulty', 'hard')
  _contour_length(difficulty)
  seed = _check_count('seed', _option(data_config, 'seed', 0), 0)
  counts = [_check_count(f'num_{s}', _option(data_config, f'num_{s}', d), 1)
            for s, d in zip(_SPLITS, (160_000, 20_000, 20_000))]
  cache_dir = _option(data_config, 'cache_dir', '')
  path = _option(data_config, 'path', None)
  splits = []
  if path:
    folder = os.path.abspath(find_lra_dir(path, resolution, difficulty))
    # The decoded release, whatever the seed and counts (they only pick from it).
    key = {'resolution': resolution, 'difficulty': difficulty, 'source': folder, 'split': 'lra'}
    images, labels = _cached(cache_dir, key, lambda: read_lra(path, resolution, difficulty))
    order = np.random.default_rng([seed, 0x9A7F]).permutation(labels.size)
    ends = [int(labels.size * 0.8), int(labels.size * 0.9), labels.size]
    for start, stop, count in zip([0] + ends[:2], ends, counts):
      idx = np.sort(order[start:stop][:count])
      splits.append(PathfinderSplit(np.asarray(images[idx]), np.asarray(labels[idx])))
  else:
    for index, (name, count) in enumerate(zip(_SPLITS, counts)):
      key = {'resolution': resolution, 'difficulty': difficulty, 'seed': seed, 'split': name,
             'num': count, 'version': GENERATOR_VERSION}
      split_seed = _split_seed(seed, index)
      images, labels = _cached(
          cache_dir, key, lambda c=count, s=split_seed: generate(
              c, resolution=resolution, difficulty=difficulty, seed=s))
      splits.append(PathfinderSplit(images, labels))
  return TaskData(train=splits[0], validation=splits[1], test=splits[2], vocab_size=VOCAB_SIZE,
                  num_classes=2, kind='classify', max_length=resolution * resolution)


# --------------------------------------------------------------------------------------------------
# Entry point: example grid and timing.


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


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--grid', help='write a PNG grid of examples to this path')
  parser.add_argument('--time', type=int, default=0, help='time the generation of this many images')
  parser.add_argument('--resolution', type=int, default=32)
  parser.add_argument('--difficulty', default='hard', choices=list(DIFFICULTIES))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if not args.grid and not args.time:
    parser.error('nothing to do: pass --grid PATH and/or --time N')
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
else:
  # Running this file as a script executes it a second time, as __main__, after the package import
  # has registered the loader; registering twice under another module name would be an error.
  from efficient_attn.data.registry import register_task  # pylint: disable=g-import-not-at-top
  register_task('pathfinder')(load_pathfinder)
