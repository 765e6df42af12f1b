"""diffjax.data: the embedded digits split, padded evaluation batches, tfds loaders on mock data."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffjax import data


def test_digits_split_is_fixed_disjoint_and_stratified():
    tr = data.load_arrays("digits", "train")
    te = data.load_arrays("digits", "test")
    assert tr.images.shape == (1500, 8, 8, 1) and te.images.shape == (297, 8, 8, 1)
    for b in (tr, te):
        assert b.images.dtype == np.float32 and b.labels.dtype == np.int32
        assert b.images.min() == 0.0 and b.images.max() == 1.0
        np.testing.assert_array_equal(b.ids, np.arange(len(b.ids)))
        assert b.mask.all()
    # Together the splits are exactly sklearn's 1,797 images (as a multiset of rows).
    from sklearn.datasets import load_digits

    d = load_digits()
    ref = sorted(map(tuple, d.images.reshape(1797, -1).astype(int).tolist()))
    ours = (np.concatenate([tr.images, te.images]).reshape(1797, -1) * 16).round().astype(int)
    assert sorted(map(tuple, ours.tolist())) == ref
    counts = np.bincount(te.labels, minlength=10)
    assert counts.min() >= 29 and counts.max() <= 30  # stratified: 297 / 10 per class
    # The same call gives the same split (no hidden randomness).
    np.testing.assert_array_equal(data.load_arrays("digits", "test").labels, te.labels)


def test_info():
    assert data.info("digits") == data.DatasetInfo(
        "digits", (8, 8, 1), 10, {"train": 1500, "test": 297})
    assert data.info("cifar10").image_shape == (32, 32, 3)
    assert data.info("imagenet2012").image_shape == (224, 224, 3)
    assert data.info("imagenet2012", preprocess="purifier").image_shape == (256, 256, 3)
    with pytest.raises(ValueError, match="name"):
        data.info("mnist")


@pytest.mark.parametrize("batch_size", [64, 100, 297, 400])
def test_eval_batches_cover_every_example_once(batch_size):
    bs = list(data.batches("digits", "test", batch_size))
    assert len(bs) == data.num_batches(297, batch_size)
    assert all(b.images.shape == (batch_size, 8, 8, 1) for b in bs)  # fixed shape: one compile
    ids = np.concatenate([b.ids[b.mask] for b in bs])
    np.testing.assert_array_equal(ids, np.arange(297))
    last = bs[-1]
    pad = len(bs) * batch_size - 297
    assert (~last.mask).sum() == pad
    assert (last.ids[~last.mask] == -1).all() and (last.images[~last.mask] == 0).all()
    te = data.load_arrays("digits", "test")
    imgs = np.concatenate([b.images[b.mask] for b in bs])
    np.testing.assert_array_equal(imgs, te.images)


def test_shuffled_and_sharded_batches():
    key = jax.random.key(0)
    full = list(data.batches("digits", "test", 64, shuffle_key=key))
    ids = np.concatenate([b.ids[b.mask] for b in full])
    assert sorted(ids.tolist()) == list(range(297)) and not (ids == np.arange(297)).all()
    # Two processes: each gets consecutive halves of every global batch.
    parts = [list(data.batches("digits", "test", 64, shuffle_key=key, process_index=i,
                               process_count=2)) for i in range(2)]
    for g, a, b in zip(full, *parts, strict=True):
        np.testing.assert_array_equal(np.concatenate([a.ids, b.ids]), g.ids)
        np.testing.assert_array_equal(np.concatenate([a.mask, b.mask]), g.mask)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches("digits", "test", 63, process_count=2))
    with pytest.raises(ValueError, match="process_index"):
        next(data.batches("digits", "test", 64, process_index=2, process_count=2))


def test_train_stream_is_a_function_of_the_step():
    key = jax.random.key(3)
    it = data.train_batches("digits", "train", 128, key=key)
    first = [next(it) for _ in range(25)]  # crosses two epoch boundaries (11 steps each)
    resumed = data.train_batches("digits", "train", 128, key=key, start_step=17)
    for s in range(17, 25):
        b = next(resumed)
        np.testing.assert_array_equal(b.ids, first[s].ids)
        np.testing.assert_array_equal(b.images, first[s].images)
        np.testing.assert_array_equal(b.ids, data.train_indices(key, s, 128, 1500))
    epoch0 = np.concatenate([b.ids for b in first[:11]])
    assert len(set(epoch0.tolist())) == len(epoch0)  # no repeats within an epoch
    assert not np.array_equal(first[0].ids, first[11].ids)  # a new order each epoch
    tr = data.load_arrays("digits", "train")
    np.testing.assert_array_equal(first[5].labels, tr.labels[first[5].ids])


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.load_arrays("digits", "validation")
    with pytest.raises(ValueError, match="num_examples"):
        data.load_arrays("digits", "test", num_examples=0)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.train_batches("digits", "train", 64, key=jax.random.key(0), num_examples=32))


def test_cifar10_on_mock_data():
    with tfds.testing.mock_data(num_examples=21):
        te = data.load_arrays("cifar10", "test")
        assert te.images.shape == (21, 32, 32, 3) and te.images.dtype == np.float32
        assert 0.0 <= te.images.min() and te.images.max() <= 1.0 and te.images.max() > 0.5
        assert te.labels.dtype == np.int32 and ((te.labels >= 0) & (te.labels < 10)).all()
        bs = list(data.batches("cifar10", "test", 8))
        assert [b.mask.sum() for b in bs] == [8, 8, 5]
        assert (bs[-1].ids == [16, 17, 18, 19, 20, -1, -1, -1]).all()
        np.testing.assert_array_equal(bs[1].images, te.images[8:16])
        tb = next(data.train_batches("cifar10", "train", 8, key=jax.random.key(0)))
        assert tb.images.shape == (8, 32, 32, 3) and tb.mask.all()


@pytest.mark.parametrize("preprocess,size", [("classifier", 224), ("purifier", 256)])
def test_imagenet_on_mock_data(preprocess, size):
    with tfds.testing.mock_data(num_examples=3):
        b = next(data.batches("imagenet2012", "validation", 4, preprocess=preprocess))
    assert b.images.shape == (4, size, size, 3) and b.images.dtype == np.float32
    assert list(b.mask) == [True, True, True, False] and list(b.ids) == [0, 1, 2, -1]
    assert 0.0 <= b.images.min() and b.images.max() <= 1.0
    assert ((b.labels >= 0) & (b.labels < 1000)).all()


def test_resize_center_crop_keeps_the_centre():
    img = np.zeros((300, 600, 3), np.uint8)
    img[100:200, 250:350] = 255  # a centred square
    out = data.resize_center_crop(img, 256, 224)
    assert out.shape == (224, 224, 3)
    # Scale 256/300: the square becomes ~85 px wide, centred in the crop.
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert abs(ys.mean() - 111.5) < 2 and abs(xs.mean() - 111.5) < 2
    assert 80 <= ys.max() - ys.min() + 1 <= 90


@pytest.mark.parametrize("name,split,hint", [
    ("cifar10", "test", "tfds build cifar10"),
    ("imagenet2012", "validation", "ILSVRC2012_img_val.tar"),
])
def test_missing_data_error_says_how_to_get_it(tmp_path, name, split, hint):
    with pytest.raises(FileNotFoundError) as e:
        data.load_arrays(name, split, data_dir=str(tmp_path))
    msg = str(e.value)
    assert hint in msg and "--data_dir" in msg and str(tmp_path) in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name,split", [("cifar10", "test"), ("imagenet2012", "validation"),
                                        ("digits", "train")])
def test_synthetic_data_has_the_datasets_shape_and_is_a_function_of_the_id(name, split):
    meta = data.info(name)
    a = data.load_arrays(name, split, num_examples=4, synthetic=True)
    assert a.images.shape == (4, *meta.image_shape) and a.images.dtype == np.float32
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0
    assert a.labels.min() >= 0 and a.labels.max() < meta.num_classes
    b = data.load_arrays(name, split, ids=[3, 1], synthetic=True)  # any subset, any order
    np.testing.assert_array_equal(b.images, a.images[[3, 1]])
    np.testing.assert_array_equal(b.ids, [3, 1])
    other = data.load_arrays(name, split, num_examples=4, synthetic=True, seed=1)
    assert not np.array_equal(other.images, a.images)


def test_load_arrays_by_ids_and_bad_ids():
    full = data.load_arrays("digits", "test")
    part = data.load_arrays("digits", "test", ids=np.array([296, 0, 5]))
    np.testing.assert_array_equal(part.images, full.images[[296, 0, 5]])
    np.testing.assert_array_equal(part.labels, full.labels[[296, 0, 5]])
    with pytest.raises(ValueError, match="ids: expected example indices in \\[0, 296\\]"):
        data.load_arrays("digits", "test", ids=[297])
