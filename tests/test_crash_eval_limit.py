"""Issue 14 item 7: a resumed evaluation with another `limit` extends or trims, never mixes.

`limit` is deliberately not among the settings a resume must match (`runner.output_settings`): records are
kept by doc_id, a larger limit scores only the missing examples, a smaller one reports exactly its first
`limit` examples, and the per-example file keeps everything already scored.
"""

from __future__ import annotations

from illada_lightning.evaluation import evaluate
from tests.test_eval_runner import CharTokenizer, FakeModel, PickChoice, arc_cfg, arc_file


def metrics(result):
    return {k: v for k, v in result["arc_challenge"].items() if k != "seconds"}


def test_resume_with_a_larger_then_smaller_limit(tmp_path):
    path = arc_file(tmp_path, n=10)
    out = tmp_path / "out"
    fresh = {n: metrics(evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path, limit=n), scorer=PickChoice(3)))
             for n in (2, 7)}
    evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path, limit=4), scorer=PickChoice(3), out_dir=out)

    scorer = PickChoice(3)
    extended = evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path, limit=7), scorer=scorer, out_dir=out)
    assert sum(len(c) for c in scorer.calls) == 3  # only examples 5-7 are new
    assert metrics(extended) == fresh[7] and fresh[7]["n"] == 7

    scorer = PickChoice(3)
    trimmed = evaluate(FakeModel(), CharTokenizer(), None, arc_cfg(path, limit=2), scorer=scorer, out_dir=out)
    assert scorer.calls == [] and metrics(trimmed) == fresh[2] and fresh[2]["n"] == 2
    assert len((out / "arc_challenge.examples.jsonl").read_text().splitlines()) == 7  # nothing scored is lost
