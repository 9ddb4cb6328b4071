"""The embedded dataset's checks, and loaders that give the same records for every format."""

from __future__ import annotations

import csv
import itertools
import json
import re

import pytest

from benchmark.data import DatasetError, Record, embedded_path, load_dataset, load_records

FIELDS = ("id", "prompt", "response", "paraphrased_prompt", "paraphrased_response")


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def jaccard(a: str, b: str) -> float:
    x, y = words(a), words(b)
    return len(x & y) / len(x | y)


@pytest.fixture(scope="module")
def embedded() -> list[Record]:
    return load_records()


def test_embedded_has_at_least_240_valid_samples(embedded):
    assert len(embedded) >= 240
    raw = [json.loads(line) for line in embedded_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    assert all(set(r) == set(FIELDS) for r in raw)
    assert len({r.id for r in embedded}) == len(embedded)


def test_responses_are_40_to_120_words(embedded):
    for r in embedded:
        assert 40 <= len(r.response.split()) <= 120, r.id
        assert 40 <= len(r.paraphrased_response.split()) <= 120, r.id


def test_paraphrases_differ_from_their_sources(embedded):
    for r in embedded:
        assert jaccard(r.prompt, r.paraphrased_prompt) <= 0.6, r.id
        assert jaccard(r.response, r.paraphrased_response) <= 0.6, r.id
    # and they are paraphrases, not unrelated text: each is closer to its own source than to others
    hits = sum(max(embedded, key=lambda o: jaccard(o.response, r.paraphrased_response)).id == r.id for r in embedded)
    assert hits / len(embedded) > 0.9


def test_no_near_duplicates(embedded):
    texts = [(r.id, r.prompt + " " + r.response) for r in embedded]
    for (a, x), (b, y) in itertools.combinations(texts, 2):
        assert jaccard(x, y) <= 0.5, (a, b)


def test_translation_and_rewrite_share_is_about_ten_percent(embedded):
    pattern = re.compile(r"\b(translat|rewrite|rephrase|summari[sz]e|fix the grammar|proofread)", re.I)
    share = sum(bool(pattern.search(r.prompt)) for r in embedded) / len(embedded)
    assert 0.07 <= share <= 0.2


# ---- formats -------------------------------------------------------------------------
ROWS = [
    {"id": "a", "prompt": "P1", "response": "R1", "paraphrased_prompt": "PP1", "paraphrased_response": "PR1"},
    {"id": "b", "prompt": "P2", "response": "R2, with a comma", "paraphrased_prompt": "PP2", "paraphrased_response": "PR2"},
]


def chat(row):
    return {
        "id": row["id"],
        "messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}],
        "paraphrased_messages": [
            {"role": "user", "content": row["paraphrased_prompt"]},
            {"role": "assistant", "content": row["paraphrased_response"]},
        ],
    }


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


EXPECTED = [Record("a", "P1", "R1", "PP1", "PR1"), Record("b", "P2", "R2, with a comma", "PP2", "PR2")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("schema", ["flat", "chat"])
def test_every_format_and_schema_gives_the_same_records(tmp_path, suffix, schema):
    rows = ROWS if schema == "flat" else [chat(r) for r in ROWS]
    assert load_records(str(write(tmp_path / f"d{suffix}", rows))) == EXPECTED


def test_multiturn_chats_are_skipped_and_counted(tmp_path):
    rows = [chat(r) for r in ROWS]
    rows[1]["messages"] = rows[1]["messages"] * 2
    data = load_dataset(str(write(tmp_path / "d.jsonl", rows)))
    assert [r.id for r in data.records] == ["a"] and data.skipped_multiturn == 1


def test_model_generated_messages_are_kept(tmp_path):
    row = chat(ROWS[0])
    row["model_generated_messages"] = [{"role": "user", "content": "PP1"}, {"role": "assistant", "content": "G1"}]
    assert load_records(str(write(tmp_path / "d.jsonl", [row])))[0].model_generated_response == "G1"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda rows: rows[1].pop("paraphrased_prompt"), "d.jsonl:2: missing field 'paraphrased_prompt'"),
        (lambda rows: rows[0].update(response="  "), "d.jsonl:1 (id 'a'): field 'response' is empty"),
        (lambda rows: rows[1].update(id="a"), "d.jsonl:2: duplicate id 'a' (first at"),
    ],
)
def test_validation_errors_name_file_line_and_id(tmp_path, mutate, message):
    rows = [dict(r) for r in ROWS]
    mutate(rows)
    with pytest.raises(DatasetError) as info:
        load_records(str(write(tmp_path / "d.jsonl", rows)))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unreadable_and_empty_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match="bad.jsonl:1: invalid JSON"):
        load_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="has no usable samples"):
        load_records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DatasetError, match="dataset file not found"):
        load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DatasetError, match="unsupported dataset file type"):
        load_records(str(tmp_path / "d.txt"))


def test_an_unreachable_hub_dataset_is_one_line_without_the_hubs_retry_lines(monkeypatch, caplog):
    """Offline, huggingface_hub logged a line per retry (12 of them) before the one-line error."""
    import logging

    import datasets

    def offline(name, split):
        for n in range(1, 6):
            logging.getLogger("huggingface_hub.utils._http").warning(f"Retrying in 1s [Retry {n}/5].")
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    before = logging.getLogger("huggingface_hub").level
    with caplog.at_level(logging.WARNING), pytest.raises(DatasetError) as info:
        load_records("no-such-user/no-such-dataset")
    assert "no-such-user/no-such-dataset" in str(info.value) and "\n" not in str(info.value)
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert logging.getLogger("huggingface_hub").level == before  # given back as it was
