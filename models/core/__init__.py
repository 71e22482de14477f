"""The model core: what one forward computes.

Modules:
  config        ModelConfig: the one frozen config every family converts into (typed flags, no
                architecture names in the forward)
  layers        norms (float32), rotary, attention, MLP activations: stateless functions
  block         Block (one layer's weights) and block_forward(config, block, x [seq, d], query_pos,
                *, key_pos, rotary, ...) -> (x [seq, d], kv, Activations)
  transformer   Transformer: embed -> lax.scan over stacked blocks -> final norm -> unembed;
                __call__(tokens [seq]) -> logits [seq, vocab], forward -> ForwardOutput;
                pad_batch; first_blocks(model, n) -> a model of its first n blocks
  moe           the mixture-of-experts MLP (Mixtral, OLMoE): route(config, W_router, h [seq, d]) ->
                (router logits, weights [seq, experts], chosen [seq, k]); moe_mlp (dense, exact)
  interventions Edits (interventions as data, [layers, ...] arrays), Capture (what to record),
                Activations (the typed cache); PATCH_SITES: every patchable site, declared once;
                ResidFn: the custom edit (a pure fn of the residual, layer, positions)
  ranges        range_error / check_index: THE wording of a layer / position / head out of range
  kv_cache      KVCache: arrays passed into the forward and returned updated
  random_init   init(config, key) -> Transformer with transformers' initialisation conventions
  sharding      how every weight splits over a ("data", "model", "fsdp") mesh, declared once;
                make_mesh, shard(model, mesh), place_batch, kv_cache_sharding
"""
