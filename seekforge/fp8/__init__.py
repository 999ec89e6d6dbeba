"""DeepSeek-V3's fine-grained FP8 mixed precision: FP8 GEMMs for linear layers and grouped experts with their
gradients (`gemm`), and the converter that applies them to a model from outside (`convert`). Their blockwise e4m3
quantisation is `seekforge.ops.quant`, shared with FP8 inference weights (`seekforge.model.fp8_weights`)."""
