"""`experiments.llm` end to end at a tiny size: both sides of the pretraining race, then the three fine-tuning modes."""

from __future__ import annotations

import json

import numpy as np
import pytest

TINY = (
  "--vocab 300 --length 32 --layers 2 --d-model 32 --heads 4 --kv-heads 2 --intermediate 64 --batch-size 2 "
  "--steps 5 --eval-every 2 --eval-rows 4 --ft-length 32 --ft-batch-size 2 --ft-steps 4 --ft-eval-every 2 "
  "--ft-eval-rows 4"
)


@pytest.mark.slow
def test_llm_experiment_races_both_sides_and_compares_fine_tuning_modes(tmp_path, data_dir):
  from experiments import llm
  from jfast.app.runs import cpu_description

  data = ["--data", str(data_dir / "tinyshakespeare"), "--sst2", str(data_dir / "sst2")]
  llm.main([*TINY.split(), *data, "--output", str(tmp_path)])
  result = json.loads((tmp_path / "llm.json").read_text())
  assert (tmp_path / "llm.png").stat().st_size > 0 and (tmp_path / "tokenizer.json").is_file()

  # Part A: same init and batches on both sides, so the first validation losses agree; training lowers both.
  jfast, pytorch = result["pretrain"]["sides"]["jfast"], result["pretrain"]["sides"]["pytorch"]
  assert [c["step"] for c in jfast["curve"]] == [1, 3, 5] == [c["step"] for c in pytorch["curve"]]
  np.testing.assert_allclose(jfast["curve"][0]["val_loss"], pytorch["curve"][0]["val_loss"], rtol=1e-4)
  assert jfast["final_val_loss"] < jfast["curve"][0]["val_loss"]
  summary = result["pretrain"]["summary"]
  assert summary["target_val_loss"] == max(jfast["final_val_loss"], pytorch["final_val_loss"])
  assert jfast["memory"]["compile_s"] > 0 and pytorch["median_step_s"] > 0

  # Part B starts from part A's jfast model; each mode trains fewer parameters and keeps less optimizer state.
  tune = result["finetune"]
  assert tune["start"] == "part A's jfast-trained model" and set(tune["modes"]) == {"full", "freeze", "lora", "qlora"}
  modes = tune["modes"]
  full, frozen, lora, qlora = modes["full"], modes["freeze"], modes["lora"], modes["qlora"]
  assert qlora["trainable_params"] == lora["trainable_params"]
  assert qlora["memory"]["param_bytes"] < lora["memory"]["param_bytes"]  # the int8 base
  assert set(tune["memory_by_remat"]) == {f"{m}/{r}" for m in modes for r in ("none", "full")}
  assert full["trainable_params"] == full["total_params"] == result["setup"]["params"]
  assert lora["trainable_params"] < frozen["trainable_params"] < full["trainable_params"]
  assert lora["memory"]["opt_state_bytes"] < frozen["memory"]["opt_state_bytes"] < full["memory"]["opt_state_bytes"]
  for r in modes.values():
    m = r["memory"]
    assert r["step_memory_bytes"] == m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"]
    assert r["final_val_loss"] < tune["val_loss_before"] and r["median_step_s"] > 0
  targets = {t["target"]: t for t in tune["targets"]}
  state = targets["LoRA optimizer state <= 3% of full fine-tuning's"]
  assert state["ratio"] == lora["memory"]["opt_state_bytes"] / full["memory"]["opt_state_bytes"]

  text = (tmp_path / "llm.md").read_text()
  assert "`python -m experiments.llm --vocab 300 " in text and f"({cpu_description()}, " in text
  for row in ("| jfast |", "| pytorch |", "| full |", "| freeze |", "| lora |", "| qlora |", "Target validation loss"):
    assert row in text, row
  assert text.count("| met |") + text.count("| missed |") == 2
