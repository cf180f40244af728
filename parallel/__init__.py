# parallel/: everything that knows about ranks. `parallelize.py` is the only place it is applied to cpdit modules.
#
# The seams, each named once: a model in cpdit/ calls the single-device side; parallelize swaps in the parallel
# twin, which computes the same numbers on this rank's share (parity-tested in float64).
#
# seam                        single device (cpdit/)                       parallel twin (parallel/)
# model.sequence: frames,     sequence.py LocalSequence: every frame here, cp_sequence.py ContextParallelSequence:
#   attention, frame windows    SDPA or dense biased attention,              sequence.py SequencePlan, attention/,
#                               zero-padded windows                          frame_halo.py FrameWindows
# seq.axes: frames <-> tokens seams.py LocalAxes                            axis_switch.py CPAxes (over AxisSwitch)
# attention biases            attn_bias.py AttentionBias, dense_attention  attention/bias.py BlockBias
# heads (Phenaki)             seams.py AllHeads                            tensor_parallel.py TPHeads
# tensor-parallel plan        models/<family>/__init__.py: plan strings    tensor_parallel.py apply_tensor_parallel
# init_weights(seed, assign)  full tensors by parameter name               state.py assign_full (keeps the shard)
# VAE time axis               vae/time.py LocalTime                        vae.py CPTime
# first stage                 first_stage.py PixelStage, VAEStage          vae_stage.py ContextParallelVAE
# how counts split            partition.py even_split, frame_partition: one function, used by both sides
