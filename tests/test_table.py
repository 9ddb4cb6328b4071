"""ComponentTable: round trip, validation errors, reference files."""

from __future__ import annotations

import numpy as np
import pytest

from selproj_plugin.table import ComponentTable, TableError
from tests.data import make_reference
from tests.helpers import SETTINGS, make_arrays, reference_path, synthetic_path


def test_round_trip_keeps_every_array(tmp_path):
    arrays = make_arrays()
    table = ComponentTable(**arrays, rp_dims=np.array([7]), rp_similarity=np.ones((1, 6, 3)), meta={"model": "tiny"})
    loaded = ComponentTable.load(table.save(tmp_path / "t.npz"))
    for key, value in arrays.items():
        np.testing.assert_array_equal(getattr(loaded, key), value)
    np.testing.assert_array_equal(loaded.rp_similarity, np.ones((1, 6, 3)))
    assert loaded.meta == {"model": "tiny"}
    assert list(loaded.kinds) == ["down"] * 4 and list(loaded.layers) == [0, 1, 2, 3]


@pytest.mark.parametrize("fixture, queries", [("paraphrased", 988), ("synthetic_paraphrased", 48)])
def test_reference_files_load_with_kinds(fixture, queries, request):
    table = request.getfixturevalue(fixture)
    assert table.cross.shape == (queries, 5, 113)
    assert table.kinds[0] == "embed" and table.layers[0] == -1
    assert table.total_params == 1_176_764_416
    assert table.labels[-1] == "L15 down"


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_committed_synthetic_tables_are_what_their_script_writes(setting):
    """tests/data/make_reference.py is the whole source of the committed tables (nothing from ../shared)."""
    made = make_reference.tables()[setting]
    with np.load(synthetic_path(setting)) as committed:
        assert sorted(committed.files) == sorted(made)
        for key, value in made.items():
            np.testing.assert_array_equal(committed[key], value, err_msg=key)


def test_the_synthetic_tables_have_the_papers_schema():
    """Same keys, dtypes and components as the paper's tables (where ../shared is present)."""
    with np.load(reference_path("paraphrased")) as paper, np.load(synthetic_path("paraphrased")) as synthetic:
        assert sorted(paper.files) == sorted(synthetic.files)
        for key in paper.files:
            assert paper[key].dtype.kind == synthetic[key].dtype.kind, key
            assert paper[key].shape[2:] == synthetic[key].shape[2:], key
        np.testing.assert_array_equal(paper["components"], synthetic["components"])
        np.testing.assert_array_equal(paper["num_params"], synthetic["num_params"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(query_self=a["query_self"][:, :2]), "shapes disagree: query_self"),
        (lambda a: a["is_original"].__setitem__((2, 1), True), "has 2 originals"),
        (lambda a: a["is_original"].__setitem__((3, 0), False), "has 0 originals"),
        (lambda a: a["cross"].__setitem__((1, 1, 1), np.nan), "cross holds NaN or inf at index (1, 1, 1)"),
        (lambda a: a["candidate_self"].__setitem__((0, 2, 3), np.inf), "candidate_self holds NaN or inf"),
        (lambda a: a["query_self"].__setitem__((4, 0), -1.0), "query_self is negative at index (4, 0)"),
    ],
)
def test_validation_errors_are_one_line(tmp_path, change, message):
    arrays = make_arrays()
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(TableError) as info:
        ComponentTable.load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(TableError, match="table file not found"):
        ComponentTable.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(TableError, match="cannot read table"):
        ComponentTable.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(TableError, match="missing arrays cross"):
        ComponentTable.load(tmp_path / "other.npz")


def test_save_is_atomic(tmp_path, monkeypatch):
    table = ComponentTable(**make_arrays())
    path = table.save(tmp_path / "t.npz")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        table.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]


def test_take_selects_rows():
    table = ComponentTable(**make_arrays())
    part = table.take(np.array([1, 4]))
    np.testing.assert_array_equal(part.cross, make_arrays()["cross"][[1, 4]])
    assert list(part.query_ids) == ["1", "4"]


def test_parts_split_the_recorded_query_groups_in_row_order(tmp_path):
    arrays = make_arrays()
    q = arrays["cross"].shape[0]
    table = ComponentTable(**arrays, meta={"query_groups": [["second", q - 2], ["first", 2]]})
    table.save(tmp_path / "t.npz")
    parts = ComponentTable.load(tmp_path / "t.npz").parts()
    assert list(parts) == ["second", "first"]  # the recorded order, not sorted
    np.testing.assert_array_equal(parts["second"].cross, arrays["cross"][: q - 2])
    np.testing.assert_array_equal(parts["first"].cross, arrays["cross"][q - 2 :])
    assert "query_groups" not in parts["first"].meta  # its rows are one group now
    assert list(ComponentTable(**make_arrays()).parts()) == [""]
    with pytest.raises(TableError, match=f"count {q + 1} queries, the table {q}"):
        ComponentTable(**make_arrays(), meta={"query_groups": [["a", q], ["b", 1]]})


def _with_projection(key: str, sims: np.ndarray) -> ComponentTable:
    return ComponentTable(**make_arrays(), rp_dims=np.array([8]), rp_similarity=sims[None], rp_keys=np.array([key]))


def test_a_seed_the_table_lacks_is_an_error_naming_the_stored_seeds_not_another_draw():
    from selproj_plugin import get_strategy
    from selproj_plugin.strategies.base import reduction

    comps = ComponentTable(**make_arrays()).component_list
    key = {s: reduction(get_strategy("random_projection", dim=8, seed=s), comps).transform.key for s in (0, 1)}
    sims = np.random.default_rng(3).uniform(-1, 1, size=(6, 3))
    table = _with_projection(key[0], sims)
    np.testing.assert_array_equal(table.projection(key[0]), sims)
    with pytest.raises(TableError) as info:
        table.projection(key[1])
    assert "seed1" in str(info.value) and "it holds seed0 at dim 8" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TableError, match="it holds seed0 at dim 8"):
        table.projection(key[0].replace("@8:", "@9:"))  # no rounding slack for a table's own draws
    assert table.projection(key[0].replace("count_sketch", "per_component")) is None  # another kind: not stored


def test_the_papers_draws_stand_in_for_the_default_seed_only():
    paper = ComponentTable(**make_arrays(), rp_dims=np.array([100]), rp_similarity=np.ones((1, 6, 3)))
    [stored] = [str(k) for k in paper.rp_keys]
    kind_and_selection = stored.rsplit("@", 1)[0], stored.split(":")[1]
    asked = f"{kind_and_selection[0]}@101:{kind_and_selection[1]}:seed0"  # a percentage rounded per component
    np.testing.assert_array_equal(paper.projection(asked), np.ones((6, 3)))
    with pytest.raises(TableError, match="it holds paper at dim 100"):
        paper.projection(asked.replace(":seed0", ":seed1"))


def test_keys_not_of_the_projection_form_are_only_matched_exactly():
    """A plugin's transform keys (``sign@N``) name no selection or seed: another of its keys is no other draw."""
    table = _with_projection("sign@8", np.ones((6, 3)))
    assert table.projection("sign@9") is None
    np.testing.assert_array_equal(table.projection("sign@8"), np.ones((6, 3)))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_get_a_plain_open_s_mode_and_reach_the_disk(tmp_path, monkeypatch, umask, mode):
    """Tables and reports are shared (the model cache on purpose): not mkstemp's private 0600; and the file's bytes
    and its rename are synced, so a crash cannot leave a renamed file without its bytes."""
    import os
    import stat

    from benchmark.report import write_json

    real = os.fsync
    synced = []

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    old = os.umask(umask)
    try:
        written = [ComponentTable(**make_arrays()).save(tmp_path / "t.npz"), write_json(tmp_path / "r.json", {"a": 1})]
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in written] == [mode, mode]
    assert synced == ["file", "dir", "file", "dir"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.npz"]
