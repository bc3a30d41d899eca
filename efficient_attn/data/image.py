"""Image (LRA): CIFAR-10 as a sequence of 1024 grayscale pixels, 10 classes.

Colour images become grayscale as LRA's pipeline makes them
(`lra_benchmarks/image/input_pipeline.py` calls `tf.image.rgb_to_grayscale` on the uint8 image): in
float32, x = pixel * (1/255), then L = 0.2989 R + 0.5870 G + 0.1140 B, then uint8(L * 255.5)
truncated. PIL's `convert('L')` (rounded
integer weights 299/587/114 per mille) differs by one level on about a quarter of CIFAR's pixels.
Images are read row by row; token = intensity + 1 (LRA fed the intensity itself, so its padding mask
`inputs > 0` also hid every black pixel; here no pixel is padding). The LRA split is 45K train / 5K
validation / 10K test: validation is a seeded carve-out of the 50K train images (LRA took the last
10%).
"""
from __future__ import annotations

import ml_collections
import numpy as np
from ml_collections import config_dict

from efficient_attn.data import sources, tokenizers
from efficient_attn.data.base import TaskData
from efficient_attn.data.registry import register_task
from efficient_attn.data.splits import (TokenSplit, check_count, check_labels, check_shared_options,
                                         choose_indices)

NUM_CLASSES = 10
_DECODE_BATCH = 1_000


def image_data_config(quick: bool = False, tiny: bool = False) -> ml_collections.ConfigDict:
  """Data options of Image; defaults follow LRA (grayscale CIFAR-10, 45K / 5K / 10K).

  quick: at most 2000 images per split; tiny: 200 (validation 50), for tests and smoke runs.
  """
  c = ml_collections.ConfigDict()
  c.task = 'image'
  c.hf_name = 'cifar10'  # Hugging Face dataset with an image column ('img' or 'image') and 'label'
  # A local copy (save_to_disk folder, or train*/test* parquet files). Unset: <cache_dir>/cifar10 if
  # it exists, else the Hub.
  c.path = config_dict.placeholder(str)
  c.cache_dir = 'data_cache'
  c.num_validation = 5_000  # LRA: 45K train / 5K validation from the 50K train images
  c.seed = 0  # seeds the validation carve-out and max_examples subsets
  c.max_examples = config_dict.placeholder(int)  # cap per split (seeded random subset); unset: all
  if quick:
    c.num_validation = 500
    c.max_examples = 2_000
  if tiny:
    c.num_validation = 50
    c.max_examples = 200
  return c


# tf.image.rgb_to_grayscale's weights and its uint8 -> float32 -> uint8 conversions
# (tf.image.convert_image_dtype: multiply by 1/255; back: multiply by 255 + 0.5, then cast, which
# truncates).
_LRA_RGB_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)
_TO_FLOAT = np.float32(1 / 255)
_TO_UINT8 = np.float32(255.5)
_GRAY_MODES = ('L', 'LA', 'I', 'I;16', 'F', '1')


def rgb_to_grayscale(rgb: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] RGB to uint8 [...] grayscale, as tf.image.rgb_to_grayscale computes it.

  The weighted sum runs in float32 in channel order; TF's tensordot may fuse the multiply-adds,
  which changes the result for 31-48 of the 2^24 RGB triples by one level (float rounding at a level
  boundary).
  """
  x = np.asarray(rgb, np.uint8).astype(np.float32) * _TO_FLOAT
  w = _LRA_RGB_WEIGHTS
  gray = x[..., 0] * w[0] + x[..., 1] * w[1] + x[..., 2] * w[2]
  return (gray * _TO_UINT8).astype(np.uint8)  # in [0, 255.48): the cast truncates, never wraps


def to_grayscale(image) -> np.ndarray:
  """A PIL image (any mode) or a uint8 array [H, W(, 3|4)] as uint8 [H, W].

  Colour (RGB, RGBA without its alpha, palette, ...) as LRA's tf.image.rgb_to_grayscale
  (`rgb_to_grayscale`); grayscale images keep their values (8-bit 'L' exactly; others via PIL).
  """
  if isinstance(image, np.ndarray):
    x = np.asarray(image)
    if x.ndim == 2:
      return x.astype(np.uint8)
    if x.ndim == 3 and x.shape[-1] in (3, 4):
      return rgb_to_grayscale(x[..., :3])
    raise ValueError(f'image: an image array must be [H, W] or [H, W, 3|4], got shape {x.shape}.')
  if image.mode == 'L':
    return np.asarray(image, dtype=np.uint8)
  if image.mode in _GRAY_MODES:
    return np.asarray(image.convert('L'), dtype=np.uint8)
  return rgb_to_grayscale(np.asarray(image.convert('RGB')))


def _image_column(dataset) -> str:
  import datasets  # pylint: disable=g-import-not-at-top
  for name, feature in dataset.features.items():
    if isinstance(feature, datasets.Image):
      return name
  for name in ('img', 'image'):
    if name in dataset.column_names:
      return name
  raise ValueError(f'image: no image column (an Image feature, or one named img/image) among '
                   f'{dataset.column_names}.')


def _encode(dataset, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(grayscale pixels uint8 [n, H * W], labels uint8 [n]) of the rows at `indices`."""
  subset = dataset.select(indices)
  column = _image_column(subset)
  labels = check_labels(sources.column_values(subset, 'label', task='image'), task='image',
                        num_classes=NUM_CLASSES)
  pixels = None
  shape = None
  row = 0
  for batch in subset.select_columns([column]).iter(batch_size=_DECODE_BATCH):
    for image in batch[column]:
      gray = to_grayscale(image)
      if shape is None:
        shape = gray.shape
        pixels = np.zeros((len(subset), gray.size), np.uint8)
      elif gray.shape != shape:
        raise ValueError(f'image: images differ in size: {shape} and {gray.shape} (row {row}).')
      pixels[row] = gray.reshape(-1)
      row += 1
  if pixels is None:
    raise ValueError('image: a split has no images.')
  return pixels, labels


def check_data_config(c) -> None:
  """Raises ValueError naming the first invalid Image option (`c` holds every option); reads
  nothing."""
  check_count(c.num_validation, name='num_validation', minimum=1, task='image')
  check_shared_options(c, 'image')


@register_task('image', config=image_data_config)
def load_image(c) -> TaskData:
  """Image TaskData: inputs [N, H * W] pixel ids (1024 for CIFAR-10), 10 classes."""
  check_data_config(c)
  with sources.quiet_datasets():
    raw = sources.load_splits(task='image', hf_name=c.hf_name, path=c.path, cache_dir=c.cache_dir,
                              splits=('train', 'test'),
                              extra_hint=' with an image column and label')
    train_idx, val_idx, test_idx = choose_indices(
        len(raw['train']), len(raw['test']), num_validation=c.num_validation, seed=c.seed,
        max_examples=c.max_examples, task='image')
    built = []
    for source, idx in (('train', train_idx), ('train', val_idx), ('test', test_idx)):
      pixels, labels = _encode(raw[source], idx)
      lengths = np.full(len(labels), pixels.shape[1], np.int32)
      built.append(TokenSplit(pixels, lengths, labels, offset=tokenizers.PIXEL_OFFSET))
  lengths = {s.max_length for s in built}
  if len(lengths) != 1:
    raise ValueError(f'image: train and test images differ in size ({sorted(lengths)} pixels).')
  return TaskData(train=built[0], validation=built[1], test=built[2],
                  vocab_size=tokenizers.PIXEL_VOCAB_SIZE, num_classes=NUM_CLASSES, kind='classify',
                  max_length=lengths.pop())
