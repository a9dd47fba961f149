"""Training: the loop one process runs (:mod:`.loop`), its step modes (:mod:`.step_modes`: eager, compiled,
a CUDA graph), the shared step parts (:mod:`.steps`), checkpoints (:mod:`.checkpoints`) and the Ray Train
wrapper that runs the loop on W workers (:mod:`.ray_train`)."""
