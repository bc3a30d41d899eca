"""Pathfinder and Path-X (Long Range Arena): the task, over generated images or the LRA release's.

An image shows two dashed contours among distractors and two markers; label 1 when both markers lie
on one contour (see generator.py). Images are flattened row by row into R * R pixel tokens (1024 for
the LRA Pathfinder at 32x32, 16384 for Path-X at 128x128), id = intensity + 1 as for Image
(`tokenizers.PIXEL_OFFSET`, vocabulary `tokenizers.PIXEL_VOCAB_SIZE`).

The package:
  geometry.py   drawing parameters per resolution, the clearance field
  contours.py   growing targets, markers and distractors (after the reference `snakes2` generator)
  render.py     anti-aliased rendering
  generator.py  `generate(num_images, resolution=, difficulty=, seed=)`
  lra.py        the LRA release's reader (`read_lra`)
  __init__.py   (this file) the task: data options, split, cache, `load_pathfinder`
  __main__.py   `python -m efficient_attn.data.pathfinder --grid docs/pathfinder_examples.png`
                for a picture of examples, `--time 10000` to time the generator

Splits and seeds follow the other tasks (splits.py): generated splits are seeded with
`split_seed(seed, split)`, as ListOps'; the LRA release, which has no splits, gets a seeded 10% test
carve-out (`carve_test`) and a 10% validation carve-out of the rest (`carve_validation`), each split
then capped at its count with `limit_examples`.

Data options read from `config.data` by `load_pathfinder` (defaults: `pathfinder_data_config()`):
  resolution:     image side, one of 32 (LRA Pathfinder), 64, 128 (Path-X), 256. Default 32.
  difficulty:     'easy', 'intermediate' or 'hard'. Default 'hard' (the LRA split).
  num_train:      images generated for training. Default 160_000.
  num_validation: images generated for validation. Default 20_000.
  num_test:       images generated for test. Default 20_000. LRA used 200K images per difficulty,
                  split 80/10/10, which these defaults reproduce: at 32x32, ~5 CPU-minutes once,
                  then 200 MB of cache that loads at once; Path-X at 128x128, ~20 CPU-minutes and
                  3.3 GB. `pathfinder_data_config(quick=True)`: 3K images of 32x32, seconds.
  seed:           base seed of the split seeds (and of the LRA carve-outs). Default 0.
  cache_dir:      generated (or decoded LRA) images go to <cache_dir>/pathfinder/ as .npy files,
                  keyed by every option that changes them (and GENERATOR_VERSION); '' disables
                  caching. Default 'data_cache'.
  path:           optional folder of the LRA release's images (`lra_release/pathfinder32`, one of
                  its difficulty folders, or their parent; layout in lra.py). Its images are split
                  80/10/10 as above, each split then capped at num_train / num_validation / num_test.
                  Default None (generate).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

from absl import logging
import ml_collections
from ml_collections import config_dict
import numpy as np

from efficient_attn.data import tokenizers
from efficient_attn.data.base import SPLITS, TaskData
from efficient_attn.data.pathfinder.generator import GENERATOR_VERSION, generate
from efficient_attn.data.pathfinder.geometry import (DIFFICULTIES, GEOMETRIES, Geometry,
                                                     contour_length, geometry)
from efficient_attn.data.pathfinder.lra import LRA_DIFFICULTY_DIRS, find_lra_dir, read_lra
from efficient_attn.data.registry import register_task
from efficient_attn.data.splits import (TokenSplit, carve_test, carve_validation, check_count,
                                        check_labels, limit_examples, split_seed)

TASK = 'pathfinder'
NUM_CLASSES = 2
_LRA_FRACTION = 10  # the release is split 80/10/10: validation and test get 1/10 each


class PathfinderSplit(TokenSplit):
  """A split of Pathfinder images: a `TokenSplit` over their pixels, row by row.

  Attributes:
    images: uint8 [N, R, R] (a numpy array or a read-only memmap of the cache file).
    labels: uint8 [N], 0 or 1.
    num_examples: N.
  `get(indices)` returns {'inputs': int32 [k, R*R] (pixel + 1), 'mask': bool [k, R*R] (all True),
  'labels': int32 [k]}.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
      raise ValueError(f'images must be uint8 [N, R, R], got {images.dtype} {images.shape}.')
    labels = np.asarray(labels)
    if labels.shape != images.shape[:1]:
      raise ValueError(f'labels must have shape [{images.shape[0]}], got {labels.shape}.')
    labels = check_labels(labels, task=TASK, num_classes=NUM_CLASSES)
    n, r = images.shape[:2]
    # A reshape of a (memmapped) contiguous array is a view: the pixels stay on disk until asked for.
    super().__init__(images.reshape(n, r * r), np.full(n, r * r, np.int32), labels,
                     offset=tokenizers.PIXEL_OFFSET)
    self.images = images


def pathfinder_data_config(quick: bool = False, tiny: bool = False) -> ml_collections.ConfigDict:
  """The data options of the Pathfinder task (see the module docstring).

  Args:
    quick: a small 32x32 set (2000 / 500 / 500 images, a few seconds to generate) for CPU runs.
    tiny: 200 / 50 / 50 images (under a second), for tests and smoke runs.
  """
  c = ml_collections.ConfigDict()
  c.task = TASK
  c.resolution = 32  # 32: LRA Pathfinder; 128: Path-X
  c.difficulty = 'hard'  # the LRA split (contours of 14 paddles)
  # LRA: 200K images per difficulty, split 80/10/10.
  c.num_train = 160_000
  c.num_validation = 20_000
  c.num_test = 20_000
  if quick:
    c.num_train, c.num_validation, c.num_test = 2_000, 500, 500
  if tiny:
    c.num_train, c.num_validation, c.num_test = 200, 50, 50
  c.seed = 0  # the split seeds (split_seed) and the LRA carve-outs derive from it
  c.cache_dir = 'data_cache'
  c.path = config_dict.placeholder(str)  # LRA release folder; unset: generate
  return c


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


def lra_split_indices(num_images: int, counts: tuple[int, int, int],
                      seed: int) -> list[np.ndarray]:
  """(train, validation, test) indices into the `num_images` images of an LRA release folder.

  A seeded tenth is the test split, a seeded tenth of the whole is carved from the rest as
  validation, and each split is then capped at its count (`counts`: num_train, num_validation,
  num_test) by a seeded random subset; every array is sorted.
  """
  if num_images < 3:
    raise ValueError(f'{TASK}: the LRA folder holds {num_images} images; train, validation and '
                     'test need at least 3.')
  carved = max(1, num_images // _LRA_FRACTION)
  rest, test = carve_test(num_images, carved, seed, task=TASK)
  train, validation = carve_validation(rest.size, carved, seed, task=TASK)
  parts = (rest[train], rest[validation], test)
  return [limit_examples(idx, count, seed, tag)
          for tag, (idx, count) in enumerate(zip(parts, counts))]


def check_data_config(c) -> None:
  """Raises ValueError naming the first invalid Pathfinder option (`c` holds every option);
  generates and reads nothing."""
  if isinstance(c.resolution, bool) or c.resolution not in GEOMETRIES:
    raise ValueError(f'{TASK}: config.data.resolution must be one of {sorted(GEOMETRIES)}, got '
                     f'{c.resolution!r}.')
  if c.difficulty not in DIFFICULTIES:
    raise ValueError(f'{TASK}: config.data.difficulty must be one of {list(DIFFICULTIES)}, got '
                     f'{c.difficulty!r}.')
  check_count(c.seed, name='seed', minimum=0, task=TASK)
  for split in SPLITS:
    check_count(c[f'num_{split}'], name=f'num_{split}', minimum=1, task=TASK)


@register_task(TASK, config=pathfinder_data_config)
def load_pathfinder(c) -> TaskData:
  """The Pathfinder task (generated, or read from LRA files) as a 'classify' TaskData."""
  check_data_config(c)
  resolution, difficulty, seed = int(c.resolution), c.difficulty, int(c.seed)
  counts = tuple(int(c[f'num_{s}']) for s in SPLITS)
  splits = []
  if c.path:
    folder = os.path.abspath(find_lra_dir(c.path, resolution, difficulty))
    # The decoded release, whatever the seed and counts (they only pick from it).
    key = {'resolution': resolution, 'difficulty': difficulty, 'source': folder, 'split': 'lra'}
    images, labels = _cached(c.cache_dir, key, lambda: read_lra(c.path, resolution, difficulty))
    for idx in lra_split_indices(labels.size, counts, seed):
      splits.append(PathfinderSplit(np.asarray(images[idx]), np.asarray(labels[idx])))
  else:
    for name, count in zip(SPLITS, counts):
      generator_seed = split_seed(seed, name)
      # Keyed by the arguments of `generate` (the split name only makes the file name readable).
      key = {'resolution': resolution, 'difficulty': difficulty, 'generator_seed': generator_seed,
             'split': name, 'num': count, 'version': GENERATOR_VERSION}
      images, labels = _cached(
          c.cache_dir, key, lambda n=count, s=generator_seed: generate(
              n, resolution=resolution, difficulty=difficulty, seed=s))
      splits.append(PathfinderSplit(images, labels))
  return TaskData(train=splits[0], validation=splits[1], test=splits[2],
                  vocab_size=tokenizers.PIXEL_VOCAB_SIZE, num_classes=NUM_CLASSES, kind='classify',
                  max_length=resolution * resolution)


__all__ = [
    'DIFFICULTIES', 'GENERATOR_VERSION', 'GEOMETRIES', 'Geometry', 'LRA_DIFFICULTY_DIRS',
    'PathfinderSplit', 'check_data_config', 'contour_length', 'find_lra_dir', 'generate', 'geometry', 'load_pathfinder',
    'lra_split_indices', 'pathfinder_data_config', 'read_lra',
]
