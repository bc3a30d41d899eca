"""Rendering Pathfinder shapes: anti-aliased paddles and marker disks, as uint8 images."""
from __future__ import annotations

import math

import numpy as np

from efficient_attn.data.pathfinder.contours import Shapes
from efficient_attn.data.pathfinder.geometry import Geometry, segment_distance


def render(geom: Geometry, shape: Shapes, slots: slice | None = None):
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
    dist = segment_distance(ci[:, :, None].astype(np.float32), cj[:, None, :].astype(np.float32),
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


def to_uint8(image: np.ndarray) -> np.ndarray:
  return np.rint(image * 255.0).astype(np.uint8)
