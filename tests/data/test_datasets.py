"""Needle SFT/DPO datasets: Torchtune sample formats, collation, packing, determinism, config use, rejections."""

import re

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler
from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_dpo, padded_collate_packed, padded_collate_sft
from torchtune.datasets import PackedDataset

from mla_components.data import (
    REJECTION_KINDS,
    NeedleDPODataset,
    NeedleSFTDataset,
    byte_tokenizer,
    needle_dpo_dataset,
    needle_sft_dataset,
)
from mla_components.data._word_lists import TRAIN

SLACK = 3


def answer_span(tokenizer, labels):
    """The trained-on tokens decoded, specials included (the assistant turn when the prompt is masked)."""
    return tokenizer.decode([t for t in labels if t != CROSS_ENTROPY_IGNORE_IDX], skip_special_tokens=False)


@pytest.mark.parametrize("kinds", [("passkey",), ("passkey", "kv", "multi")])
def test_sft_samples_are_sized_and_masked(kinds):
    tokenizer = byte_tokenizer(max_seq_len=512)
    dataset = needle_sft_dataset(tokenizer, num_samples=6, context_tokens=512, needle_kinds=kinds)
    assert isinstance(dataset, NeedleSFTDataset) and len(dataset) == 6
    for i in range(len(dataset)):
        item = dataset[i]
        assert set(item) == {"tokens", "labels"} and len(item["tokens"]) == len(item["labels"])
        assert 512 - SLACK <= len(item["tokens"]) <= 512
        assert item["tokens"][0] == tokenizer.bos_id and item["tokens"][-1] == tokenizer.eos_id
        sample = dataset.needle_sample(i)
        assert sample.kind == kinds[i % len(kinds)]
        assert answer_span(tokenizer, item["labels"]) == (
            f"<|start_header_id|>assistant<|end_header_id|>\n\n{sample.answer}<|eot_id|>"
        )


def test_sft_train_on_input_unmasks_the_prompt(byte_tok):
    item = needle_sft_dataset(byte_tok, num_samples=1, context_tokens=300, train_on_input=True)[0]
    assert item["labels"][1:-1] == item["tokens"][1:-1]  # only bos and eos stay masked
    assert item["labels"][0] == item["labels"][-1] == CROSS_ENTROPY_IGNORE_IDX


def test_sample_depends_only_on_seed_and_index(byte_tok):
    def make(**overrides):
        return needle_sft_dataset(byte_tok, **(dict(num_samples=10, context_tokens=300, seed=5) | overrides))

    reference = make()
    later_first = [make()[i] for i in (7, 3)]  # access order and dataset length do not matter
    assert later_first == [reference[7], reference[3]]
    assert make(num_samples=20)[3] == reference[3]
    assert make(seed=6)[3] != reference[3] and reference[3] != reference[4]


def test_distributed_shards_cover_the_dataset_once(byte_tok):
    dataset = needle_sft_dataset(byte_tok, num_samples=8, context_tokens=300)
    shards = [list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(8))
    seen = [dataset[i]["tokens"] for shard in shards for i in shard]
    assert len({tuple(t) for t in seen}) == 8


def test_sft_collates_with_padded_collate_sft(byte_tok):
    dataset = needle_sft_dataset(byte_tok, num_samples=4, context_tokens=400, needle_kinds=["kv", "passkey"])
    loader = DataLoader(
        dataset,
        batch_size=4,
        collate_fn=lambda b: padded_collate_sft(b, padding_idx=byte_tok.pad_id, ignore_idx=CROSS_ENTROPY_IGNORE_IDX),
    )
    batch = next(iter(loader))
    lengths = [len(dataset[i]["tokens"]) for i in range(4)]
    assert batch["tokens"].shape == batch["labels"].shape == (4, max(lengths))
    for row, length in enumerate(lengths):
        assert torch.all(batch["tokens"][row, length:] == byte_tok.pad_id)
        assert torch.all(batch["labels"][row, length:] == CROSS_ENTROPY_IGNORE_IDX)
        assert batch["tokens"][row, :length].tolist() == dataset[row]["tokens"]


def test_packed_dataset_and_padded_collate_packed():
    tokenizer = byte_tokenizer(max_seq_len=1024)
    packed = needle_sft_dataset(tokenizer, num_samples=6, context_tokens=300, packed=True)
    unpacked = needle_sft_dataset(tokenizer, num_samples=6, context_tokens=300)
    assert isinstance(packed, PackedDataset)
    assert len(packed) == 2  # three ~300-token samples fit in each 1024-token pack
    batch = next(iter(DataLoader(packed, batch_size=2, collate_fn=padded_collate_packed)))
    assert batch["tokens"].shape == (2, 1024) and batch["mask"].shape == (2, 1024, 1024)
    first_three = [t for i in range(3) for t in unpacked[i]["tokens"]]
    assert batch["tokens"][0, : len(first_three)].tolist() == first_three
    assert torch.all(batch["tokens"][0, len(first_three) :] == tokenizer.pad_id)


def test_instantiates_from_yaml_like_the_recipes():
    tokenizer = config.instantiate(
        OmegaConf.create({"_component_": "mla_components.data.byte_tokenizer", "max_seq_len": 512})
    )
    sft_cfg = OmegaConf.create(
        {"_component_": "mla_components.data.needle_sft_dataset", "num_samples": 4, "context_tokens": 256}
    )
    sft = config.instantiate(sft_cfg, tokenizer)  # what full_finetune_* do; they read `packed` from the config
    assert len(sft) == 4 and isinstance(sft, NeedleSFTDataset)  # unpacked unless `packed: True`
    assert 250 <= len(sft[0]["tokens"]) <= 256 and len(sft[0]["labels"]) == len(sft[0]["tokens"])
    dpo_cfg = OmegaConf.create(
        {"_component_": "mla_components.data.needle_dpo_dataset", "num_samples": 3, "context_tokens": 512}
    )
    dpo = config.instantiate(dpo_cfg, tokenizer=tokenizer)  # what full_dpo_distributed does
    assert len(dpo) == 3 and set(dpo[0]) == {
        "chosen_input_ids",
        "chosen_labels",
        "rejected_input_ids",
        "rejected_labels",
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(context_tokens=120), "context_tokens=120 is too small for needle kind 'passkey'"),
        (dict(context_tokens=300, needle_kinds=["multi"]), "context_tokens=300 is too small for needle kind 'multi'"),
        (dict(num_samples=0), "num_samples must be a positive int"),
        (dict(needle_kinds=["passkey", "needle"]), "needle_kinds must be a non-empty subset"),
        (dict(depth=-0.1), "depth must be a float"),
        (dict(split="validation"), "split must be one of"),
    ],
)
def test_sft_bad_arguments_name_the_field(byte_tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        needle_sft_dataset(byte_tok, **(dict(num_samples=4, context_tokens=400) | kwargs))


def test_sft_rejects_tokenizer_limits():
    with pytest.raises(ValueError, match="exceeds tokenizer.max_seq_len=256"):
        needle_sft_dataset(byte_tokenizer(max_seq_len=256), num_samples=2, context_tokens=400)
    with pytest.raises(ValueError, match="packed=True needs tokenizer.max_seq_len"):
        needle_sft_dataset(byte_tokenizer(), num_samples=2, context_tokens=400, packed=True)


def test_dpo_items_share_the_prompt_and_differ_in_the_answer(byte_tok):
    dataset = needle_dpo_dataset(byte_tok, num_samples=9, context_tokens=600)
    for i in range(len(dataset)):
        item = dataset[i]
        sample, rejected, _ = dataset.preference(i)
        for side in ("chosen", "rejected"):
            assert len(item[f"{side}_input_ids"]) == len(item[f"{side}_labels"]) <= 600
        prompt_length = item["chosen_labels"].index(byte_tok.start_header_id)
        assert prompt_length > 500
        assert item["chosen_input_ids"][:prompt_length] == item["rejected_input_ids"][:prompt_length]
        assert set(item["chosen_labels"][:prompt_length]) == {CROSS_ENTROPY_IGNORE_IDX}
        assert answer_span(byte_tok, item["chosen_labels"]).endswith(f"\n\n{sample.answer}<|eot_id|>")
        assert answer_span(byte_tok, item["rejected_labels"]).endswith(f"\n\n{rejected}<|eot_id|>")


def test_each_rejection_kind_is_wrong_and_of_its_origin(byte_tok):
    dataset = needle_dpo_dataset(byte_tok, num_samples=48, context_tokens=700, needle_kinds=["passkey", "kv", "multi"])
    seen, digit_count_errors = set(), set()
    for i in range(len(dataset)):
        sample, rejected, origin = dataset.preference(i)
        seen.add(origin)
        assert rejected != sample.answer
        if origin == "wrong_digits":
            assert len(rejected) == len(sample.answer)
            changed = sum(a != b for a, b in zip(rejected, sample.answer, strict=True))
            assert 1 <= changed <= 2 and rejected not in sample.prompt and rejected[0] != "0"
        elif origin == "distractor":
            assert sample.kind == "multi" and rejected in sample.distractors
            needle_sentences = [
                re.escape(needle).replace(r"\{name\}", "[A-Za-z ]+").replace(r"\{value\}", rejected)
                for needle, _ in TRAIN.kv_templates
            ]
            assert re.search("|".join(needle_sentences), sample.context)
        elif origin == "digit_count":  # one digit left out, a run of 1-3 digits repeated, or a runaway last digit
            runaway = rejected.rstrip(sample.answer[-1]) == sample.answer.rstrip(sample.answer[-1]) and (
                2 <= len(rejected) - len(sample.answer) <= 6
            )
            digit_count_errors.add("runaway" if runaway else "other")
            dropped = len(rejected) == len(sample.answer) - 1 and any(
                sample.answer[:i] + sample.answer[i + 1 :] == rejected for i in range(len(sample.answer))
            )
            repeated = any(
                sample.answer[: i + r] + sample.answer[i : i + r] + sample.answer[i + r :] == rejected
                for i in range(len(sample.answer))
                for r in (1, 2, 3)
            )
            assert (dropped or repeated or runaway) and rejected[0] != "0"
            assert not re.search(rf"(?<!\d){rejected}(?!\d)", sample.prompt)
        else:
            assert origin == "haystack_value" and rejected in sample.decoys and rejected in sample.context
            assert rejected not in sample.distractors
    assert seen == set(REJECTION_KINDS) and digit_count_errors == {"runaway", "other"}


def test_distractor_rejection_is_skipped_where_it_cannot_apply(byte_tok):
    dataset = needle_dpo_dataset(byte_tok, num_samples=16, context_tokens=500, needle_kinds=["passkey", "kv"])
    origins = {dataset.preference(i)[2] for i in range(len(dataset))}
    assert origins == {"wrong_digits", "haystack_value", "digit_count"}


def test_dpo_collates_with_padded_collate_dpo(byte_tok):
    dataset = needle_dpo_dataset(byte_tok, num_samples=4, context_tokens=500, needle_kinds=["passkey", "kv"])
    loader = DataLoader(
        dataset,
        batch_size=2,
        collate_fn=lambda b: padded_collate_dpo(b, padding_idx=byte_tok.pad_id, ignore_idx=CROSS_ENTROPY_IGNORE_IDX),
    )
    input_ids, labels = next(iter(loader))
    assert input_ids.shape == labels.shape and input_ids.shape[0] == 4  # chosen rows, then rejected rows
    assert input_ids[0, : len(dataset[0]["chosen_input_ids"])].tolist() == dataset[0]["chosen_input_ids"]
    assert input_ids[2, : len(dataset[0]["rejected_input_ids"])].tolist() == dataset[0]["rejected_input_ids"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(needle_kinds=["passkey", "multi"], rejection_kinds=["distractor"]),
            "'passkey' has no applicable rejection",
        ),
        (dict(rejection_kinds=["made_up"]), "rejection_kinds must be a non-empty subset"),
        (dict(context_tokens=200), "context_tokens=200 is too small"),
    ],
)
def test_dpo_bad_arguments_name_the_field(byte_tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        needle_dpo_dataset(byte_tok, **(dict(num_samples=4, context_tokens=600) | kwargs))


def test_datasets_with_the_llama3_tokenizer(llama3_tok):
    sft = needle_sft_dataset(llama3_tok, num_samples=3, context_tokens=400, needle_kinds=["passkey", "kv", "multi"])
    for i in range(3):
        item = sft[i]
        assert 400 - SLACK <= len(item["tokens"]) <= 400
        trained = llama3_tok.decode([t for t in item["labels"] if t != CROSS_ENTROPY_IGNORE_IDX])
        assert trained.strip().endswith(sft.needle_sample(i).answer)
    dpo = NeedleDPODataset(llama3_tok, num_samples=3, context_tokens=400, needle_kinds=["multi"])
    item = dpo[0]
    assert item["chosen_input_ids"] != item["rejected_input_ids"]
    assert abs(len(item["chosen_input_ids"]) - len(item["rejected_input_ids"])) <= 1
