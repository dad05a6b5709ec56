"""metrics.jsonl and the loss plot."""

import json

from lorafit.train.run_log import MetricsLog, read_metrics, write_loss_plot


def test_resume_drops_the_rows_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"step": 5, "val_loss": 0.3})
    log.close()
    log = MetricsLog(tmp_path, truncate_after=3, tensorboard=False)
    log.write({"step": 4, "loss": 9.0})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("loss")) for r in rows] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 9.0)]
    assert not list(tmp_path.glob(".*"))


def test_loss_plot_is_a_png_written_atomically(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n" for r in [{"step": 1, "loss": 2.0}, {"step": 1, "val_loss": 1.5}]
        )
    )
    png = write_loss_plot(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]
    assert write_loss_plot(tmp_path / "missing.jsonl", tmp_path / "x.png") is None
