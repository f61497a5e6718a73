"""Clustering of UNKNOWN embeddings: recovery of known groups, figures, stable ids, assignment."""

from __future__ import annotations

import sys
import warnings
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from imagesieve.search._cluster import (
    Cluster,
    ClusterModel,
    ClusterParams,
    PreviousCluster,
    _neighbours,
    assign_to_clusters,
    cluster_embeddings,
)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_blobs(seed=0, sizes=(80, 70, 60, 50, 40), d=64, spread=0.2, n_junk=40):
    """Blobs on the unit sphere, their centres in one cone (like real embeddings), plus junk.

    Returns the embeddings and the true label of each row (-1 = junk, uniform on the sphere).
    """
    rng = np.random.default_rng(seed)
    common = unit(rng.normal(size=d))
    centres = unit(common + 0.8 * unit(rng.normal(size=(len(sizes), d))))
    x = [
        c + spread * rng.normal(size=(m, d)) / np.sqrt(d)
        for c, m in zip(centres, sizes, strict=True)
    ]
    x.append(rng.normal(size=(n_junk, d)))
    y = np.concatenate([np.full(m, i) for i, m in enumerate(sizes)] + [np.full(n_junk, -1)])
    return unit(np.concatenate(x)), y


def make_new_kind_and_strays(seed=0, n=30, n_strays=4, d=64):
    """One new kind (``n`` near-identical images) plus a few strays unlike it and each other.

    Like real embeddings, all in one cone. Labels: 0 the new kind, 1.. the strays.
    """
    rng = np.random.default_rng(seed)
    common = unit(rng.normal(size=d))
    kind = unit(common + 0.8 * unit(rng.normal(size=d)))
    group = kind + 0.05 * rng.normal(size=(n, d)) / np.sqrt(d)
    strays = common + 0.8 * unit(rng.normal(size=(n_strays, d)))
    return unit(np.concatenate([group, strays])), np.r_[np.zeros(n, int), 1 + np.arange(n_strays)]


def names(y: np.ndarray, prefix: str) -> list[str]:
    """Class names per row: mostly the blob's own, every 7th row another one."""
    return [f"{prefix}{(v if i % 7 else v + 1) % 3}" for i, v in enumerate(y)]


def run(ids, x, y, **kw):
    return cluster_embeddings(np.asarray(ids), x, names(y, "a"), names(y, "b"), **kw)


def id_of_blob(result, ids, y) -> dict[int, int]:
    """The cluster id holding most of each blob."""
    label = dict(zip(np.asarray(ids).tolist(), result.labels.tolist(), strict=True))
    out = {}
    for blob in np.unique(y[y >= 0]):
        got = Counter(label[i] for i in np.asarray(ids)[y == blob].tolist())
        out[int(blob)] = got.most_common(1)[0][0]
    return out


def test_cluster_embeddings__recovers_blobs_and_junk_is_noise():
    x, y = make_blobs()
    ids = np.arange(len(x)) * 3 + 100
    res = run(ids, x, y)
    blob = y >= 0
    assert len(res.clusters) == 5
    kept = blob & (res.labels >= 0)
    assert kept.sum() >= 0.9 * blob.sum()
    assert adjusted_rand_score(y[kept], res.labels[kept]) >= 0.9
    assert (res.labels[~blob] == -1).mean() >= 0.9
    assert [c.size for c in res.clusters] == sorted((c.size for c in res.clusters), reverse=True)
    assert set(res.params.__dict__) >= {"min_cluster_size", "pca_dims", "seed"}
    assert set(res.seconds) == {"pca", "umap", "hdbscan", "stats", "match"}


def test_cluster_embeddings__figures_match_numpy():
    x, y = make_blobs(seed=1)
    ids = np.arange(len(x)) * 3 + 100
    top1, top2 = names(y, "a"), names(y, "b")
    res = cluster_embeddings(ids, x, top1, top2)
    row_of = {int(i): r for r, i in enumerate(ids)}
    clustered = np.concatenate([c.member_ids for c in res.clusters] + [res.noise_ids])
    assert sorted(clustered.tolist()) == sorted(ids.tolist())  # every image exactly once
    for c in res.clusters:
        rows = np.array([row_of[int(i)] for i in c.member_ids])
        assert c.member_ids.dtype == np.int64 and np.all(np.diff(c.member_ids) > 0)
        assert np.all(res.labels[rows] == c.cluster_id)
        mean = x[rows].astype(np.float64).mean(axis=0)
        centroid = mean / np.linalg.norm(mean)
        np.testing.assert_allclose(c.centroid, centroid, atol=1e-5)
        sim = x[rows].astype(np.float64) @ centroid
        assert c.cohesion == pytest.approx(sim.mean(), abs=1e-5)
        assert c.radius == pytest.approx(
            np.quantile(1 - sim, 0.95, method="inverted_cdf"), abs=1e-5
        )
        assert (1 - sim <= c.radius + 1e-6).mean() >= 0.95
        assert c.medoid_id == ids[rows[np.argmax(sim)]]
        assert c.top1 == dict(Counter(top1[r] for r in rows).most_common())
        assert list(c.top2.values()) == sorted(c.top2.values(), reverse=True)
        assert sum(c.top2.values()) == c.size
    assert np.all(res.labels[[row_of[int(i)] for i in res.noise_ids]] == -1)


def test_cluster_embeddings__deterministic():
    x, y = make_blobs(seed=2)
    a = run(np.arange(len(x)), x, y, params=ClusterParams(seed=3))
    b = run(np.arange(len(x)), x, y, params=ClusterParams(seed=3))
    np.testing.assert_array_equal(a.labels, b.labels)
    assert [c.medoid_id for c in a.clusters] == [c.medoid_id for c in b.clusters]


def test_cluster_embeddings__keeps_ids_across_runs():
    x, y = make_blobs(seed=3, n_junk=20)
    ids = np.arange(len(x)) * 2 + 1
    first = run(ids, x, y, next_id=100)
    assert sorted(c.cluster_id for c in first.clusters) == [100, 101, 102, 103, 104]
    assert all(c.matched_from is None for c in first.clusters)
    assert first.next_id == 105
    # More images of the same blobs, some images gone (promoted), rows shuffled.
    x_more, y_more = make_blobs(seed=3, sizes=(20, 20, 20, 20, 20), n_junk=10)
    rng = np.random.default_rng(0)
    x_more = unit(x_more + 0.01 * rng.normal(size=x_more.shape))  # not copies of the first ones
    keep = rng.random(len(x)) > 0.1
    x2 = np.concatenate([x[keep], x_more])
    y2 = np.concatenate([y[keep], y_more])
    ids2 = np.concatenate([ids[keep], 10_000 + np.arange(len(x_more))])
    order = rng.permutation(len(x2))
    previous = [c.as_previous() for c in first.clusters]
    second = run(ids2[order], x2[order], y2[order], previous=previous, next_id=first.next_id)
    assert id_of_blob(second, ids2[order], y2[order]) == id_of_blob(first, ids, y)
    assert all(c.matched_from == c.cluster_id for c in second.clusters)
    assert second.next_id == 105


def test_cluster_embeddings__new_blob_gets_fresh_id_above_all_previous():
    x, y = make_blobs(seed=4, sizes=(60, 50, 40), n_junk=0)
    first = run(np.arange(len(x)), x, y, next_id=3)
    previous = [c.as_previous() for c in first.clusters]
    # A previous cluster that will not continue: its id (20) must not be given out again.
    gone = PreviousCluster(20, np.array([90_000, 90_001]), -first.clusters[0].centroid, 0.05)
    x_new, _ = make_blobs(seed=5, sizes=(30,), n_junk=0)
    x2 = np.concatenate([x, x_new])
    y2 = np.concatenate([y, np.full(30, 9)])
    ids2 = np.arange(len(x2))
    second = run(ids2, x2, y2, previous=[*previous, gone], next_id=first.next_id)
    got = id_of_blob(second, ids2, y2)
    assert {got[b] for b in (0, 1, 2)} == {c.cluster_id for c in first.clusters} == {3, 4, 5}
    assert got[9] == 21 and second.next_id == 22
    assert next(c for c in second.clusters if c.cluster_id == 21).matched_from is None


def test_cluster_embeddings__split_keeps_id_on_largest_piece():
    x, y = make_blobs(seed=6, sizes=(60, 40), n_junk=0)
    ids = np.arange(len(x))
    both = _previous(7, ids, x)  # an earlier run saw the two blobs as one cluster
    res = run(ids, x, y, previous=[both], next_id=8)
    got = id_of_blob(res, ids, y)
    assert got == {0: 7, 1: 8}


def test_cluster_embeddings__merge_keeps_id_of_largest_contributor():
    x, y = make_blobs(seed=7, sizes=(60, 40), n_junk=0)
    ids = np.arange(len(x))
    a = np.flatnonzero(y == 0)
    # An earlier run split blob 0 in two (ids 3 and 4); blob 1 was cluster 5.
    previous = [
        _previous(3, a[:25], x[a[:25]]),
        _previous(4, a[25:], x[a[25:]]),
        _previous(5, ids[y == 1], x[y == 1]),
    ]
    res = run(ids, x, y, previous=previous, next_id=6)
    assert id_of_blob(res, ids, y) == {0: 4, 1: 5}  # 35 shared members beat 25
    assert res.next_id == 6  # id 3 retires, nothing new


def test_cluster_embeddings__overlap_below_half_of_smaller_is_not_a_match():
    x, y = make_blobs(seed=8, sizes=(60, 40), n_junk=0)
    ids = np.arange(len(x))
    a, b = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    mixed = np.concatenate([a[:20], b[:30]])  # 20/50 of the smaller for blob 0, 30/40 for blob 1
    res = run(ids, x, y, previous=[_previous(2, mixed, x[mixed])], next_id=3)
    assert id_of_blob(res, ids, y) == {0: 3, 1: 2}


def test_cluster_embeddings__matches_by_position_without_shared_members():
    x, y = make_blobs(seed=9, sizes=(50, 50), n_junk=0)
    ids = np.arange(len(x))
    first = run(ids, x, y, next_id=10)
    # All of those images were promoted; new images of the same two kinds arrive.
    x_new, y_new = make_blobs(seed=9, sizes=(50, 50), n_junk=0)
    rng = np.random.default_rng(1)
    x_new = unit(x_new + 0.02 * rng.normal(size=x_new.shape) / np.sqrt(x.shape[1]))
    ids_new = 1000 + np.arange(len(x_new))
    far = PreviousCluster(3, np.array([5_000]), unit(rng.normal(size=x.shape[1])), 0.1)
    previous = [c.as_previous() for c in first.clusters] + [far]
    second = run(ids_new, x_new, y_new, previous=previous, next_id=first.next_id)
    assert id_of_blob(second, ids_new, y_new) == id_of_blob(first, ids, y)
    assert second.next_id == 12


def test_assign_to_clusters__members_in_and_far_points_out():
    x, y = make_blobs(seed=10, n_junk=0)
    res = run(np.arange(len(x)), x, y)
    blob_id = id_of_blob(res, np.arange(len(x)), y)
    x_new, y_new = make_blobs(seed=10, sizes=(30,) * 5, n_junk=50)  # same centres, new draws
    got = assign_to_clusters(x_new, res.clusters)
    assert got.dtype == np.int64 and got.shape == (len(x_new),)
    expected = np.array([blob_id[int(v)] if v >= 0 else -1 for v in y_new])
    blob = y_new >= 0
    assert (got[blob] == expected[blob]).mean() >= 0.85
    assert np.all(got[~blob] == -1)
    # Previous clusters work the same, and an empty list assigns nothing.
    previous = [c.as_previous() for c in res.clusters]
    np.testing.assert_array_equal(assign_to_clusters(x_new, previous), got)
    assert np.all(assign_to_clusters(x_new, []) == -1)
    with pytest.raises(
        ValueError,
        match=r"clusters have centroids of shape \(64,\) \(cluster \d+\) but the embeddings have 32 dimensions",
    ):
        assign_to_clusters(x_new[:, :32], res.clusters)


@pytest.mark.filterwarnings("ignore:no clusters found")
def test_cluster_embeddings__tiny_inputs():
    empty = cluster_embeddings(np.zeros(0, np.int64), np.zeros((0, 1280), np.float32), [], [])
    assert empty.clusters == [] and len(empty.noise_ids) == 0 and len(empty.labels) == 0
    assert empty.next_id == 0
    x, y = make_blobs(seed=11, sizes=(5,), n_junk=0)
    with pytest.warns(UserWarning, match="no clusters found among 5 images"):
        few = run([4, 3, 2, 1, 0], x, y, next_id=5)
    assert few.clusters == [] and few.noise_ids.tolist() == [0, 1, 2, 3, 4]
    assert few.next_id == 5
    for n in (10, 11, 12):  # just enough points for one cluster: no crash whatever comes out
        x, y = make_blobs(seed=n, sizes=(n,), n_junk=0)
        res = run(np.arange(n), x, y, params=ClusterParams(min_samples=50))
        assert len(res.labels) == n
    dup = np.repeat(make_blobs(seed=12, sizes=(2,), n_junk=0)[0], 15, axis=0)  # exact duplicates
    res = run(np.arange(30), dup, np.zeros(30, int))
    assert {int(v) for v in res.labels} <= {-1, 0, 1}
    assert all(c.radius >= 0 for c in res.clusters)


def test_cluster_embeddings__junk_projected_together_is_noise():
    # With few PCA dimensions, junk (uniform on the sphere) lands on one spot of the projection
    # and HDBSCAN alone would call it a cluster; it is far looser than the input as a whole.
    x, y = make_blobs(seed=13, sizes=(60,) * 4, d=128, spread=0.25, n_junk=40)
    res = run(np.arange(len(x)), x, y, params=ClusterParams(pca_dims=10))
    assert len(res.clusters) == 4
    assert np.all(res.labels[y == -1] == -1)
    assert min(c.cohesion for c in res.clusters) > 0.9


def test_cluster_embeddings__one_new_kind_plus_strays_is_one_cluster():
    # The most common real case: no split anywhere, so plain HDBSCAN does not find the kind
    # (nothing, or UMAP's fragments of it, depending on the numba/UMAP build).
    x, y = make_new_kind_and_strays()
    ids = np.arange(len(x)) + 7

    def kind_found(res) -> bool:
        return any((res.labels[y == 0] == c.cluster_id).mean() >= 0.9 for c in res.clusters)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no clusters found", on some builds
        plain = run(ids, x, y, params=ClusterParams(allow_single_cluster=False))
    assert not kind_found(plain)
    tightness = 0.9  # e.g. the loosest class the model was trained on
    res = run(ids, x, y, tightness=tightness)
    assert res.min_cluster_size == 5  # adapted to 34 images
    (kind,) = res.clusters
    assert kind.cohesion > tightness
    assert (res.labels[y == 0] == kind.cluster_id).mean() >= 0.9
    assert np.all(res.labels[y > 0] == -1)  # the strays stay out
    assert res.outlier[y > 0].min() > np.median(res.outlier[y == 0])  # GLOSH: strays first
    # Looser than any trained class: scattered images, not a kind; without a reference, the
    # whole input is never one cluster on its own.
    for looser in (0.999, None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            assert not kind_found(run(ids, x, y, tightness=looser))


def test_cluster_model__places_new_images_as_a_fresh_run_would():
    x, y = make_blobs(seed=21, sizes=(80, 70, 60), n_junk=20)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    first, later = order[:180], order[180:]  # later images arrive between runs
    res = run(first, x[first], y[first])
    assert res.model is not None
    placed, strength = res.model.predict(x[later])
    assert placed.dtype == np.int64 and np.all((strength >= 0) & (strength <= 1))
    assert np.all(strength[placed == -1] == 0)
    fresh = run(order, x[order], y[order], previous=[c.as_previous() for c in res.clusters])
    fresh_of = dict(zip(order.tolist(), fresh.labels.tolist(), strict=True))
    agree = np.mean([fresh_of[int(i)] == p for i, p in zip(later, placed, strict=True)])
    assert agree >= 0.9, agree
    blob_later = y[later] >= 0
    assert (placed[blob_later] >= 0).mean() >= 0.8  # most later blob images join their blob


def test_cluster_model__saved_and_loaded(tmp_path):
    x, y = make_blobs(seed=22, sizes=(60, 50), n_junk=10)
    res = run(np.arange(len(x)), x, y)
    path = tmp_path / "clusters" / "v1.pkl"
    res.model.save(path)
    again = ClusterModel.load(path)
    np.testing.assert_array_equal(again.predict(x[:40])[0], res.model.predict(x[:40])[0])
    assert ClusterModel.load(tmp_path / "none.pkl") is None
    path.write_bytes(b"not a pickle")
    assert ClusterModel.load(path) is None  # unreadable: callers place by centroids instead
    with pytest.raises(ValueError, match="made from 64-dimensional embeddings, these have 32"):
        res.model.predict(x[:3, :32])


@pytest.mark.filterwarnings("ignore:no clusters found")
def test_cluster_embeddings__scattered_images_are_all_noise():
    # Images unlike each other (uniform on the sphere of the embeddings' 1280 dimensions) never
    # split in the PCA projection: no part of them is denser than the rest, so no cluster,
    # whole or not. (UMAP makes clumps out of such noise: see the module docstring.)
    x = unit(np.random.default_rng(16).normal(size=(300, 1280)))
    y = np.zeros(300, int)
    for single in (True, False):
        params = ClusterParams(umap_dims=None, allow_single_cluster=single)
        with pytest.warns(UserWarning, match="no clusters found among 300 images"):
            res = run(np.arange(300), x, y, params=params, tightness=0.5)
        assert res.clusters == [] and np.all(res.labels == -1)


def test_cluster_embeddings__bad_input():
    x, y = make_blobs(seed=14, sizes=(20,), n_junk=0)
    with pytest.raises(ValueError, match=r"must be L2-normalised: row 3 \(id 3\) has norm 2"):
        run(np.arange(20), np.where(np.arange(20)[:, None] == 3, 2 * x, x), y)
    with pytest.raises(ValueError, match="ids must be unique"):
        run(np.zeros(20, np.int64), x, y)
    with pytest.raises(ValueError, match="ids must be 20 integers, one per embedding"):
        run(np.arange(19), x, y)
    with pytest.raises(ValueError, match="20 embeddings, 19 top1, 20 top2"):
        cluster_embeddings(np.arange(20), x, names(y, "a")[:19], names(y, "b"))
    prev = PreviousCluster(0, np.array([999]), np.ones(8, np.float32) / np.sqrt(8), 0.1)
    with pytest.raises(
        ValueError, match=r"previous clusters have centroids of shape \(8,\) \(cluster 0\)"
    ):
        run(np.arange(20), x, y, previous=[prev])


def test_cluster_params__rejects_bad_values():
    with pytest.raises(ValueError, match="min_cluster_size must be at least 2 or None"):
        ClusterParams(min_cluster_size=1)
    with pytest.raises(ValueError, match="min_samples must be at least 1 or None"):
        ClusterParams(min_samples=0)
    with pytest.raises(ValueError, match="pca_dims must be at least 1, got 0"):
        ClusterParams(pca_dims=0)
    with pytest.raises(ValueError, match="umap_dims must be at least 1 or None"):
        ClusterParams(umap_dims=0)


def test_cluster_embeddings__umap_without_umap_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # as if not installed
    x, y = make_blobs(seed=15, sizes=(20,), n_junk=0)
    with pytest.raises(ImportError, match=r"umap_dims=5 needs the umap-learn package: pip install"):
        run(np.arange(20), x, y, params=ClusterParams(umap_dims=5))


def _previous(cluster_id, member_ids, x) -> PreviousCluster:
    """What a store would remember of a cluster of these members."""
    mean = x.astype(np.float64).mean(axis=0)
    centroid = (mean / np.linalg.norm(mean)).astype(np.float32)
    radius = float(np.quantile(1 - x @ centroid, 0.95, method="inverted_cdf"))
    return PreviousCluster(cluster_id, np.asarray(member_ids, np.int64), centroid, radius)


@pytest.mark.slow
def test_cluster_embeddings__elpv_poly_cells_form_one_cluster(elpv, tmp_path):
    from imagesieve._workspace import Workspace
    from imagesieve.classifier._features import backbone_onnx, extract_features
    from imagesieve.models import get_backbone_spec

    poly = [im for im in elpv if im.cell_type == "poly"][:200]
    mono = [im for im in elpv if im.cell_type == "mono"][:60]
    onnx = backbone_onnx(Workspace(tmp_path), "efficientnet_lite0")
    arrays, errors = extract_features(
        onnx,
        get_backbone_spec("efficientnet_lite0").config,
        [im.path for im in poly + mono],
        ("embedding",),
    )
    assert not any(errors)
    x = arrays["embedding"]
    kind = np.array(["poly"] * 200 + ["mono"] * 60)
    res = cluster_embeddings(np.arange(260), x, list(kind), list(kind))
    assert res.clusters and isinstance(res.clusters[0], Cluster)
    # Measured (UMAP, then HDBSCAN): the poly cells in two clusters (113 and 76), 11 noise; the
    # mono cells one cluster of 59. UMAP keeps the two looks of poly cells apart; no cluster
    # mixes the cell types.
    poly_labels = res.labels[:200]
    assert (poly_labels == -1).mean() <= 0.1
    assert len(set(poly_labels[poly_labels >= 0].tolist())) <= 2
    assert res.clusters[0].top1 == {"poly": res.clusters[0].size} and res.clusters[0].size >= 100
    for c in res.clusters:
        assert len(c.top1) == 1  # no cluster mixes the two cell types


def test_neighbours__bit_identical_whatever_the_process_searched_before():
    # FAISS picks its exact kernel from a process-wide setting that earlier searches leave
    # behind; UMAP turns last-bit differences into another layout (the demo's first run, after
    # training, once clustered differently from the server started after it).
    import faiss

    from imagesieve._faiss import search

    x = unit(np.random.default_rng(23).normal(size=(600, 50)))
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    runs = []
    for queries in (x[:2], x):  # a small search, then a large one, before each
        search(index, queries, 3)
        runs.append(_neighbours(x[:300], 15))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert np.all(runs[0][0][:, 0] == np.arange(300))  # each row first, as UMAP expects
