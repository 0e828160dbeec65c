"""The whole rinna path on a rinna-layout checkpoint: AutoTokenizer + AutoModelForCausalLM + generate with the
model card's arguments, and a chat turn in the instruction models' format."""
from __future__ import annotations

import torch
import transformers
from rinna_fixtures import rinna_checkpoint  # noqa: F401  (fixture)

import neoxja


def test_auto_classes_and_card_generation(rinna_checkpoint):  # noqa: F811
    tokenizer = neoxja.AutoTokenizer.from_pretrained(rinna_checkpoint, use_fast=False)
    model = neoxja.AutoModelForCausalLM.from_pretrained(rinna_checkpoint)
    assert type(tokenizer).__name__ == "SentencePieceTokenizer"
    assert type(model).__name__ == "GPTNeoXForCausalLM" and not model.heads_tied
    text = "西田幾多郎は、"
    token_ids = tokenizer.encode(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        output_ids = model.generate(token_ids.to(model.device), max_new_tokens=30, min_new_tokens=30, do_sample=True,
                                    temperature=0.8, pad_token_id=tokenizer.pad_token_id,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    assert output_ids.shape[1] == token_ids.shape[1] + 30
    assert tokenizer.decode(output_ids.tolist()[0]).startswith(text)
    # the same weights in the reference give the same greedy continuation
    reference = transformers.AutoModelForCausalLM.from_pretrained(rinna_checkpoint).eval()
    expected = reference.generate(token_ids, max_new_tokens=20, do_sample=False, eos_token_id=3, pad_token_id=0)
    assert torch.equal(model.generate(token_ids, max_new_tokens=20, pad_token_id=0), expected)


def test_chat_turn(rinna_checkpoint):  # noqa: F811
    tokenizer = neoxja.AutoTokenizer.from_pretrained(rinna_checkpoint)
    model = neoxja.AutoModelForCausalLM.from_pretrained(rinna_checkpoint)
    messages = [{"role": "user", "content": "日本の首都は？\n一言で。"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert prompt == "ユーザー: 日本の首都は？<NL>一言で。<NL>システム: "
    ids = tokenizer.apply_chat_template(messages, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tokenizer.encode(prompt, add_special_tokens=False)
    out = model.generate(ids, max_new_tokens=8, do_sample=True, seed=0)
    reply = neoxja.chat.parse_reply(tokenizer.decode(out[0, ids.shape[1]:]))
    assert "<NL>" not in reply and isinstance(reply, str)
