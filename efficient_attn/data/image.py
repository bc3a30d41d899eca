"""Image (LRA): CIFAR-10 as a sequence of 1024 grayscale pixels, 10 classes.

Colour images become grayscale with the ITU-R 601-2 luma transform, L = R 299/1000 + G 587/1000 +
B 114/1000 (what PIL's `convert('L')` computes), and are read row by row; token = intensity + 1. The
LRA split is 45K train / 5K validation / 10K test: validation is a seeded carve-out of the 50K train
images.
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


def to_grayscale(image) -> np.ndarray:
  """A PIL image (any mode) or an array [H, W(, 3|4)] as uint8 [H, W] (ITU-R 601-2 luma)."""
  if isinstance(image, np.ndarray):
    # Route arrays through PIL too, so both inputs get PIL's exact integer rounding.
    from PIL import Image  # pylint: disable=g-import-not-at-top
    image = Image.fromarray(np.asarray(image, np.uint8))
  return np.asarray(image.convert('L'), dtype=np.uint8)


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
