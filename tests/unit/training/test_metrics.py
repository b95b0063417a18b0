import importlib.util
import json
import logging

import pytest

from sft_scale.training.metrics import MetricsWriter, plot_losses, read_metrics


def test_metrics_jsonl_tensorboard_and_plot(tmp_path):
    w = MetricsWriter(tmp_path / "metrics.jsonl", tmp_path / "tb")
    for step in range(1, 5):
        w.write({"step": step, "loss": 5.0 / step, "lr": 1e-3})
    w.write({"step": 4, "eval_loss": 1.5, "perplexity": 4.48})
    w.close()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 4] and recs[-1]["eval_loss"] == 1.5
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert ({"train/loss", "train/lr", "eval/eval_loss", "eval/perplexity"}
            <= set(acc.Tags()["scalars"]))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([5.0, 2.5, 5 / 3, 1.25])
    plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_asked_for_but_not_installed_warns_and_continues(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        w = MetricsWriter(tmp_path / "m.jsonl", None, {"model": {}})
    assert "wandb is not installed" in caplog.text
    w.write({"step": 1, "loss": 1.0})
    assert json.loads((tmp_path / "m.jsonl").read_text())["loss"] == 1.0
