import io
import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from linnaeus_jax import metric_writers


def _events(path):
  """Parses a TFRecord event file: (u64 length, u32 crc, payload, u32 crc) records."""
  data = open(path, "rb").read()
  pos = 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4


def test_jsonl_and_tensorboard_hold_the_same_values(tmp_path):
  w = metric_writers.MetricWriter(str(tmp_path))
  w.write(10, "train", {"loss": 1.5, "acc1/taxa_L10": 50.0, "num_examples": 3})
  w.write(20, "val", {"loss": 0.5})
  w.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines == [{"step": 10, "phase": "train", "loss": 1.5, "acc1/taxa_L10": 50.0,
                    "num_examples": 3}, {"step": 20, "phase": "val", "loss": 0.5}]
  tb_dir = tmp_path / "tensorboard"
  events = [e for f in os.listdir(tb_dir)
            for e in _events(tb_dir / f) if e.summary.value]
  got = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value}
  assert got[(10, "train/acc1/taxa_L10")] == 50.0 and got[(20, "val/loss")] == 0.5


def test_progress_lines():
  out = io.StringIO()
  p = metric_writers.Progress(total=100, start=0, batch_size=8, stream=out)
  p.update(10, 2.0)
  p.update(20, 1.0)
  first, second = out.getvalue().splitlines()
  assert first.startswith("step 10/100 [##") and "ETA --:--" in first
  assert "loss 1.0000" in second and "img/s" in second and "ETA 00:0" in second


def test_resuming_drops_records_past_the_checkpoint(tmp_path):
  w = metric_writers.MetricWriter(str(tmp_path))
  for step in (10, 20, 30):
    w.write(step, "train", {"loss": float(step)})
    w.write(step, "val", {"loss": step / 10})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 31, "pha')  # cut by a kill -9
  w = metric_writers.MetricWriter(str(tmp_path), resume_step=20)
  w.write(21, "train", {"loss": 21.0})
  w.close()
  # TensorBoard is told to hide the old events from step 21 on.
  tb_dir = tmp_path / "tensorboard"
  purges = {e.step for f in os.listdir(tb_dir) for e in _events(tb_dir / f)
            if e.HasField("session_log") and e.session_log.status == e.session_log.START}
  assert purges == {21}
  recs = [(r["step"], r["phase"]) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
  assert recs == [(10, "train"), (10, "val"), (20, "train"), (20, "val"), (21, "train")]
  # A finished run resumed at its end redoes the final validation at that step.
  metric_writers.MetricWriter(str(tmp_path), resume_step=21, redo_eval_at_resume=True).close()
  metric_writers.truncate(str(tmp_path / "metrics.jsonl"), 20, keep_eval_at_step=False)
  recs = [(r["step"], r["phase"]) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
  assert recs == [(10, "train"), (10, "val"), (20, "train")]


def _wandb_history(run_dir):
  """{step: {key: value}} from an offline W&B run's .wandb file (a log of records in 32 KiB
  blocks after a 7-byte header, each record checksum, length, type, then a protobuf Record)."""
  import glob  # pylint: disable=g-import-not-at-top
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
    data, pos, buf = open(path, "rb").read(), 7, b""
    while pos + 7 <= len(data):
      if 32768 - pos % 32768 < 7:
        pos += 32768 - pos % 32768
        continue
      n, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
      buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
      if kind in (1, 4):  # a whole record, or the last piece of one
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(buf)
        buf = b""
        if rec.WhichOneof("record_type") == "history":
          items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in rec.history.item}
          out.setdefault(items["_step"], {}).update(
              {k: v for k, v in items.items() if not k.startswith("_")})
  return out


def test_wandb_offline_mirrors_the_scalars_and_plots_and_resumes_the_same_run(tmp_path,
                                                                              monkeypatch):
  pytest.importorskip("wandb")
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("WANDB_SILENT", "true")
  cfg = ml_collections.ConfigDict(dict(enabled=True, project="test", entity="", name="",
                                       mode="offline", tags=("ci",)))
  w = metric_writers.MetricWriter(str(tmp_path), wandb_config=cfg, run_config={"seed": 3})
  w.write(1, "train", {"loss": 2.5, "lr": 1e-3, "note": "text is not a scalar"})
  w.write(2, "val", {"acc1/taxa_L10": 50.0})
  w.image(2, "plots/confusion", np.zeros((4, 6, 3), np.uint8))
  w.close()
  run_id = (tmp_path / "wandb_run_id").read_text()
  w = metric_writers.MetricWriter(str(tmp_path), resume_step=2, wandb_config=cfg)
  w.write(3, "train", {"loss": 2.0})
  w.close()
  assert (tmp_path / "wandb_run_id").read_text() == run_id  # the same W&B run
  history = _wandb_history(str(tmp_path))
  assert history[1] == {"train/loss": 2.5, "train/lr": 1e-3}
  assert history[2]["val/acc1/taxa_L10"] == 50.0
  assert history[2]["plots/confusion/_type"] == "image-file"
  assert (history[2]["plots/confusion/width"], history[2]["plots/confusion/height"]) == (6, 4)
  assert history[3] == {"train/loss": 2.0}
  runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
  assert len(runs) == 2  # one folder per process start, both of run `run_id`
