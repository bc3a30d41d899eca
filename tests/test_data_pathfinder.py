"""Tests of the Pathfinder generator, split, cache, LRA-file reader and loader."""
from __future__ import annotations

import collections
import math
import os

import ml_collections
import numpy as np
import pytest

from efficient_attn.data import pathfinder as pf
from efficient_attn.data import tokenizers
from efficient_attn.data.base import SPLITS, TaskData
from efficient_attn.data.pathfinder import __main__ as pathfinder_cli
from efficient_attn.data.pathfinder import contours
from efficient_attn.data.splits import split_seed


def _components(ink: np.ndarray, radius: float) -> np.ndarray:
  """Component ids [R, R] of the pixels in `ink` (bool [R, R]), linked when at most `radius` apart.

  A breadth-first search of our own, since the links are longer than scipy.ndimage.label's.
  Pixels outside `ink` get -1.
  """
  reach = int(math.floor(radius))
  offsets = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
             if (dy, dx) != (0, 0) and dy * dy + dx * dx <= radius * radius]
  size = ink.shape[0]
  labels = np.full(ink.shape, -1, np.int64)
  current = 0
  for y0, x0 in zip(*np.nonzero(ink)):
    if labels[y0, x0] >= 0:
      continue
    labels[y0, x0] = current
    queue = collections.deque([(y0, x0)])
    while queue:
      y, x = queue.popleft()
      for dy, dx in offsets:
        v, u = y + dy, x + dx
        if 0 <= v < size and 0 <= u < size and ink[v, u] and labels[v, u] < 0:
          labels[v, u] = current
          queue.append((v, u))
    current += 1
  return labels


def _component_at(labels: np.ndarray, point: np.ndarray) -> int:
  """The component of the pixel nearest `point` (y, x); it must be inked."""
  y, x = (int(round(float(v))) for v in point)
  assert labels[y, x] >= 0, f'no ink at tip {point}'
  return int(labels[y, x])


@pytest.mark.parametrize('resolution, difficulty, count', [(32, 'hard', 24), (32, 'easy', 8),
                                                           (64, 'intermediate', 4),
                                                           (128, 'hard', 2)])
def test_labels_match_pixel_connectivity(resolution, difficulty, count):
  """Label 1 <=> the markers are joined by ink, bridging the dash gaps and nothing wider.

  Checked on the targets alone and on the whole image with its distractors: every object keeps a
  clearance wider than the dash gap, so distractors never bridge the two contours.
  """
  geom = pf.geometry(resolution)
  images, labels, debug = pf.generate(count, resolution=resolution, difficulty=difficulty, seed=5,
                                      debug=True)
  for image, targets, label, markers, tips in zip(images, debug['targets'], labels,
                                                  debug['markers'], debug['tips']):
    assert (targets <= image).all()  # the targets are part of the image
    for picture in (targets, image):
      comp = _components(picture > 0, geom.link_radius)
      origin0, origin1, end0, end1 = (_component_at(comp, t) for t in tips)
      # Each target is one chain of dashes from origin to end; the two are separate.
      assert origin0 == end0 and origin1 == end1 and origin0 != origin1
      same = _component_at(comp, markers[0]) == _component_at(comp, markers[1])
      assert same == bool(label)


def test_contours_are_dashed():
  """At half intensity and above, with 8-connectivity, a target falls apart into its paddles."""
  _, _, debug = pf.generate(2, resolution=128, difficulty='easy', seed=1, debug=True)
  for targets in debug['targets']:
    pieces = _components(targets >= 128, 1.5).max() + 1
    # Two targets of 6 paddles; a marker disk may merge with its paddle.
    assert 10 <= pieces <= 12


def test_shapes_dtypes_and_balance():
  images, labels = pf.generate(50, seed=3)
  assert images.shape == (50, 32, 32) and images.dtype == np.uint8
  assert labels.shape == (50,) and labels.dtype == np.int32
  assert labels.sum() == 25 and set(np.unique(labels)) == {0, 1}
  assert 0 < labels[:25].sum() < 25  # shuffled, not sorted
  assert images.max() == 255  # markers are fully inked
  ink = (images > 0).mean(axis=(1, 2))
  assert (ink > 0.08).all() and (ink < 0.5).all()
  images, labels = pf.generate(7, seed=3)
  assert labels.sum() == 3
  images, labels = pf.generate(0)
  assert images.shape == (0, 32, 32) and labels.shape == (0,)


def test_deterministic_per_seed_and_options():
  a, la = pf.generate(12, seed=11)
  b, lb = pf.generate(12, seed=11)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  c, _ = pf.generate(12, seed=12)
  assert (a != c).any(axis=(1, 2)).all()
  d, _ = pf.generate(12, seed=11, difficulty='easy')
  assert (a != d).any(axis=(1, 2)).all()


def test_difficulty_sets_contour_length():
  """Longer targets carry more ink: about 14/6 more for 'hard' than for 'easy'."""
  _, _, easy = pf.generate(16, resolution=64, difficulty='easy', seed=2, debug=True)
  _, _, hard = pf.generate(16, resolution=64, difficulty='hard', seed=2, debug=True)
  ratio = (hard['targets'] > 0).sum() / (easy['targets'] > 0).sum()
  assert 1.6 < ratio < 2.6


def _tv(a, b, edges):
  """Total-variation distance between the histograms of samples a and b."""
  return 0.5 * np.abs(np.histogram(a, edges)[0] / a.size - np.histogram(b, edges)[0] / b.size).sum()


def test_distance_balancer_equalises_marker_distances():
  """Synthetic pairs like Path-X's (long, fairly straight contours, origins 8 apart)."""
  rng = np.random.default_rng(0)

  def pairs(k):
    def polar(r):
      angle = rng.uniform(0, 2 * np.pi, k)
      return np.stack([r * np.sin(angle), r * np.cos(angle)], axis=-1)
    origin0 = rng.uniform(30, 98, (k, 2))
    origin1 = origin0 + polar(np.full(k, 8.0))
    ends = [o + polar(rng.uniform(80, 100, k)) for o in (origin0, origin1)]
    return np.stack([origin0, origin1, ends[0], ends[1]], axis=1).astype(np.float32)

  accept = contours.distance_balancer(pairs(4000), 128)
  tips = pairs(40000)
  offer = rng.integers(0, 2, tips.shape[0])
  s = rng.integers(0, 2, tips.shape[0])
  rows = np.arange(tips.shape[0])
  dist = np.linalg.norm(tips[rows, s] - tips[rows, 2 + np.where(offer == 1, s, 1 - s)], axis=-1)
  edges = np.linspace(0, 200, 21)
  pos, neg = dist[offer == 1], dist[offer == 0]
  assert _tv(pos, neg, edges) > 0.25  # without balancing, distance gives the label away
  kept = rng.random(dist.size) < accept(offer, dist)
  assert _tv(pos[kept[offer == 1]], neg[kept[offer == 0]], edges) < 0.05
  assert 0.4 < kept.mean() < 0.9


def test_generated_marker_distance_is_not_a_give_away():
  """A distance threshold fitted on half the images predicts the other half's labels at chance."""
  labels, debug = pf.generate(600, seed=4, debug=True)[1:]
  dist = np.linalg.norm(debug['markers'][:, 0] - debug['markers'][:, 1], axis=-1)
  fit, held = slice(0, 300), slice(300, 600)
  best = max(((np.where(sign * (dist[fit] - t) <= 0, 1, 0) == labels[fit]).mean(), t, sign)
             for t in np.unique(dist[fit]) for sign in (1, -1))
  _, t, sign = best
  assert (np.where(sign * (dist[held] - t) <= 0, 1, 0) == labels[held]).mean() < 0.6


@pytest.mark.parametrize('kwargs, match', [
    ({'resolution': 48}, 'resolution'),
    ({'difficulty': 'medium'}, 'difficulty'),
    ({'seed': -1}, 'seed'),
    ({'seed': 1.5}, 'seed'),
])
def test_generate_rejects_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pf.generate(2, **kwargs)
  with pytest.raises(ValueError, match='num_images'):
    pf.generate(-1)


def test_split_get():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
  labels = np.array([0, 1, 1, 0, 1])
  split = pf.PathfinderSplit(images, labels)
  assert split.num_examples == 5
  batch = split.get(np.array([4, 0, 4]))
  assert batch['inputs'].dtype == np.int32 and batch['inputs'].shape == (3, 16)
  np.testing.assert_array_equal(batch['inputs'][1], images[0].reshape(-1).astype(np.int32) + 1)
  assert batch['inputs'].min() >= 1 and batch['inputs'].max() <= 256
  assert batch['mask'].dtype == bool and batch['mask'].all()
  np.testing.assert_array_equal(batch['labels'], [1, 0, 1])
  assert batch['labels'].dtype == np.int32
  assert split.get(np.array([], np.int64))['inputs'].shape == (0, 16)
  for bad in (np.array([5]), np.array([-1]), np.array([[0]]), np.array([0.5])):
    with pytest.raises(ValueError, match='indices'):
      split.get(bad)
  with pytest.raises(ValueError, match='labels'):
    pf.PathfinderSplit(images, np.array([0, 1, 2, 0, 1]))
  with pytest.raises(ValueError, match='images'):
    pf.PathfinderSplit(images.astype(np.int32), labels)


def _config(tmp_path, **overrides):
  config = pf.pathfinder_data_config(quick=True)
  config.update(num_train=6, num_validation=4, num_test=4, cache_dir=str(tmp_path / 'cache'))
  config.update(overrides)
  return config


def test_loader_generates_then_loads_from_cache(tmp_path, monkeypatch):
  task = pf.load_pathfinder(_config(tmp_path))
  assert isinstance(task, TaskData)
  assert (task.kind, task.num_classes, task.vocab_size, task.max_length) == ('classify', 2, 257,
                                                                             1024)
  sizes = [s.num_examples for s in (task.train, task.validation, task.test)]
  assert sizes == [6, 4, 4]
  batch = task.train.get(np.arange(6))
  assert batch['inputs'].shape == (6, 1024) and batch['inputs'].min() >= 1
  assert batch['labels'].sum() == 3
  # Distinct seeds per split.
  first = [s.images[:4].copy() for s in (task.train, task.validation, task.test)]
  for i in range(3):
    for j in range(i):
      assert (first[i] != first[j]).any(axis=(1, 2)).all()
  assert len(os.listdir(tmp_path / 'cache' / 'pathfinder')) == 6  # images and labels per split

  def fail(*args, **kwargs):
    raise AssertionError('generated again instead of loading the cache')

  monkeypatch.setattr(pf, 'generate', fail)
  again = pf.load_pathfinder(_config(tmp_path))
  for old, new in zip((task.train, task.validation, task.test),
                      (again.train, again.validation, again.test)):
    np.testing.assert_array_equal(old.images, new.images)
    np.testing.assert_array_equal(old.labels, new.labels)
  # Any other option is another cache entry.
  with pytest.raises(AssertionError, match='generated again'):
    pf.load_pathfinder(_config(tmp_path, seed=1))
  with pytest.raises(AssertionError, match='generated again'):
    pf.load_pathfinder(_config(tmp_path, num_test=5))


def test_splits_follow_the_shared_conventions(tmp_path):
  """Generated splits are seeded by splits.split_seed, as ListOps'; pixels are Image's ids."""
  task = pf.load_pathfinder(_config(tmp_path, cache_dir='', seed=3))
  for name, split in zip(SPLITS, (task.train, task.validation, task.test)):
    images, labels = pf.generate(split.num_examples, seed=split_seed(3, name))
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)
    batch = split.get(np.arange(split.num_examples))
    np.testing.assert_array_equal(batch['inputs'],
                                  tokenizers.encode_pixels(images.reshape(len(images), -1)))
  assert task.vocab_size == tokenizers.PIXEL_VOCAB_SIZE
  # The LRA release: a seeded tenth for test, a tenth of the rest for validation, then the caps.
  parts = pf.lra_split_indices(50, (100, 100, 100), seed=0)
  assert [p.size for p in parts] == [40, 5, 5]
  assert sorted(np.concatenate(parts).tolist()) == list(range(50))
  again = pf.lra_split_indices(50, (100, 100, 100), seed=0)
  other = pf.lra_split_indices(50, (100, 100, 100), seed=1)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  assert not np.array_equal(parts[2], other[2])
  assert [p.size for p in pf.lra_split_indices(50, (7, 2, 1), seed=0)] == [7, 2, 1]
  with pytest.raises(ValueError, match='at least 3'):
    pf.lra_split_indices(2, (1, 1, 1), seed=0)


def test_loader_without_cache_and_bad_options(tmp_path):
  task = pf.load_pathfinder(_config(tmp_path, cache_dir='', num_train=2, num_validation=2,
                                    num_test=2))
  assert task.test.num_examples == 2
  assert not (tmp_path / 'cache').exists()
  for overrides, match in (({'resolution': 100}, 'resolution'), ({'difficulty': 'x'}, 'difficulty'),
                           ({'num_train': 0}, 'num_train'), ({'seed': -2}, 'seed')):
    with pytest.raises(ValueError, match=match):
      pf.load_pathfinder(_config(tmp_path, **overrides))
    # The message names the config field to set.
    with pytest.raises(ValueError, match=f'config.data.{next(iter(overrides))}'):
      pf.load_pathfinder(_config(tmp_path, **overrides))


def _write_lra(root, resolution=32, count=20):
  """A fake LRA release folder: two metadata files (text, and a saved string array)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = root / f'pathfinder{resolution}' / 'curv_contour_length_14'
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (count, resolution, resolution), dtype=np.uint8)
  labels = rng.integers(0, 2, count)
  (folder / 'metadata').mkdir(parents=True)
  rows = []
  for k in range(count):
    batch = k // 10
    (folder / 'imgs' / str(batch)).mkdir(parents=True, exist_ok=True)
    Image.fromarray(images[k]).save(folder / 'imgs' / str(batch) / f'sample_{k}.png')
    rows.append([f'imgs/{batch}', f'sample_{k}.png', str(k), str(labels[k]), '1.0', '14'])
  with open(folder / 'metadata' / '0.npy', 'w') as f:  # the release: text despite the name
    f.writelines(' '.join(row) + '\n' for row in rows[:10])
  np.save(folder / 'metadata' / '1.npy', np.array(rows[10:]))
  return folder, images, labels


def test_lra_files_are_read_split_and_cached(tmp_path, monkeypatch):
  folder, images, labels = _write_lra(tmp_path / 'lra')
  read, read_labels = pf.read_lra(str(tmp_path / 'lra'), 32, 'hard')
  np.testing.assert_array_equal(read, images)
  np.testing.assert_array_equal(read_labels, labels)
  # The difficulty folder itself works as the path too.
  np.testing.assert_array_equal(pf.read_lra(str(folder), 32, 'hard')[0], images)

  config = _config(tmp_path, path=str(tmp_path / 'lra'), num_train=100, num_validation=100,
                   num_test=1)
  task = pf.load_pathfinder(config)
  assert [s.num_examples for s in (task.train, task.validation, task.test)] == [16, 2, 1]
  seen = np.concatenate([s.images for s in (task.train, task.validation, task.test)])
  seen_labels = np.concatenate([s.labels for s in (task.train, task.validation, task.test)])
  # Every split image is one of the files, with its label, and no image is in two splits.
  index = {images[k].tobytes(): k for k in range(len(images))}
  ks = [index[img.tobytes()] for img in seen]
  assert len(set(ks)) == len(ks)
  np.testing.assert_array_equal(seen_labels, labels[ks])

  monkeypatch.setattr(pf, 'read_lra', lambda *a: (_ for _ in ()).throw(AssertionError('reread')))
  again = pf.load_pathfinder(config)
  np.testing.assert_array_equal(again.train.images, task.train.images)


def test_lra_layout_errors(tmp_path):
  with pytest.raises(ValueError, match='No LRA Pathfinder layout'):
    pf.load_pathfinder(_config(tmp_path, path=str(tmp_path / 'nowhere')))
  folder, _, _ = _write_lra(tmp_path / 'lra')
  with pytest.raises(ValueError, match='curv_baseline'):
    pf.read_lra(str(folder), 32, 'easy')  # the hard folder given for the easy split
  with pytest.raises(ValueError, match=r'\(64, 64\)'):
    pf.read_lra(str(folder), 64, 'hard')
  with open(folder / 'metadata' / '0.npy', 'w') as f:
    f.write('imgs/0 sample_0.png\n')
  with pytest.raises(ValueError, match='fields'):
    pf.read_lra(str(folder), 32, 'hard')


def test_config_and_registry():
  quick = pf.pathfinder_data_config(quick=True)
  full = pf.pathfinder_data_config()
  assert isinstance(full, ml_collections.ConfigDict)
  assert (quick.resolution, quick.difficulty) == (32, 'hard')
  assert quick.num_train + quick.num_validation + quick.num_test <= 5000
  assert (full.num_train, full.num_validation, full.num_test) == (160_000, 20_000, 20_000)
  from efficient_attn.data.registry import TASKS  # pylint: disable=g-import-not-at-top
  assert TASKS['pathfinder'] is pf.load_pathfinder


def test_grid_entry_point(tmp_path):
  path = tmp_path / 'grid.png'
  pathfinder_cli.main(['--grid', str(path), '--seed', '1'])
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_module_command_line(tmp_path):
  """`python -m efficient_attn.data.pathfinder` (as documented) runs; bad input: exit 2, one line."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS='cpu')
  run = lambda *args: subprocess.run([sys.executable, '-m', 'efficient_attn.data.pathfinder', *args],
                                     env=env, cwd=tmp_path, capture_output=True, text=True,
                                     timeout=120, check=False)
  done = run('--time', '4', '--seed', '2')
  assert done.returncode == 0, done.stderr[-2000:]
  assert '4 images of 32x32 (hard)' in done.stdout
  bad = run('--time', '4', '--resolution', '48')
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert '--resolution' in bad.stderr


def test_lra_empty_and_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
  """The release lists some 0-byte PNGs (LRA's pipeline filters them out): skipped, counted once."""
  import logging  # pylint: disable=g-import-not-at-top
  folder, images, labels = _write_lra(tmp_path / 'lra')
  (folder / 'imgs' / '0' / 'sample_3.png').write_bytes(b'')
  good = (folder / 'imgs' / '1' / 'sample_12.png').read_bytes()
  (folder / 'imgs' / '1' / 'sample_12.png').write_bytes(good[:40])  # a truncated PNG
  (folder / 'imgs' / '1' / 'sample_15.png').write_bytes(b'not a png at all')
  with caplog.at_level(logging.WARNING):
    read, read_labels = pf.read_lra(str(tmp_path / 'lra'), 32, 'hard')
  kept = [k for k in range(len(images)) if k not in (3, 12, 15)]
  np.testing.assert_array_equal(read, images[kept])
  np.testing.assert_array_equal(read_labels, labels[kept])
  lines = [r.getMessage() for r in caplog.records if 'Pathfinder: skipped' in r.getMessage()]
  assert len(lines) == 1
  assert 'skipped 3 of the 20 images' in lines[0]
  assert '1 empty (0 bytes), 2 unreadable' in lines[0] and 'sample_3.png' in lines[0]
