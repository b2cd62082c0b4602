#!/usr/bin/env bash
# The main job on its embedded default: the whole recipe on CPU on the bundled sample (data/sample).
#   base tokenizer (a LLaMA-like stand-in; pass BASE_TOKENIZER=path/to/llama2/tokenizer.model for
#   the real one) → extend with Vietnamese → preprocess → tiny LLaMA → stage 1 (new rows only,
#   TP=2) → stage 2 (all weights, PP=2) → export to HF → generate → SFT on conversations (VBD-Chat's
#   template) → export the chat model → a conversation with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
R=runs/quickstart
P=.venv/bin/python
TORCHRUN=.venv/bin/torchrun
export OMP_NUM_THREADS=1 WANDB_MODE=${WANDB_MODE:-offline} PYTHONWARNINGS=ignore
mkdir -p "$R"
step() { echo; echo "== $*"; }
quiet() { "$@" > "$R/last_step.log" 2>&1 || { cat "$R/last_step.log"; echo "failed: $*"; exit 1; }; }
failed() { grep -v -i warn "$1" | tail -n 40; echo "failed; the whole log is $1"; exit 1; }
start=$(date +%s)

step "1/10 base tokenizer"
if [ -n "${BASE_TOKENIZER:-}" ]; then mkdir -p $R/base_tokenizer; cp "$BASE_TOKENIZER" $R/base_tokenizer/tokenizer.model
else $P tools/train_base_tokenizer.py --corpus data/sample/en_gutenberg.jsonl.xz --vocab-size 2000 \
        --output $R/base_tokenizer/tokenizer.model; fi

step "2/10 extend it with Vietnamese pieces"
$P tools/extend_tokenizer.py --base-model $R/base_tokenizer/tokenizer.model --corpus data/sample/vi_wiki.jsonl.xz \
    --english data/sample/en_gutenberg.jsonl.xz --num-new-tokens 1500 --lang vi --output-dir $R/tokenizer --overwrite

step "3/10 preprocess Vietnamese, English and En-Vi translation pairs"
for spec in "vi:--input data/sample/vi_wiki.jsonl.xz --normalize vi" "en:--input data/sample/en_gutenberg.jsonl.xz" \
            "mt:--parallel data/sample/tatoeba.en.xz data/sample/tatoeba.vi.xz"; do
    name=${spec%%:*}; rm -rf "$R/data/$name".*
    # shellcheck disable=SC2086
    quiet $P tools/preprocess_data.py ${spec#*:} --tokenizer-model $R/tokenizer/tokenizer.model \
        --output-prefix $R/data/$name --append-eod
    echo "$name: $(grep -m1 '"tokens"' $R/data/$name.stats.json)"
done
$P tools/make_blend.py --group mt=50:$R/data/mt --group vi=30:$R/data/vi --group en=20:$R/data/en --output $R/data/stage1.json
$P tools/make_blend.py --group vi=100:$R/data/vi --group en=40:$R/data/en --output $R/data/stage2.json

step "4/10 tiny LLaMA over the base vocabulary"
$P tools/make_tiny_llama.py --tokenizer $R/base_tokenizer/tokenizer.model --output $R/base_llama

step "5/10 stage 1: only the added vocabulary rows train (TP=2, 2 processes)"
rm -rf $R/stage1 $R/stage2
$TORCHRUN --nproc-per-node 2 -m megatron_adapt.pretrain --config configs/tiny_cpu_stage1.yaml \
    --set model.base_tokenizer=$R/base_tokenizer/tokenizer.model 2> $R/stage1.log || failed $R/stage1.log
step "6/10 stage 2: all weights (PP=2, 2 processes)"
$TORCHRUN --nproc-per-node 2 -m megatron_adapt.pretrain --config configs/tiny_cpu_stage2.yaml \
    --set model.base_tokenizer=$R/base_tokenizer/tokenizer.model 2> $R/stage2.log || failed $R/stage2.log
$P - <<PY
import json
for stage in ("stage1", "stage2"):
    rows = [json.loads(l) for l in open("$R/%s/metrics.jsonl" % stage) if '"loss"' in l]
    print(f"{stage}: training loss {rows[0]['loss']:.3f} (step {rows[0]['step']}) -> {rows[-1]['loss']:.3f} (step {rows[-1]['step']})")
PY

step "7/10 export to Hugging Face format"
$P tools/convert_checkpoint.py megatron-to-hf --checkpoint $R/stage2 --tokenizer-dir $R/tokenizer \
    --output $R/hf_release --dtype fp32

step "8/10 generate with transformers from the export"
$P tools/generate.py --model $R/hf_release --prompt "Việt Nam là" --prompt "Hà Nội" --max-new-tokens 24 2>/dev/null

step "9/10 SFT: two-turn conversations in VBD-Chat's template, loss on answers only (TP=2)"
rm -rf "$R"/data/chat.* "$R/sft"
quiet $P tools/preprocess_data.py --instructions data/sample/chat_vi.jsonl.xz --chat-template vbd \
    --tokenizer-model $R/tokenizer/tokenizer.model --output-prefix $R/data/chat
echo "chat: $(grep -m1 '"tokens"' $R/data/chat.stats.json) $(grep -m1 '"target_tokens"' $R/data/chat.stats.json)"
$P tools/make_blend.py --group chat=1:$R/data/chat --output $R/data/sft.json
$TORCHRUN --nproc-per-node 2 -m megatron_adapt.pretrain --config configs/tiny_cpu_sft.yaml \
    --set model.base_tokenizer=$R/base_tokenizer/tokenizer.model 2> $R/sft.log || failed $R/sft.log
$P - <<PY
import json
rows = [json.loads(l) for l in open("$R/sft/metrics.jsonl") if '"loss"' in l]
print(f"sft: training loss {rows[0]['loss']:.3f} (step {rows[0]['step']}) -> {rows[-1]['loss']:.3f} (step {rows[-1]['step']})")
PY

step "10/10 export the chat model (template in tokenizer_config.json) and talk to it"
$P tools/convert_checkpoint.py megatron-to-hf --checkpoint $R/sft --tokenizer-dir $R/tokenizer \
    --output $R/hf_chat --dtype fp32 --chat-template vbd
$P tools/generate.py --model $R/hf_chat --chat --greedy --prompt "Dịch sang tiếng Việt: Thank you." \
    --prompt "Translate into English: Cảm ơn bạn." --max-new-tokens 16 2>/dev/null

echo
echo "done in $(( $(date +%s) - start )) s. Artefacts under $R/:"
echo "  tokenizer/ (extended tokenizer, report.json)   data/ (indexed datasets, blends)"
echo "  stage1/ stage2/ sft/ (checkpoints, metrics.jsonl; logs stage1.log stage2.log sft.log)"
echo "  hf_release/ (HF model)   hf_chat/ (HF chat model)"
