"""Model code: MoE families that read Hugging Face checkpoints, sharded for EP.

Module guide (public entry points in loader.py: load_model, load_tokenizer, read_model_spec):
  spec.py            ModelSpec (normalised shape of a checkpoint), ModelLoadError
  families/          architecture registry: config.json parsing, checkpoint names, router rule per family
  loader.py          ModelConfig -> folder / tiny assets / random shape -> MoECausalLM, tokenizer
  checkpoint.py      safetensors reader (single file or index + shards, row slices, byte accounting)
  quantization.py    config.json's quantization_config vs model.quantization -> FP8 block scheme or refusal
  fp8_reader.py      checkpoint reader that dequantises FP8 weights as they are read, checks their scales
  expert_format.py   whether routed experts keep FP8 codes + block scales (CUDA, auto) or load as values
  weights.py         checkpoint -> parameters (per-expert and fused expert layouts, this rank's experts only)
  random_weights.py  seeded random weights for `model.shape` benchmarks
  causal_lm.py       MoECausalLM: forward(ForwardBatch, kv_caches) -> [S, V] logits, allocate_kv_cache
  decoder.py         one decoder layer (attention + MoE or dense MLP)
  self_attention.py  projections, q/k norm, RoPE, then paged attention (server/layers/attention.py)
  mla_attention.py   multi-head latent attention (DeepSeek-V3): absorbed kv_b_proj over a latent cache
  gpu/               CUDA-only: decode CUDA graphs (gpu/__init__.py)
  forward_batch.py   ForwardBatch: the engine <-> model contract
Building blocks (RMSNorm, activations, gated MLP, RoPE, paged attention) are in server/layers/;
the MoE block itself (router, policy, counters, dispatch, experts) lives in server/moe/.
"""
