"""Training: real corpora tokenised and packed, a small BPE tokenizer, the one training loop.

Modules:
  data   load_tokens(corpus, tokenizer, seq_len, split) -> int32 [N, seq_len];
         mixed_rows(corpora, tokenizer, seq_len, split, n_rows=, seed=, even=) -> [N, seq_len]
         (several corpora concatenated, shuffled or an even share); batch_at / iterate_batches ->
         [batch, seq_len]; CORPORA, split_documents, pack, separator, document_names
  bpe    train_bpe(texts, vocab_size) -> tokenizer; corpus_tokenizer(corpora, vocab_size) (cached)
  train  train(model, train_rows [N, T], val_rows [M, T], TrainConfig, out_dir) -> TrainResult (model, log);
         next_token_loss, optimizer, lr_schedule, make_step, evaluate, save_checkpoint / load_checkpoint
"""
