"""metrics.jsonl after a kill: an unterminated last line (an append cut short) is skipped by readers and dropped by
the resumed run's truncation, which rewrites the file atomically."""

import json

from tidar_jax.training.metrics_log import MetricsLog, read_metrics


def test_a_write_cut_short_is_skipped_and_dropped_on_resume(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write(step, {"loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 4.0})[:9])  # killed mid-append: no newline, not JSON
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # used to raise JSONDecodeError
    log.truncate_after(2)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(
        json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2))
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left
    log.close()
