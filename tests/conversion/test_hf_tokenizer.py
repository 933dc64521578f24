"""``hf_tokenizer`` on the origin's files: the same ids as transformers' chat template, prompt masking, and the
project's needle datasets and passkey prompts built with SmolLM2's real tokenizer."""

import pytest
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message

from mla_components.data import hf_tokenizer, needle_dpo_dataset, needle_sft_dataset
from mla_components.data._haystack import make_needle_sample, needle_prompt_tokens

CHATS = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    # no system message: SmolLM2's template inserts its default system prompt
    [{"role": "user", "content": " Spaces, tabs\tand ünïcödé 🙂 "}, {"role": "assistant", "content": "OK 42"}],
]


def messages_of(chat, masked_roles=("system", "user")):
    return [Message(role=m["role"], content=m["content"], masked=m["role"] in masked_roles) for m in chat]


def ids_of(encoded):
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("chat", CHATS)
def test_chat_ids_equal_transformers_apply_chat_template(chat, smollm2_tokenizer, gguf_reference, smollm2_dir):
    from transformers import AutoTokenizer

    reference = gguf_reference[1]
    reread = AutoTokenizer.from_pretrained(smollm2_dir)  # the written files, as transformers/vLLM read them
    tokens, mask = smollm2_tokenizer.tokenize_messages(messages_of(chat))
    for tokenizer in (reference, reread):
        assert tokens == ids_of(tokenizer.apply_chat_template(chat, tokenize=True))
    assert len(mask) == len(tokens)
    # generation prompt: the chat without the answer, ending at "<|im_start|>assistant\n"
    prompt = smollm2_tokenizer({"messages": messages_of(chat[:-1] + [{"role": "assistant", "content": ""}])}, True)
    expected = reference.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True)
    assert prompt["tokens"] == ids_of(expected)
    text = smollm2_tokenizer.decode(prompt["tokens"], skip_special_tokens=False)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_is_masked_and_answer_trained(smollm2_tokenizer):
    """train_on_input=False: every token up to the assistant turn is masked; the assistant's header, answer and
    <|im_end|> (what the model must learn to emit, stop token included) are trained on."""
    tokens, mask = smollm2_tokenizer.tokenize_messages(messages_of(CHATS[0]))
    first = mask.index(False)
    assert all(mask[:first]) and not any(mask[first:])
    trained = smollm2_tokenizer.decode(tokens[first:], skip_special_tokens=False)
    assert trained == "<|im_start|>assistant\nParis.<|im_end|>\n"
    _, mask = smollm2_tokenizer.tokenize_messages(messages_of(CHATS[0], masked_roles=()))
    assert not any(mask)  # train_on_input=True


def test_encode_decode_round_trip_and_special_ids(smollm2_tokenizer, gguf_reference):
    reference = gguf_reference[1]
    text = "Hello world! ünïcödé 🙂 12345\n\tdef f(x): return x"
    ids = smollm2_tokenizer.encode(text, add_bos=False, add_eos=False)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.decode(ids) == text
    assert smollm2_tokenizer.encode("hi", add_bos=True, add_eos=True)[::2] == [1, 2]  # bos <|im_start|>, eos <|im_end|>
    tok = smollm2_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_tokens, tok.vocab_size) == (1, 2, 2, [2], 49152)
    assert smollm2_tokenizer.decode([1, 2]) == ""  # special tokens skipped by default


def test_truncation_keeps_the_length_and_closes_with_eos(smollm2_dir):
    tokenizer = hf_tokenizer(str(smollm2_dir / "tokenizer.json"), max_seq_len=16)
    tokens, mask = tokenizer.tokenize_messages(messages_of(CHATS[0]))
    assert len(tokens) == len(mask) == 16 and tokens[-1] == tokenizer.eos_id and mask[-1]


def test_needle_sft_and_dpo_samples_with_the_real_tokenizer(smollm2_tokenizer):
    dataset = needle_sft_dataset(smollm2_tokenizer, num_samples=2, context_tokens=1000, seed=3)
    sample = dataset[0]
    tokens, labels = sample["tokens"], sample["labels"]
    assert 950 <= len(tokens) <= 1000 and len(labels) == len(tokens)
    first = next(i for i, label in enumerate(labels) if label != CROSS_ENTROPY_IGNORE_IDX)
    assert all(label == CROSS_ENTROPY_IGNORE_IDX for label in labels[:first])  # the whole prompt is masked
    answer = dataset.needle_sample(0).answer
    assert smollm2_tokenizer.decode(labels[first:], skip_special_tokens=False) == (
        f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    )
    dpo = needle_dpo_dataset(smollm2_tokenizer, num_samples=1, context_tokens=600, needle_kinds=["passkey"])[0]
    assert dpo["chosen_input_ids"] != dpo["rejected_input_ids"]


def test_passkey_prompt_ends_at_the_answer(smollm2_tokenizer):
    sample = make_needle_sample(smollm2_tokenizer, context_tokens=512, depth=0.5, seed=0)
    prompt = needle_prompt_tokens(smollm2_tokenizer, sample)
    assert 450 <= len(prompt) <= 512
    assert smollm2_tokenizer.decode(prompt, skip_special_tokens=False).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert sample.answer in smollm2_tokenizer.decode(prompt)


def test_missing_tokenizer_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer path=.*has no tokenizer\.json"):
        hf_tokenizer(str(tmp_path))
