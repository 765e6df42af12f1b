"""Datasets as NHWC float32 [0, 1] batches with labels, stable example ids and a mask.

One entry point, `batches(name, split, batch_size, ...)`, serves evaluation (every example
exactly once, the last batch padded and masked, never dropped) and `train_batches(...)`
serves training (an endless stream whose batch at step `s` is a pure function of
`(key, s)`, so a resumed run sees exactly the batches it would have seen). Small sets can
be held in memory whole with `load_arrays`. `info(name)` gives the image shape, the number
of classes and the split sizes without reading any data.

Datasets:

- ``"digits"``: the embedded default. scikit-learn's handwritten digits (1,797 real 8x8
  grey images of 0-9, shipped inside scikit-learn: no download). Pixel values 0..16 are
  divided by 16 to land in [0, 1]. The images stay at their native 8x8x1: the whole study
  (training excluded) must run in 10 minutes on a 2-core CPU, and every attack step
  backpropagates through the purifier's U-Net calls, whose cost grows with the pixel count;
  16x16 would cost about 4x per U-Net call for no gain in the information the images hold.
  Split (fixed, computed once with numpy from `DIGITS_SPLIT_SEED`): a stratified random
  permutation; for each class its examples are shuffled and its share of the 297 test
  examples (largest-remainder rounding of 297 * class fraction) is taken first; the test
  split then lists the 297 chosen examples in one seeded random order and the train split
  the other 1,500 likewise. Example ids are the index within the split (test ids
  0..296), so the first `n` test examples are a random, roughly class-balanced subset.
- ``"cifar10"``: 32x32x3, 50,000 train / 10,000 test, pixel values / 255.
- ``"imagenet2012"``: train / validation, with the paper's preprocessing: resize the shorter
  side to 256 (bilinear, antialiased), then centre-crop 224 for the classifier
  (``preprocess="classifier"``) or 256 for the purifier (``preprocess="purifier"``; the
  guided-diffusion model works at 256x256).

CIFAR-10 and ImageNet are read with `tfds.data_source` (array_record random access), not
`tfds.load`: `tfds.load` builds a `tf.data` pipeline and needs TensorFlow, which diffjax does
not depend on; random access also makes the step -> batch mapping of `train_batches` and
the per-process sharding trivial, and it works under `tfds.testing.mock_data`. The data must
have been prepared in the array_record format (``tfds build ... --file_format=array_record``);
when it is missing, a `FileNotFoundError` says how to get it instead of a tfds stack trace.

Multi-host: every iterator takes `process_index` / `process_count` and yields this
process's rows of each global batch (`batch_size // process_count` of them, consecutive),
ready for `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from diffjax import _checks

__all__ = [
    "Batch",
    "DatasetInfo",
    "NAMES",
    "DIGITS_SPLIT_SEED",
    "info",
    "load_arrays",
    "batches",
    "train_batches",
    "train_indices",
    "num_batches",
    "resize_center_crop",
]

DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_SIZE = 297


class Batch(NamedTuple):
    """A batch (a pytree: it passes through `jit` and `jax.device_put` as is).

    Attributes:
      images: float32 `[B, H, W, C]` in [0, 1] (zeros on padding rows).
      labels: int32 `[B]` class indices (0 on padding rows).
      ids: int32 `[B]` example ids, the index within the split; -1 on padding rows.
      mask: bool `[B]`, False on padding rows: weight every per-example metric with it.
    """

    images: Any
    labels: Any
    ids: Any
    mask: Any


class DatasetInfo(NamedTuple):
    """What a dataset looks like after preprocessing.

    Attributes:
      name: the dataset name.
      image_shape: `(H, W, C)` of the preprocessed images.
      num_classes: the number of classes.
      split_sizes: split name -> number of examples.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    split_sizes: dict[str, int]


_INFO = {
    "digits": DatasetInfo("digits", (8, 8, 1), 10, {"train": 1500, "test": 297}),
    "cifar10": DatasetInfo("cifar10", (32, 32, 3), 10, {"train": 50_000, "test": 10_000}),
    "imagenet2012": DatasetInfo(
        "imagenet2012", (224, 224, 3), 1000, {"train": 1_281_167, "validation": 50_000}),
}
NAMES = tuple(_INFO)
_PREPROCESS = ("classifier", "purifier")
_IMAGENET_CROP = {"classifier": 224, "purifier": 256}
_IMAGENET_RESIZE = 256


def info(name: str, *, preprocess: str = "classifier") -> DatasetInfo:
    """Image shape, number of classes and split sizes of a dataset (reads no data).

    Args:
      name: one of `NAMES`.
      preprocess: ``"classifier"`` or ``"purifier"``; only changes ImageNet's crop size
        (224 or 256).

    Returns:
      A `DatasetInfo`.
    """
    _checks.check_choice(name, "name", NAMES)
    _checks.check_choice(preprocess, "preprocess", _PREPROCESS)
    out = _INFO[name]
    if name == "imagenet2012":
        size = _IMAGENET_CROP[preprocess]
        out = out._replace(image_shape=(size, size, 3))
    return out


# --------------------------------------------------------------------------- sources


@functools.cache
def _digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed digits split: split -> (images float32 [n, 8, 8, 1], labels int32 [n])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[..., None]
    labels = d.target.astype(np.int32)
    # numpy at data-prep time only: a fixed, documented split, not a training-time draw.
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    classes, counts = np.unique(labels, return_counts=True)
    quota = _DIGITS_TEST_SIZE * counts / counts.sum()
    take = np.floor(quota).astype(int)
    short = _DIGITS_TEST_SIZE - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    test_idx = []
    for c, k in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == c)
        test_idx.append(rng.permutation(members)[:k])
    test_idx = np.concatenate(test_idx)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    test_idx = rng.permutation(test_idx)
    train_idx = rng.permutation(train_idx)
    for a in (images, labels):
        a.setflags(write=False)
    return {
        "train": (images[train_idx], labels[train_idx]),
        "test": (images[test_idx], labels[test_idx]),
    }


def _missing_data_error(name: str, split: str, data_dir, err: Exception) -> FileNotFoundError:
    where = data_dir or "the default tfds data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    if name == "imagenet2012":
        how = (
            "ImageNet needs a manual download: put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar in MANUAL_DIR, then run `tfds build imagenet2012 "
            "--file_format=array_record --data_dir=DIR --manual_dir=MANUAL_DIR` and pass "
            "--data_dir=DIR (data_dir=DIR)")
    else:
        how = (
            f"prepare it once on a machine with network access with `tfds build {name} "
            "--file_format=array_record --data_dir=DIR` and pass --data_dir=DIR "
            "(data_dir=DIR); or use the embedded default, name='digits', which needs no "
            "download")
    return FileNotFoundError(
        f"dataset {name!r} split {split!r} not found in {where} in the array_record format "
        f"({type(err).__name__}: {str(err).splitlines()[0][:160]}). To get it: {how}.")


class _TfdsSource:
    """Random access to a tfds split through `tfds.data_source` (no TensorFlow)."""

    def __init__(self, name: str, split: str, data_dir, preprocess: str):
        import tensorflow_datasets as tfds

        self.name = name
        self.preprocess = preprocess
        try:
            self.ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            n = len(self.ds)
        except Exception as e:  # tfds raises many kinds; say what to do instead.
            raise _missing_data_error(name, split, data_dir, e) from e
        if n == 0:
            raise _missing_data_error(name, split, data_dir, ValueError("the split is empty"))
        self.size = n

    def __len__(self) -> int:
        return self.size

    def _image(self, img: np.ndarray) -> np.ndarray:
        img = np.asarray(img)
        if img.ndim == 2:
            img = img[..., None]
        if img.shape[-1] == 1 and self.name == "imagenet2012":
            img = np.repeat(img, 3, axis=-1)
        if self.name == "imagenet2012":
            img = resize_center_crop(img, _IMAGENET_RESIZE, _IMAGENET_CROP[self.preprocess])
        return img.astype(np.float32) / 255.0

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images float32 [n, H, W, C] in [0, 1] and labels int32 [n] of `indices`."""
        # data_source.__getitems__ fails under mock_data in tfds 4.9.x: read one by one.
        exs = [self.ds[int(i)] for i in indices]
        images = np.stack([self._image(ex["image"]) for ex in exs])
        labels = np.asarray([ex["label"] for ex in exs], np.int32)
        return images, labels


class _SyntheticSource:
    """Random images and labels with a dataset's shape, class count and split size.

    Example `i` of split `s` is a pure function of (seed, s, i) (NumPy's PCG64 seeded with
    them): any subset reads the same values, whatever the batch or the process. Smooth
    random images (a low-resolution uniform field upsampled bilinearly, plus a little
    pixel noise) rather than white noise, so that the models see image-like inputs.
    """

    def __init__(self, name: str, split: str, preprocess: str, seed: int):
        meta = info(name, preprocess=preprocess)
        self.shape, self.num_classes = meta.image_shape, meta.num_classes
        self.size = meta.split_sizes[split]
        self.key = (int(seed), sorted(meta.split_sizes).index(split))

    def __len__(self) -> int:
        return self.size

    def _one(self, i: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([*self.key, int(i)])
        h, w, c = self.shape
        lo = rng.uniform(0.0, 1.0, size=(max(h // 4, 2), max(w // 4, 2), c))
        rows = np.linspace(0, lo.shape[0] - 1, h)
        cols = np.linspace(0, lo.shape[1] - 1, w)
        r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
        r1, c1 = np.minimum(r0 + 1, lo.shape[0] - 1), np.minimum(c0 + 1, lo.shape[1] - 1)
        fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
        img = ((1 - fr) * (1 - fc) * lo[r0][:, c0] + (1 - fr) * fc * lo[r0][:, c1]
               + fr * (1 - fc) * lo[r1][:, c0] + fr * fc * lo[r1][:, c1])
        img = np.clip(img + rng.normal(0.0, 0.03, size=img.shape), 0.0, 1.0)
        return img.astype(np.float32), int(rng.integers(self.num_classes))

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._one(i) for i in indices]
        images = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, *self.shape),
                                                                         np.float32)
        return images, np.asarray([p[1] for p in pairs], np.int32)


class _ArraySource:
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


def resize_center_crop(img: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Resizes the shorter side of one uint8 `[H, W, C]` image to `resize`, centre-crops `crop`.

    The ImageNet evaluation preprocessing (bilinear, antialiased, as torchvision's
    `Resize(256)` + `CenterCrop(224)`). Returns uint8 `[crop, crop, C]`.
    """
    from PIL import Image

    h, w = img.shape[:2]
    scale = resize / min(h, w)
    nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
    squeeze = img.shape[-1] == 1
    pil = Image.fromarray(img[..., 0] if squeeze else img)
    out = np.asarray(pil.resize((nw, nh), Image.BILINEAR))
    if squeeze:
        out = out[..., None]
    top, left = (nh - crop) // 2, (nw - crop) // 2
    return out[top:top + crop, left:left + crop]


def _source(name: str, split: str, data_dir, preprocess: str, synthetic: bool = False,
            seed: int = 0):
    _checks.check_choice(name, "name", NAMES)
    _checks.check_choice(split, "split", tuple(_INFO[name].split_sizes))
    _checks.check_choice(preprocess, "preprocess", _PREPROCESS)
    if synthetic:
        return _SyntheticSource(name, split, preprocess, seed)
    if name == "digits":
        return _ArraySource(*_digits_split()[split])
    return _TfdsSource(name, split, data_dir, preprocess)


def _num_examples(source, num_examples) -> int:
    if num_examples is None:
        return len(source)
    return min(_checks.check_int(num_examples, "num_examples", lo=1), len(source))


# --------------------------------------------------------------------------- public


def load_arrays(
    name: str,
    split: str,
    *,
    data_dir=None,
    num_examples: int | None = None,
    preprocess: str = "classifier",
    ids=None,
    synthetic: bool = False,
    seed: int = 0,
) -> Batch:
    """Loads examples of a split into memory as one `Batch` (numpy arrays).

    Meant for small sets (digits, a few hundred CIFAR-10 test images), or one process's
    share of a larger one (`ids`).

    Args:
      name: one of `NAMES`.
      split: ``"train"``, ``"test"`` (``"validation"`` for imagenet2012).
      data_dir: the tfds data directory (CIFAR-10/ImageNet); None for tfds' default.
      num_examples: keep the first n examples of the split (None: all).
      preprocess: ``"classifier"`` or ``"purifier"`` (ImageNet crop 224 or 256).
      ids: read exactly these example indices instead of the first `num_examples` (e.g. a
        process's share, `diffjax.parallel.share`); each must be < the split's size.
      synthetic: random images and labels with the dataset's shape, class count and split
        size (`_SyntheticSource`): no download, for checking and timing a configuration on
        any machine. `seed` picks them.
      seed: the synthetic data's seed.

    Returns:
      `Batch(images [N, H, W, C] float32 in [0, 1], labels int32 [N], ids int32 [N] (the
      example indices: 0..N-1, or `ids`), mask all True)`.
    """
    source = _source(name, split, data_dir, preprocess, synthetic, seed)
    if ids is None:
        idx = np.arange(_num_examples(source, num_examples))
    else:
        idx = np.asarray(ids, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(source)):
            _checks.fail("ids", f"example indices in [0, {len(source) - 1}] of "
                         f"{name}/{split}", f"min {idx.min()}, max {idx.max()}")
    images, labels = source.read(idx)
    n = len(idx)
    return Batch(images, labels, idx.astype(np.int32), np.ones(n, bool))


def _check_sharding(batch_size, process_index, process_count) -> int:
    batch_size = _checks.check_int(batch_size, "batch_size", lo=1)
    process_count = _checks.check_int(process_count, "process_count", lo=1)
    _checks.check_int(process_index, "process_index", lo=0, hi=process_count - 1)
    if batch_size % process_count:
        _checks.fail("batch_size", f"a multiple of process_count={process_count} (the global "
                     "batch is split evenly across processes)", batch_size)
    return batch_size // process_count


def num_batches(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches `batches` yields for `num_examples` examples."""
    if drop_last:
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def batches(
    name: str,
    split: str,
    batch_size: int,
    *,
    data_dir=None,
    shuffle_key=None,
    num_examples: int | None = None,
    drop_last: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    preprocess: str = "classifier",
) -> Iterator[Batch]:
    """One pass over a split in batches of a fixed size; the last batch padded and masked.

    Every batch has exactly `batch_size // process_count` rows, so a jitted consumer
    compiles once. The last global batch is padded with rows whose `mask` is False and
    `ids` -1 (images and labels 0): evaluation never drops an example. `drop_last=True`
    drops the incomplete last batch instead (for training only).

    Args:
      name: one of `NAMES`.
      split: the split name (see `info(name).split_sizes`).
      batch_size: the global batch size (over all processes).
      data_dir: the tfds data directory (CIFAR-10/ImageNet); None for tfds' default.
      shuffle_key: a `jax.random.key` to visit the examples in a random order; None keeps
        the split's order. Ids stay the index within the split either way.
      num_examples: use only the first n examples of the split (None: all).
      drop_last: drop the incomplete last batch instead of padding it.
      process_index: this process's index (`jax.process_index()`).
      process_count: the number of processes (`jax.process_count()`); this process gets
        rows `[process_index * b, (process_index + 1) * b)` of every global batch,
        `b = batch_size // process_count`.
      preprocess: ``"classifier"`` or ``"purifier"`` (ImageNet crop 224 or 256).

    Yields:
      `Batch` of numpy arrays: images float32 `[b, H, W, C]` in [0, 1], labels int32 `[b]`,
      ids int32 `[b]`, mask bool `[b]`.
    """
    local = _check_sharding(batch_size, process_index, process_count)
    source = _source(name, split, data_dir, preprocess)
    n = _num_examples(source, num_examples)
    if shuffle_key is None:
        order = np.arange(n)
    else:
        order = np.asarray(jax.random.permutation(shuffle_key, n))
    for b in range(num_batches(n, batch_size, drop_last)):
        rows = order[b * batch_size:(b + 1) * batch_size]
        rows = rows[process_index * local:(process_index + 1) * local]
        yield _padded(source, rows, local)


def _padded(source, rows: np.ndarray, size: int) -> Batch:
    images, labels = source.read(rows)
    pad = size - len(rows)
    ids = rows.astype(np.int32)
    mask = np.ones(len(rows), bool)
    if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, np.int32)])
        ids = np.concatenate([ids, np.full(pad, -1, np.int32)])
        mask = np.concatenate([mask, np.zeros(pad, bool)])
    return Batch(images, labels, ids, mask)


def train_indices(key, step, batch_size: int, num_examples: int):
    """Example indices of the training batch at `step`: a pure function of `(key, step)`.

    Epoch `e = step // steps_per_epoch` (`steps_per_epoch = num_examples // batch_size`,
    the incomplete tail of each epoch is skipped) visits the examples in the order
    `jax.random.permutation(fold_in(key, e), num_examples)`. A run resumed at any step
    therefore sees the same batches as an uninterrupted one. Jit-able (`step` may be traced).

    Args:
      key: the data-order key.
      step: the training step (int or int32 scalar).
      batch_size: the global batch size, `<= num_examples`.
      num_examples: the size of the training set.

    Returns:
      int32 `[batch_size]` indices into the split.
    """
    batch_size = _checks.check_int(batch_size, "batch_size", lo=1)
    num_examples = _checks.check_int(num_examples, "num_examples", lo=batch_size)
    per_epoch = num_examples // batch_size
    epoch, pos = step // per_epoch, step % per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return jax.lax.dynamic_slice_in_dim(perm, pos * batch_size, batch_size).astype(np.int32)


@functools.partial(jax.jit, static_argnums=2)
def _epoch_perm(key, epoch, num_examples):
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def train_batches(
    name: str,
    split: str,
    batch_size: int,
    *,
    key,
    start_step: int = 0,
    data_dir=None,
    num_examples: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    preprocess: str = "classifier",
) -> Iterator[Batch]:
    """The endless training stream: the batch at step `s` is `train_indices(key, s, ...)`.

    Start at `start_step` when resuming: the stream then continues exactly where an
    uninterrupted run would be. Arguments as in `batches`; `key` is the data-order key.

    Yields:
      `Batch` of numpy arrays, `batch_size // process_count` rows (all real: mask True).
    """
    local = _check_sharding(batch_size, process_index, process_count)
    _checks.check_int(start_step, "start_step", lo=0)
    source = _source(name, split, data_dir, preprocess)
    n = _num_examples(source, num_examples)
    if n < batch_size:
        _checks.fail("batch_size", f"at most the number of training examples ({n})", batch_size)
    per_epoch = n // batch_size
    step, epoch, perm = start_step, None, None
    while True:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            perm = np.asarray(_epoch_perm(key, epoch, n))
        pos = step % per_epoch
        rows = perm[pos * batch_size:(pos + 1) * batch_size]
        rows = rows[process_index * local:(process_index + 1) * local]
        images, labels = source.read(rows)
        yield Batch(images, labels, rows.astype(np.int32), np.ones(local, bool))
        step += 1
