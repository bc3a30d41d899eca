"""Pathfinder drawing parameters and the clearance field that keeps drawn objects apart.

`Geometry` holds the sizes of one resolution in pixels (pixel centres at integer coordinates);
`GEOMETRIES` the four resolutions, after LRA's generator settings per resolution. `Clearance` keeps,
for a batch of images, the distance from every cell of a grid to the nearest drawn core, so that a new
paddle can be checked against everything already drawn in O(samples).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

# Difficulty -> target contour length in paddles (LRA's curv_baseline, curv_contour_length_9 and
# curv_contour_length_14).
DIFFICULTIES = {'easy': 6, 'intermediate': 9, 'hard': 14}


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


def geometry(resolution: int) -> Geometry:
  """The drawing parameters for `resolution` (ValueError unless one of GEOMETRIES)."""
  if isinstance(resolution, bool) or resolution not in GEOMETRIES:
    raise ValueError(f'resolution must be one of {sorted(GEOMETRIES)}, got {resolution!r}.')
  return GEOMETRIES[resolution]


def contour_length(difficulty: str) -> int:
  """Paddles per target contour for `difficulty` (ValueError unless one of DIFFICULTIES)."""
  if difficulty not in DIFFICULTIES:
    raise ValueError(f'difficulty must be one of {list(DIFFICULTIES)}, got {difficulty!r}.')
  return DIFFICULTIES[difficulty]



# --------------------------------------------------------------------------------------------------
# Geometry helpers. Coordinates come as separate y (row) and x (column) arrays: numpy is much faster
# on them than on a trailing axis of size 2.


def segment_distance(py, px, ay, ax, by, bx):
  """Distance from points p to segments [a, b]; all arguments broadcast together."""
  dy, dx = by - ay, bx - ax
  length2 = np.maximum(dy * dy + dx * dx, np.float32(1e-12))
  t = np.clip(((py - ay) * dy + (px - ax) * dx) / length2, 0.0, 1.0)
  ey, ex = py - ay - t * dy, px - ax - t * dx
  return np.sqrt(ey * ey + ex * ex)


class Clearance:
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
