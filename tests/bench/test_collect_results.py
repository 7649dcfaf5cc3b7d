"""bench/collect_results.py regenerates docs/results.md from the per-data-set runs but keeps the hand-written
sections after its marker (bf16 overlap, latent geometry, cold start)."""

from __future__ import annotations

from pathlib import Path

from bench.collect_results import KEEP_MARKER, main


def test_regeneration_keeps_the_hand_written_tail(tmp_path: Path) -> None:
    run = tmp_path / "out" / "new-set"
    run.mkdir(parents=True)
    (run / "results.md").write_text("### new-set\n| model | ndcg |\n| a | 0.1 |\n")
    doc = tmp_path / "results.md"
    doc.write_text(f"# old generated part\n### stale-set\n\n{KEEP_MARKER}\n\n## Cold start\nhand-written\n")
    main(tmp_path / "out", doc)
    text = doc.read_text()
    assert "stale-set" not in text and "| a | 0.1 |" in text  # the generated part is replaced
    assert text.index("| a | 0.1 |") < text.index(KEEP_MARKER) < text.index("## Cold start\nhand-written")


def test_a_doc_without_the_marker_is_regenerated_whole(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    doc = tmp_path / "results.md"
    doc.write_text("# anything\n")
    main(tmp_path / "out", doc)
    assert "# anything" not in doc.read_text() and KEEP_MARKER not in doc.read_text()
