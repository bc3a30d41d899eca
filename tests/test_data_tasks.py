"""Text, Retrieval, Image and LM loaders on tiny fixtures written here; missing data; configs."""
from __future__ import annotations

import csv
import math
import os

import datasets
import numpy as np
import pytest
from PIL import Image

import efficient_attn.data as data
from efficient_attn.data import lm, tokenizers

REVIEWS_TRAIN = [
    ('A fine film, with "quotes", commas\nand a newline.', 1), ('Dull.', 0),
    ('Très bien — non-ASCII bytes survive.', 1), ('Terrible acting, terrible plot. ' * 5, 0),
    ('Loved it', 1), ('Hated it', 0), ('Meh, it was ok', 1), ('Would not watch again', 0),
]
REVIEWS_TEST = [('Test review one', 1), ('Test review two', 0), ('A third test review', 1)]


def _rows_to_dict(rows):
  return {'text': [t for t, _ in rows], 'label': [l for _, l in rows]}


@pytest.fixture
def imdb_saved(tmp_path):
  path = tmp_path / 'imdb_saved'
  datasets.DatasetDict({
      'train': datasets.Dataset.from_dict(_rows_to_dict(REVIEWS_TRAIN)),
      'test': datasets.Dataset.from_dict(_rows_to_dict(REVIEWS_TEST)),
  }).save_to_disk(str(path))
  return str(path)


@pytest.fixture
def imdb_csv(tmp_path):
  path = tmp_path / 'imdb_csv'
  path.mkdir()
  for name, rows in (('train.csv', REVIEWS_TRAIN), ('test.csv', REVIEWS_TEST)):
    with open(path / name, 'w', newline='', encoding='utf-8') as f:
      writer = csv.writer(f)
      writer.writerow(['text', 'label'])
      writer.writerows(rows)
  return str(path)


def _text_config(tmp_path, path, **overrides):
  c = data.default_data_config('text')
  c.cache_dir = str(tmp_path / 'cache')
  c.path = path
  c.max_length = 40
  c.num_validation = 3
  c.update(overrides)
  return c


def _decode_rows(batch) -> list[bytes]:
  return [tokenizers.decode_bytes(row[m]) for row, m in zip(batch['inputs'], batch['mask'])]


@pytest.mark.parametrize('source', ['imdb_saved', 'imdb_csv'])
def test_text_shapes_bytes_and_validation_carved_from_train(tmp_path, source, request):
  task = data.load_task(_text_config(tmp_path, request.getfixturevalue(source)))
  assert (task.kind, task.vocab_size, task.num_classes, task.max_length) == ('classify', 257, 2, 40)
  assert (task.train.num_examples, task.validation.num_examples, task.test.num_examples) == (5, 3, 3)
  full_train = {t.encode()[:40]: l for t, l in REVIEWS_TRAIN}
  full_test = {t.encode()[:40]: l for t, l in REVIEWS_TEST}
  seen = []
  for split, expected in ((task.train, full_train), (task.validation, full_train),
                          (task.test, full_test)):
    batch = split.get(np.arange(split.num_examples))
    assert batch['inputs'].shape == batch['mask'].shape == (split.num_examples, 40)
    assert batch['inputs'].dtype == np.int32 and batch['mask'].dtype == bool
    np.testing.assert_array_equal(batch['mask'], batch['inputs'] != 0)
    texts = _decode_rows(batch)
    assert all(expected[t] == l for t, l in zip(texts, batch['labels']))
    seen.append(texts)
  # Train and validation partition the source's train split; test stays test.
  assert sorted(seen[0] + seen[1]) == sorted(full_train)
  assert not set(seen[1]) & set(full_test)
  # Truncation keeps the start; non-ASCII text is UTF-8 bytes.
  assert ('Terrible acting, terrible plot. ' * 5).encode()[:40] in seen[0] + seen[1]
  assert 'Très bien — non-ASCII bytes survive.'.encode() in seen[0] + seen[1]


def test_text_cls_seeded_carve_out_and_max_examples(tmp_path, imdb_saved):
  a = data.load_task(_text_config(tmp_path, imdb_saved, add_cls=True))
  batch = a.train.get(np.arange(a.train.num_examples))
  assert a.vocab_size == 258 and batch['inputs'].shape[1] == 40
  assert np.all(batch['inputs'][:, 0] == tokenizers.BYTE_CLS_ID) and np.all(batch['mask'][:, 0])
  val = lambda t: sorted(_decode_rows(t.validation.get(np.arange(t.validation.num_examples))))
  b = data.load_task(_text_config(tmp_path, imdb_saved, add_cls=True))
  c = data.load_task(_text_config(tmp_path, imdb_saved, add_cls=True, seed=7))
  assert val(a) == val(b) and val(a) != val(c)
  small = data.load_task(_text_config(tmp_path, imdb_saved, max_examples=2))
  assert (small.train.num_examples, small.validation.num_examples, small.test.num_examples) == (2, 2, 2)


def test_text_default_local_folder_is_picked_up(tmp_path, imdb_saved):
  cache = tmp_path / 'cache'
  cache.mkdir()
  os.rename(imdb_saved, cache / 'imdb')
  task = data.load_task(_text_config(tmp_path, None))
  assert task.test.num_examples == 3


def test_text_missing_data_gives_one_clear_error(tmp_path, monkeypatch):
  with pytest.raises(data.DataUnavailableError, match='save_to_disk'):
    data.load_task(_text_config(tmp_path, str(tmp_path / 'nowhere')))

  def offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'imdb' on the Hub (OfflineModeIsEnabled)")

  monkeypatch.setattr(datasets, 'load_dataset', offline)
  with pytest.raises(data.DataUnavailableError) as info:
    data.load_task(_text_config(tmp_path, None))
  message = str(info.value)
  assert "datasets.load_dataset('imdb').save_to_disk(" in message
  assert os.path.abspath(tmp_path / 'cache' / 'imdb') in message
  assert isinstance(info.value.__cause__, ConnectionError)


def test_unreachable_hub_fails_at_once_with_one_line(tmp_path, monkeypatch):
  """Without a reachable Hub, `datasets` is not even asked; the error is one line, the fix first."""
  from efficient_attn.data import sources  # pylint: disable=g-import-not-at-top

  def asked(*args, **kwargs):
    raise AssertionError('asked the Hub although it is unreachable')

  monkeypatch.setattr(datasets, 'load_dataset', asked)
  monkeypatch.setattr(sources, 'hub_unreachable', lambda: 'cannot connect (test)')
  with pytest.raises(data.DataUnavailableError) as info:
    data.load_task(_text_config(tmp_path, None))
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith("text: 'imdb' is not on this machine. To provide it, run `python -c")
  assert message.index('save_to_disk(') < message.index('cannot connect (test)')
  assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
  assert isinstance(info.value.__cause__, ConnectionError)


def test_hub_probe(monkeypatch):
  from efficient_attn.data import sources  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  for name in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE') + sources._PROXY_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  sources.hub_unreachable.cache_clear()
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  assert 'HF_HUB_OFFLINE' in sources.hub_unreachable()
  monkeypatch.delenv('HF_HUB_OFFLINE')
  # A local port nobody listens on: refused at once.
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  monkeypatch.setattr(sources, '_hub_host', lambda: ('127.0.0.1', port))
  sources.hub_unreachable.cache_clear()
  assert f'127.0.0.1:{port}' in sources.hub_unreachable()
  # A listening one: reachable.
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    monkeypatch.setattr(sources, '_hub_host', lambda: server.getsockname())
    sources.hub_unreachable.cache_clear()
    assert sources.hub_unreachable() is None
  # Behind a proxy a direct connection proves nothing: let `datasets` decide.
  monkeypatch.setenv('HTTPS_PROXY', 'http://proxy.invalid:3128')
  sources.hub_unreachable.cache_clear()
  assert sources.hub_unreachable() is None
  sources.hub_unreachable.cache_clear()


def test_validation_larger_than_a_small_copy_says_what_to_set(tmp_path, imdb_saved):
  with pytest.raises(ValueError, match=r'text: config.data.num_validation must be in \(0, 8\).*'
                                       r'set config.data.num_validation to at most 7'):
    data.load_task(_text_config(tmp_path, imdb_saved, num_validation=500))


def _write_tsv(path, rows, header=False):
  with open(path, 'w', encoding='utf-8') as f:
    if header:
      f.write('label\tid1\tid2\ttext1\ttext2\n')
    for label, t1, t2 in rows:
      f.write(f'{label}\tP{len(t1)}\tQ{len(t2)}\t{t1}\t{t2}\n')


@pytest.fixture
def aan_dir(tmp_path):
  folder = tmp_path / 'aan'
  folder.mkdir()
  _write_tsv(folder / 'new_aan_pairs.train.tsv',
             [('1.0', 'paper one abstract ' * 3, 'paper two'), ('0.0', 'x', 'y' * 100),
              ('1', 'short', 'ünïcode')], header=True)
  _write_tsv(folder / 'new_aan_pairs.eval.tsv', [('0', 'eval a', 'eval b')])
  _write_tsv(folder / 'new_aan_pairs.test.tsv', [('1.0', 'test a', 'test b'), ('0.0', 'c', 'd')])
  return str(folder)


def test_retrieval_pairs_shapes_and_contents(tmp_path, aan_dir):
  c = data.default_data_config('retrieval')
  c.path, c.max_length = aan_dir, 32
  task = data.load_task(c)
  assert (task.kind, task.vocab_size, task.num_classes, task.max_length) == ('pair', 257, 2, 32)
  assert (task.train.num_examples, task.validation.num_examples, task.test.num_examples) == (3, 1, 2)
  batch = task.train.get(np.arange(3))
  assert batch['inputs'].shape == batch['mask'].shape == (3, 2, 32)
  assert batch['inputs'].dtype == np.int32 and batch['labels'].dtype == np.int32
  np.testing.assert_array_equal(batch['labels'], [1, 0, 1])
  assert tokenizers.decode_bytes(batch['inputs'][0, 0]) == ('paper one abstract ' * 3).encode()[:32]
  assert tokenizers.decode_bytes(batch['inputs'][1, 1]) == b'y' * 32
  assert tokenizers.decode_bytes(batch['inputs'][2, 1]) == 'ünïcode'.encode()
  np.testing.assert_array_equal(batch['mask'], batch['inputs'] != 0)
  c.add_cls = True
  cls = data.load_task(c).test.get(np.arange(2))
  assert cls['inputs'].shape == (2, 2, 32) and np.all(cls['inputs'][:, :, 0] == 257)


def test_retrieval_missing_and_malformed_files(tmp_path, aan_dir):
  c = data.default_data_config('retrieval')
  c.cache_dir = str(tmp_path / 'cache')
  with pytest.raises(data.DataUnavailableError, match='lra_release.gz'):
    data.load_task(c)  # nothing at <cache_dir>/aan
  with open(os.path.join(aan_dir, 'new_aan_pairs.eval.tsv'), 'a', encoding='utf-8') as f:
    f.write('1\tonly\tfour\tfields\n')
  c.path = aan_dir
  with pytest.raises(ValueError, match='5 tab-separated fields'):
    data.load_task(c)


@pytest.fixture
def cifar_saved(tmp_path):
  rng = np.random.default_rng(0)

  def images(n):
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 'RGB')
            for _ in range(n)]

  features = datasets.Features({'image': datasets.Image(), 'label': datasets.Value('int64')})
  path = tmp_path / 'cifar'
  datasets.DatasetDict({
      'train': datasets.Dataset.from_dict({'image': images(10), 'label': list(range(10))},
                                          features=features),
      'test': datasets.Dataset.from_dict({'image': images(4), 'label': [3, 1, 4, 1]},
                                         features=features),
  }).save_to_disk(str(path))
  return str(path)


def test_image_grayscale_pixels_and_splits(tmp_path, cifar_saved):
  c = data.default_data_config('image')
  c.path, c.num_validation = cifar_saved, 3
  task = data.load_task(c)
  assert (task.kind, task.vocab_size, task.num_classes, task.max_length) == ('classify', 257, 10, 1024)
  assert (task.train.num_examples, task.validation.num_examples, task.test.num_examples) == (7, 3, 4)
  source = datasets.load_from_disk(cifar_saved)
  train_labels = np.concatenate([task.train.get(np.arange(7))['labels'],
                                 task.validation.get(np.arange(3))['labels']])
  assert sorted(train_labels) == list(range(10))  # labels are distinct: validation came from train
  test = task.test.get(np.arange(4))
  assert test['inputs'].shape == (4, 1024) and test['inputs'].dtype == np.int32
  assert test['mask'].all() and test['inputs'].min() >= 1
  np.testing.assert_array_equal(test['labels'], [3, 1, 4, 1])
  rgb = np.asarray(source['test'][0]['image'], np.float64)
  luma = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
  assert np.abs(test['inputs'][0] - 1 - luma.reshape(-1)).max() <= 1
  # LRA's grayscale (tf.image.rgb_to_grayscale), not PIL's convert('L').
  np.testing.assert_array_equal(test['inputs'][0] - 1,
                                _lra_gray(np.asarray(source['test'][0]['image'])).reshape(-1))


def _lra_gray(rgb: np.ndarray) -> np.ndarray:
  """tf.image.rgb_to_grayscale of uint8 images, written out: convert_image_dtype to float32
  (x / 255), a float32 weighted sum with (0.2989, 0.5870, 0.1140), convert_image_dtype back
  (x * 255.5, then a cast, which truncates)."""
  x = rgb.astype(np.float32) * np.float32(1 / 255)
  weights = np.array([0.2989, 0.5870, 0.1140], np.float32)
  gray = x[..., 0] * weights[0] + x[..., 1] * weights[1] + x[..., 2] * weights[2]
  return np.trunc(gray * np.float32(255.5)).astype(np.uint8)


def test_grayscale_is_lra_not_pil():
  from efficient_attn.data import image  # pylint: disable=g-import-not-at-top
  rgb = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  rgb[0, :4] = [[0, 255, 0], [255, 255, 255], [0, 0, 0], [255, 0, 0]]
  picture = Image.fromarray(rgb, 'RGB')
  pil = np.asarray(picture.convert('L'))
  ours = image.to_grayscale(picture)
  np.testing.assert_array_equal(ours, _lra_gray(rgb))
  np.testing.assert_array_equal(image.to_grayscale(rgb), ours)  # arrays as PIL images
  assert ours[0, :4].tolist() == [149, 255, 0, 76] and pil[0, 0] == 150  # pure green: 149 vs 150
  # Far from float rounding at a level boundary, the exact value floored (not rounded) is LRA's.
  exact = rgb.astype(np.float64) / 255 @ np.array([0.2989, 0.5870, 0.1140]) * 255.5
  clear = np.abs(exact - np.round(exact)) > 1e-3
  np.testing.assert_array_equal(ours[clear], np.floor(exact[clear]))
  assert (ours != pil).mean() > 0.1  # about a quarter of the pixels differ from PIL's
  gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
  np.testing.assert_array_equal(image.to_grayscale(Image.fromarray(gray, 'L')), gray)
  np.testing.assert_array_equal(_lra_gray(np.stack([gray] * 3, -1)), gray)  # gray stays gray


def test_image_missing_data_gives_one_clear_error(tmp_path):
  c = data.default_data_config('image')
  c.path = str(tmp_path / 'absent')
  with pytest.raises(data.DataUnavailableError, match="load_dataset\\('cifar10'\\)"):
    data.load_task(c)


@pytest.fixture
def corpus_dir(tmp_path):
  folder = tmp_path / 'corpus'
  (folder / 'sub').mkdir(parents=True)
  rng = np.random.default_rng(1)
  for name in ('b.txt', 'a.txt', 'sub/c.txt', 'skip.bin'):
    (folder / name).write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
  return str(folder)


def _lm_config(path, **overrides):
  c = data.default_data_config('lm')
  c.corpus, c.path, c.max_length, c.file_suffixes = 'files', path, 64, ('.txt',)
  c.update(overrides)
  return c


def test_lm_windows_labels_and_split_coverage(corpus_dir):
  task = data.load_task(_lm_config(corpus_dir))
  assert (task.kind, task.vocab_size, task.num_classes, task.max_length) == ('lm', 257, 257, 64)
  names = ('a.txt', 'b.txt', 'sub/c.txt')  # sorted by relative path; skip.bin filtered out
  corpus = b''.join(open(os.path.join(corpus_dir, n), 'rb').read() for n in names)
  a, b = len(corpus) * 90 // 100, len(corpus) * 95 // 100
  parts = {'train': corpus[:a], 'validation': corpus[a:b], 'test': corpus[b:]}
  train = task.train.get(np.arange(task.train.num_examples))
  assert train['inputs'].shape == train['labels'].shape == (task.train.num_examples, 64)
  assert train['mask'].all() and train['inputs'].dtype == np.int32
  np.testing.assert_array_equal(train['inputs'][:, 1:], train['labels'][:, :-1])
  for row, start in zip(train['inputs'], task.train.starts):
    assert tokenizers.decode_bytes(row) == parts['train'][start:start + 64]
  for name in ('validation', 'test'):
    split = getattr(task, name)
    batches = list(data.eval_batches(split, 4))
    inputs = np.concatenate([x['inputs'][x['weights'] > 0] for x in batches])
    labels = np.concatenate([x['labels'][x['weights'] > 0] for x in batches])
    mask = np.concatenate([x['mask'][x['weights'] > 0] for x in batches])
    # Every byte after the first is predicted exactly once, in order.
    assert tokenizers.decode_bytes(inputs[mask]) == parts[name][:-1]
    assert tokenizers.decode_bytes(labels[mask]) == parts[name][1:]
    assert mask.sum() == split.num_predicted_bytes == len(parts[name]) - 1


def test_lm_train_offsets_are_seeded():
  a, b = lm.train_starts(10_000, 64, 0), lm.train_starts(10_000, 64, 1)
  np.testing.assert_array_equal(a, lm.train_starts(10_000, 64, 0))
  assert not np.array_equal(a, b)
  assert np.all(np.diff(a // 64) == 1) and a.max() + 65 <= 10_000


def test_lm_python_stdlib_corpus():
  # A plain dict with only some options: the rest take their defaults.
  task = data.load_task({'task': 'lm', 'max_bytes': 60_000, 'max_length': 256})
  total = task.train.data.size + task.validation.data.size + task.test.data.size
  assert total == 60_000
  files = lm.stdlib_files()
  assert files and all(f.endswith('.py') and 'site-packages' not in f for f in files)
  assert bytes(task.train.data[:200]) == open(files[0], 'rb').read()[:200]


def test_bits_per_byte_of_a_uniform_model_is_8(corpus_dir):
  assert lm.bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
  task = data.load_task(_lm_config(corpus_dir))
  nll, count = 0.0, 0
  for batch in data.eval_batches(task.test, 3):
    real = batch['mask'] & (batch['weights'][:, None] > 0)
    # Uniform over the 256 byte ids: log-prob -log 256 for every real target.
    log_probs = np.full(batch['labels'].shape + (task.vocab_size,), -math.log(256))
    log_probs[..., 0] = -np.inf
    picked = np.take_along_axis(log_probs, batch['labels'][..., None], -1)[..., 0]
    nll -= picked[real].sum()
    count += int(real.sum())
  assert data.bits_per_byte(nll, count) == pytest.approx(8.0)
  with pytest.raises(ValueError):
    data.bits_per_byte(1.0, 0)


def test_lm_missing_data_and_bad_options(tmp_path, monkeypatch):
  c = data.default_data_config('lm')
  c.corpus, c.cache_dir = 'enwik8', str(tmp_path)
  monkeypatch.setattr(datasets, 'load_dataset',
                      lambda *a, **k: (_ for _ in ()).throw(ConnectionError('offline')))
  with pytest.raises(data.DataUnavailableError, match='mattmahoney.net/dc/enwik8.zip'):
    data.load_task(c)
  c.path = str(tmp_path / 'enwik8')
  (tmp_path / 'enwik8').write_bytes(b'too short')
  with pytest.raises(ValueError, match='100000000 bytes'):
    data.load_task(c)
  with pytest.raises(ValueError, match='valid corpora'):
    data.load_task(_lm_config(str(tmp_path), corpus='wiki'))
  with pytest.raises(ValueError, match='2 \\* max_length'):
    data.load_task(_lm_config(str(tmp_path / 'enwik8'), max_length=4096, file_suffixes=()))
  with pytest.raises(data.DataUnavailableError):
    data.load_task(_lm_config(str(tmp_path / 'absent')))


def test_registry_configs_and_unknown_task():
  assert set(data.task_names()) >= {'listops', 'text', 'retrieval', 'image', 'pathfinder', 'lm'}
  assert set(data.DATA_CONFIGS) == set(data.TASKS)  # every task registered its config
  for task in data.task_names():
    for quick in (False, True):
      c = data.default_data_config(task, quick)
      assert c.task == task and 'cache_dir' in c
      # tiny has the same options, no larger sizes
      tiny = data.default_data_config(task, quick, tiny=True)
      assert set(tiny.keys()) == set(c.keys())
      for key in tiny.keys():
        if key.startswith(('num_', 'max_')) and isinstance(c[key], int):
          assert tiny[key] <= c[key], (task, key)
  assert data.default_data_config('listops').num_train == 96_000
  assert data.default_data_config('image').num_validation == 5_000
  with pytest.raises(ValueError, match='valid tasks:.*listops'):
    data.default_data_config('mnist')
  with pytest.raises(ValueError, match='valid tasks:.*retrieval'):
    bad = data.default_data_config('lm')
    bad.task = 'mnist'
    data.load_task(bad)
  with pytest.raises(ValueError, match='Unknown data option.*max_lenght'):
    data.load_task({'task': 'text', 'max_lenght': 10})
  with pytest.raises(ValueError, match='already registered'):
    data.register_task('text')(lambda c: None)


def test_byte_and_pixel_tokenizers():
  ids = tokenizers.encode_bytes('hé', add_cls=True)
  np.testing.assert_array_equal(ids, [257, ord('h') + 1, 0xC3 + 1, 0xA9 + 1])
  assert tokenizers.decode_bytes(ids) == 'hé'.encode()
  assert tokenizers.encode_bytes(b'\x00\xff').tolist() == [1, 256]
  assert tokenizers.encode_bytes('abcdef', max_length=3).tolist() == [98, 99, 100]
  np.testing.assert_array_equal(tokenizers.encode_pixels(np.array([[0, 255]], np.uint8)), [[1, 256]])
  with pytest.raises(ValueError):
    tokenizers.encode_pixels(np.array([256]))
