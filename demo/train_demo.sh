#!/usr/bin/env bash
# Trains neoxja's bundled demo model (src/neoxja/data/demo-model) from scratch on public-domain Aozora Bunko text
# (Soseki, Ogai, Akutagawa; ../shared/data/corpus/train.txt), with the ABEJA tokenizer, on 2 CPU threads.
# Held-out: valid.txt (works never in train.txt). Checkpoints and optimizer state go to demo/run/ (git-ignored,
# `--resume` continues an interrupted run); the exported bfloat16 model is then copied into the package.
# Run from the repository root:  bash demo/train_demo.sh
set -euo pipefail
CORPUS=${CORPUS:-../shared/data/corpus}
RUN=demo/run
{
  echo "# $(date -u +%FT%TZ) start: $(python -c 'import torch; print("torch", torch.__version__)')"
  time neoxja train "$CORPUS/train.txt" --eval-file "$CORPUS/valid.txt" --output "$RUN" "$@" \
    --config hidden_size=224 num_hidden_layers=4 num_attention_heads=4 intermediate_multiple_size=4 \
             max_position_embeddings=512 attention_dropout=0.0 \
    --seq-len 512 --batch-size 8 --grad-accum 1 --max-steps 600 --warmup-steps 30 \
    --lr 2e-3 --min-lr 1e-4 --weight-decay 0.1 --grad-clip 1.0 --dtype bfloat16 --seed 0 --threads 2 \
    --eval-every 50 --eval-sequences 32 --save-every 50 --log-every 10 --save-dtype bfloat16
  echo "# $(date -u +%FT%TZ) end"
} 2>&1 | tee demo/train.log
DEST=src/neoxja/data/demo-model
mkdir -p "$DEST"
cp "$RUN"/{config.json,model.safetensors,vocab.txt,emoji.json,special_tokens_map.json,tokenizer_config.json} "$DEST"/
cp "$RUN/loss.png" demo/loss.png
# Sampling defaults for `neoxja generate` / pipeline(): a 10M-parameter model loops under greedy decoding.
python -c "from neoxja import GenerationConfig; GenerationConfig(do_sample=True, temperature=0.8, top_p=0.95,
    top_k=50, repetition_penalty=1.1, max_new_tokens=100, bos_token_id=31996, eos_token_id=31999,
    ).save_pretrained('$DEST')"
chmod 644 "$DEST"/*
