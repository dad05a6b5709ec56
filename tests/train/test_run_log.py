"""metrics.jsonl and the loss plot."""

import json
import warnings

import pytest

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


def _torn_log(folder):
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, [3], {"step": 3, "val_loss": 1.2}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo'  # killed mid-write
    (folder / "metrics.jsonl").write_text(text)
    return folder / "metrics.jsonl"


def test_a_torn_line_is_skipped_with_one_warning(tmp_path):
    # A kill or a full disk mid-append left a torn last line: read_metrics (the loss plot, after
    # training, before summary.json) and the resume truncation raised a bare JSONDecodeError.
    path = _torn_log(tmp_path)
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped lines 3, 5: not a JSON object"):
        rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    with pytest.warns(UserWarning, match="metrics.jsonl: skipped lines 3, 5") as caught:
        assert write_loss_plot(path, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert len(caught) == 1


def test_resume_truncation_drops_a_torn_line(tmp_path):
    path = _torn_log(tmp_path)
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped lines 3, 5"):
        log = MetricsLog(tmp_path, truncate_after=2, tensorboard=False)
    log.write({"step": 3, "loss": 1.0})
    log.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is clean
        assert read_metrics(path) == [
            {"step": 1, "loss": 2.0},
            {"step": 2, "loss": 1.5},
            {"step": 3, "loss": 1.0},
        ]
