"""Issue 9.3 and 9.4: strategies are plug-ins (a toy strategy registered here builds through the
CLI with no change elsewhere), and corpus-wide thresholds equal numpy.quantile over every
supervised token of the corpus however it is partitioned."""

from __future__ import annotations

import json
import sys

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftgo.core.shards import group_column, importance_column, list_column
from sftgo.grouping import registry
from sftgo.grouping.assign import assign_by_thresholds
from sftgo.pipeline.cli import main

# Dask ships the strategy object to its worker processes: by value, since they cannot import this
# test module by name (pytest puts several test folders, each with a conftest.py, on sys.path).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class TokenLength:
    """Toy strategy: a token's importance is the length of its text (characters)."""

    name = "toklen"

    def params(self, cfg) -> dict:
        return {"unit": "characters"}

    def stage(self, cols: dict, cfg, tokenizer: str) -> dict:
        scores = [
            np.where(m == 1, off[:, 1] - off[:, 0], 0).astype(np.float32)
            for m, off in zip(cols["loss_mask"], cols["offsets"])
        ]
        return {importance_column(self.name): list_column(scores, pa.float32())}

    def importance(self, staged, artifacts: dict, folder: str):
        return staged[importance_column(self.name)].combine_chunks()


@pytest.fixture
def toy_strategy():
    registry.register(TokenLength())
    yield
    registry.unregister("toklen")


def _build(args: list[str]) -> None:
    try:
        main(["build", *args], standalone_mode=False)
    except SystemExit as exc:  # the CLI's one-sentence errors exit 1
        assert exc.code in (0, None), exc.code


def _rows(out) -> pa.Table:
    manifest = json.loads((out / "manifest.json").read_text())
    return pa.concat_tables([pq.read_table(out / s["path"]) for s in manifest["shards"]])


def test_registered_toy_strategy_builds_through_the_cli(toy_strategy, tmp_path):
    out = tmp_path / "shards"
    _build(
        [
            "data/alpaca.jsonl",
            "--out",
            str(out),
            "--strategy",
            "tfidf,toklen",
            "--quiet",
            "--workers",
            "1",
            "--rows-per-shard",
            "100",
        ]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["strategies"]) == ["tfidf", "toklen"]
    assert manifest["strategies"]["toklen"]["unit"] == "characters"
    table = _rows(out)
    from transformers import AutoTokenizer  # noqa: F401  (the embedded tokenizer decodes the pieces)

    from sftgo.core import models

    tok = models.load_tokenizer(None)
    row = table.slice(0, 1).to_pylist()[0]
    pieces = [tok.decode([i]) for i in row["input_ids"]]
    for piece, mask, score, group in zip(
        pieces, row["loss_mask"], row[importance_column("toklen")], row[group_column("toklen")]
    ):
        assert (group >= 0) == (mask == 1)
        if mask and piece not in tok.all_special_tokens:
            assert score == len(piece)


def test_unknown_strategy_is_one_sentence(tmp_path, cli):
    proc = cli("sftgo-prep", "build", "data/alpaca.jsonl", "--out", tmp_path / "x", "--strategy", "toklen", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "Error: Unknown strategy toklen; choose from tfidf, reference, semantic."


def test_register_refuses_builtin_names_and_non_strategies():
    with pytest.raises(ValueError):
        registry.register(type("T", (TokenLength,), {"name": "tfidf"})())
    with pytest.raises(TypeError):
        registry.register(object())


@pytest.mark.parametrize("partitions", [1, 3, 7])
def test_corpus_thresholds_equal_numpy_quantile(tmp_path, partitions, dask_scheduler):
    records = [json.loads(line) for line in open("data/alpaca.jsonl", encoding="utf-8")][:70]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "shards"
    rows = -(-len(records) // partitions)
    _build(
        [
            str(src),
            "--out",
            str(out),
            "--threshold",
            "corpus",
            "--quiet",
            "--scheduler",
            dask_scheduler,
            "--rows-per-shard",
            str(rows),
            "--num-groups",
            "3",
        ]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == partitions
    table = _rows(out)
    mask = table["loss_mask"].combine_chunks().flatten().to_numpy() == 1
    scores = table[importance_column("tfidf")].combine_chunks().flatten().to_numpy()
    expected = np.quantile(scores[mask].astype(np.float64), [1 / 3, 2 / 3])
    entry = manifest["strategies"]["tfidf"]
    assert entry["threshold"] == "corpus"
    np.testing.assert_array_equal(entry["thresholds"], expected)
    groups = table[group_column("tfidf")].combine_chunks().flatten().to_numpy()
    np.testing.assert_array_equal(groups, assign_by_thresholds(scores, mask, list(expected)))
    # a loop-written oracle of the rule: group = number of cut-offs reached
    for s, m, g in list(zip(scores, mask, groups))[:500]:
        assert g == (sum(s >= t for t in expected) if m else -1)


def test_corpus_threshold_two_groups_is_the_top_eta_quantile(tmp_path, dask_scheduler):
    out = tmp_path / "shards"
    _build(
        [
            "data/alpaca.jsonl",
            "--out",
            str(out),
            "--threshold",
            "corpus",
            "--eta",
            "0.25",
            "--quiet",
            "--scheduler",
            dask_scheduler,
            "--rows-per-shard",
            "150",
        ]
    )
    table = _rows(out)
    mask = table["loss_mask"].combine_chunks().flatten().to_numpy() == 1
    scores = table[importance_column("tfidf")].combine_chunks().flatten().to_numpy()[mask]
    cut = json.loads((out / "manifest.json").read_text())["strategies"]["tfidf"]["thresholds"]
    assert cut == [float(np.quantile(scores.astype(np.float64), 0.75))]
    important = table[group_column("tfidf")].combine_chunks().flatten().to_numpy()[mask] == 1
    assert abs(important.mean() - 0.25) < 0.1  # ties at the cut-off may add a little
