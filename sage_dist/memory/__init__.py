"""Per-rank memory accounting: what each rank holds, measured and estimated.

Two halves that use the same keys, so a measurement and an estimate compare field by field:

- measure.py, `measure(model, optimizer, engine=None)`: this rank's bytes, read from the real
  tensors — parameters (by dtype), gradients, fp32 master weights, optimizer state
  (elementwise and replicated, per rule) — and the process peak (peak CUDA allocated/reserved
  on a GPU, peak RSS always). `gather_table` collects every rank's record on rank 0;
  `flatten` turns a record into flat metrics.
- estimate.py, `estimate(model, world, engine, zero, recipe, ...)`: the same breakdown from
  the model's shapes alone (a Llama config, by shipped name or path, built on the meta device
  by sage_dist.models), modelling DeepSpeed 0.19's and FSDP2's partitioning exactly (with
  sage_dist.shard.zero's partition arithmetic), for any world size.
- report.py: `format_table` (measured records), `report` / `format_report` / `format_row`
  (what `sage-dist memory` prints), `fit` and `plot`.

What each component counts (docs/MEMORY.md has the longer version):

parameters      the model's parameter storage on this rank: whole (local/DDP), DeepSpeed ZeRO-1/2's
                flat low-precision groups (padded to a multiple of 2·world), ZeRO-3's partitions
                (ceil(numel/world) each) plus the parameters it keeps whole (numel <=
                stage3_param_persistence_threshold), FSDP2's padded row shards.
gradients       gradient storage that is resident once backward has finished, before the step:
                p.grad (local/DDP, FSDP2: the padded reduce-scatter outputs); DeepSpeed ZeRO-1/2:
                the WHOLE gradients of every parameter that overlaps this rank's partition
                (DeepSpeed 0.19 copies them whole into one contiguous buffer), or the fp32
                partition on the host under optimizer offload; ZeRO-3: its flat buffer of
                partitioned gradients. DeepSpeed frees the ZeRO-1/2 buffers in step(): measure
                between backward and step to see them.
master_weights  DeepSpeed's fp32 partitions (also kept in fp32 training: a separate copy).
                FSDP2 and plain models update the parameters themselves: 0.
optimizer_state the optimizer's state tensors: 'elementwise' (shaped like this rank's slice or
                partition, padding included) and 'replicated' (held whole on every rank:
                SAGE's per-column S, step counts), and per rule.

Transient memory (activations, all-gathered FSDP2/ZeRO-3 layers, communication buckets, the
fp32 copy DeepSpeed makes of one group's gradients inside step) is not a component; it shows
in the measured peak only.
"""
from .estimate import (DS_PERSISTENCE_THRESHOLD, DS_REDUCE_BUCKET_SIZE, DS_SUB_GROUP_SIZE,
                       ENGINES, ModelShapes, ParamShape, deepspeed_adamw_estimate, estimate,
                       estimate_ranks, merge_pays, model_shapes)
from .measure import (COMPONENTS, FP32, GIB, MIB, flatten, gather_table, measure,
                      optimizer_state_bytes, peak_memory)
from .report import (fit, fmt_bytes, format_fit, format_report, format_row, format_table, plot,
                     report, setup_label, to_json)

__all__ = [
    # measurement
    "measure", "gather_table", "flatten", "optimizer_state_bytes", "peak_memory",
    # estimation
    "estimate", "estimate_ranks", "model_shapes", "ModelShapes", "ParamShape",
    "deepspeed_adamw_estimate", "merge_pays",
    # formatting, fit, plot
    "format_table", "fmt_bytes", "report", "format_report", "format_row", "fit", "format_fit",
    "plot", "setup_label", "to_json",
    # constants
    "GIB", "MIB", "FP32", "COMPONENTS", "ENGINES", "DS_SUB_GROUP_SIZE",
    "DS_PERSISTENCE_THRESHOLD", "DS_REDUCE_BUCKET_SIZE",
]
