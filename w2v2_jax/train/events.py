"""Read back the TensorBoard scalars a run wrote (for plots, tests and scripts)."""
import collections
import glob
import os


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from every event file under WORKDIR/tensorboard, sorted by step.

  A resumed run appends a new event file; where two files hold the same step, the later file wins.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  files = sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no TensorBoard event files under {os.path.join(workdir, 'tensorboard')}: "
                            "is --workdir the w2v2-train workdir?")
  by_tag = collections.defaultdict(dict)
  for path in files:
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        by_tag[value.tag][int(event.step)] = float(value.simple_value)
  return {tag: sorted(points.items()) for tag, points in by_tag.items()}
