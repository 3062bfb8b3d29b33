"""The Colab notebook runs top to bottom, headless, at tiny sizes on CPU (nbclient)."""

import os
import re

import conftest
import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "experiments", "colab_workflow.ipynb")


def test_colab_notebook_runs_headless(tmp_path, monkeypatch):
  monkeypatch.setenv("W2V2_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("W2V2_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.setenv("XLA_FLAGS", conftest.FAST_COMPILE)  # one CPU device, as a CPU Colab runtime has
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(
    nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(NOTEBOOK) + "/.."}}
  ).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(images) >= 3  # the live loss plot, codebook usage, masked spans over the waveform
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "step 30/30" in text and "valid CER" in text and "context vectors: (" in text
  assert "->" in text  # a transcript line
  difference = float(re.search(r"max \|logit difference\| ours vs transformers: (\S+)", text).group(1))
  assert difference < 1e-4
  for name in ("pretrain", "finetune", "hf_ctc"):
    assert os.path.isdir(tmp_path / name)
