"""Layer-sharded calibration over several processes (`torchrun`, or `tlq calibrate --nproc N`).

The decoder layers are split into N contiguous stages, one per rank (plan.py: the split that
balances weight bytes, rank 0 also holding the vision tower, projector and embeddings, the last
rank the final norm and lm_head). Each rank builds the model skeleton on the meta device and
reads from the safetensors files only its share (stage_model.py). Then, per rank (run.py):

  capture      rank 0 runs vision tower + embeddings once, sends every rank the per-sample
               layer arguments, labels and modality (not the hidden states: only rank 0 needs them)
  gradients    pipelined 1F1B over samples (gradients.py): activations flow forward rank to rank,
               gradients back; each rank keeps its layers' token importance
  FP path      each stage computes its layers' FP outputs ahead, while earlier stages calibrate
  layer loop   quantization-exposed calibration, stage after stage (stage_loop.py): rank r waits
               for the quantized stream of rank r-1, calibrates its layers, hands the stream on
  write        each rank writes its own shard files as soon as its stage is done; rank 0 then
               numbers the shards, writes index, config and manifest, and renames the folder
               into place (writer.py)

Failures (watchdog.py): a rank that fails posts its error in the rendezvous store; a rank whose
heartbeat stops is taken as dead; either way every other rank stops within a bounded time with
one error line, rank 0 removes the unfinished output folder, and per-rank work folders keep every
finished layer, so rerunning the same command resumes.
"""
