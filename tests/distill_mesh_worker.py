"""Run by tests/test_sharding.py on 8 simulated CPU devices: a distillation step on a data x tensor mesh equals
the one-device step (student state and teacher params laid out by the sharding rules). Prints one JSON line."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from test_distill import TINY, _packed_and_unpacked

from jfast.compress import DistillConfig, make_distill_step, student_from_teacher
from jfast.models import BertForSequenceClassification
from jfast.parallel import make_mesh
from jfast.training import create_train_state

cfg = TINY.replace(vocab_size=96)  # divisible by the tensor axis
model = BertForSequenceClassification(cfg, num_labels=2)
tp = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"]
s_cfg, sp = student_from_teacher(cfg, tp, (0, 3))
student = BertForSequenceClassification(s_cfg, num_labels=2)
packed, _ = _packed_and_unpacked()
packed = packed._replace(input_ids=np.minimum(packed.input_ids, 95))
c = DistillConfig(alpha=0.7, temperature=2.0, hidden_weight=1.0)
one = make_distill_step(student, model, c, donate=False)
mesh = make_mesh(data=4, tensor=2)
sharded = make_distill_step(student, model, c, mesh=mesh)
s1 = create_train_state(student, sp, optax.adamw(1e-3), seed=0)
s2 = create_train_state(student, sp, optax.adamw(1e-3), seed=0, mesh=mesh)
losses = []
for _ in range(3):
  s1, m1 = one(s1, tp, packed)
  s2, m2 = sharded(s2, tp, packed)
  losses.append(abs(float(m1["loss"]) - float(m2["loss"])))
diff = max(
  float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True)
)
kernel = s2.params["bert"]["encoder_layer_1"]["intermediate"]["kernel"]
print(
  json.dumps(
    {
      "loss_diff": max(losses),
      "param_diff": diff,
      "compiles": sharded.num_compiles,
      "devices": len(kernel.sharding.device_set),
      "finite": bool(np.isfinite(float(m2["loss"]))),
    }
  )
)
