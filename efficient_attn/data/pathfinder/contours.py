"""Growing the Pathfinder contours: two targets, their markers, then distractors, batch-vectorised.

Following the reference generator (the `snakes2` script of the pathfinder repository, with LRA's
settings): two target contours grow paddle by paddle from origin tips `seed_distance` apart; each new
paddle turns by at most `max_turn` from the previous one and must keep its clearance from everything
already drawn (a contour that gets stuck backtracks a few paddles; a pair that stays stuck is
redrawn); then distractor contours of a third of the target length and single paddles are added while
room remains. A marker goes on the origin tip of one target and on the terminal tip of the same
target (label 1) or of the other (label 0); pairs are kept with a probability that gives both labels
the same marker-distance distribution (`distance_balancer`). Here the targets grow one after the
other, all images of a batch at once in numpy.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from efficient_attn.data.pathfinder.geometry import Clearance, Geometry, segment_distance

_TURN_CANDIDATES = (4, 8)  # turn angles tried per paddle (in stages) before backtracking
_SEED_CANDIDATES = (8, 24)  # (position, direction) pairs tried for a contour's first paddle
_BACKTRACKS_PER_PADDLE = 1  # a contour gives up after `length` dead ends...
_ROUNDS_PER_PADDLE = 3  # ... or after 3 * length placement rounds
_BACKTRACK_DEPTH = 3  # a dead end drops up to this many paddles
_SECOND_TRIES = 3  # starts of the second target contour tried before redrawing the first
_MAX_TARGET_ROUNDS = 50  # rounds of drawing target pairs before giving up (1-3 are typical)
_DISTANCE_BINS = 32  # histogram bins of the marker-distance balancing


@dataclasses.dataclass
class Shapes:
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
    self.clear = Clearance(geom, geom.paddle_length / (self.samples - 1))
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
      dist = segment_distance(py[..., -1:], px[..., -1:], ay, ax, by, bx)  # [m, C, L]
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


def distance_balancer(tips: np.ndarray, resolution: int):
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


def grow_shapes(geom: Geometry, contour_length: int, labels: np.ndarray,
                 rng: np.random.Generator) -> Shapes:
  """Targets, tips, markers and distractors for n images with the given labels (int [n])."""
  n = labels.size
  grower = _Grower(geom, rng)
  length = contour_length
  distractor_length = max(1, length // 3)
  num_distractors = geom.distractor_budget // distractor_length
  slots = 2 * length + num_distractors * distractor_length + geom.num_single_paddles
  shape = Shapes(*(np.zeros((n, slots), np.float32) for _ in range(4)),
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
      accept = distance_balancer(tips, geom.resolution)
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
