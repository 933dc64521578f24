"""ByteTokenizer: Torchtune tokenizer contract, truncation, and the saved HF files (transformers and vLLM)."""

import json
import random
import subprocess
from pathlib import Path

import pytest
from torchtune.data import Message
from torchtune.data._utils import truncate

from mla_components.data import ByteTokenizer, byte_tokenizer
from tests._requirements import require_module, unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"

TEXTS = ["", "hello", "  leading and trailing  ", "héllo wörld — 世界 🙂\n\ttabs", "<|eot_id|> is literal text"]

CHATS = [
    [{"role": "user", "content": "What is the pass key?"}, {"role": "assistant", "content": "71432"}],
    [
        {"role": "system", "content": "  Answer briefly. "},
        {"role": "user", "content": "hi there\n"},
        {"role": "assistant", "content": "héllo 🙂"},
        {"role": "user", "content": "again?"},
        {"role": "assistant", "content": " yes "},
    ],
    [{"role": "user", "content": "only a question"}],
]


def to_messages(chat):
    return [Message(role=m["role"], content=m["content"], masked=m["role"] != "assistant") for m in chat]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("byte_tok")
    tokenizer.save_hf_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    transformers = require_module("transformers", 'pip install -e ".[dev]"')
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def test_special_ids_are_outside_bytes_and_fit_mla_tiny_vocab(tokenizer):
    specials = [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.start_header_id]
    specials += [tokenizer.end_header_id, tokenizer.eot_id]
    assert len(set(specials)) == len(specials)
    assert min(specials) >= 256 and tokenizer.pad_id != 0
    assert tokenizer.vocab_size == max(specials) + 1 <= 512
    assert set(tokenizer.stop_tokens) == {tokenizer.eos_id, tokenizer.eot_id}
    assert set(tokenizer.special_tokens.values()) == set(specials)


@pytest.mark.parametrize("text", TEXTS, ids=["empty", "ascii", "spaces", "unicode", "special_names"])
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_bos=False, add_eos=False) == ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=False) == f"<|begin_of_text|>{text}<|end_of_text|>"


def test_decode_rejects_unknown_ids(tokenizer):
    with pytest.raises(ValueError, match="not in the byte tokenizer's vocabulary"):
        tokenizer.decode([104, tokenizer.vocab_size + 3])


def test_tokenize_messages_format_and_mask(tokenizer):
    messages = to_messages(CHATS[0])
    tokens, mask = tokenizer.tokenize_messages(messages)
    t = tokenizer
    user = [t.start_header_id, *b"user", t.end_header_id, *b"\n\n", *b"What is the pass key?", t.eot_id]
    assistant = [t.start_header_id, *b"assistant", t.end_header_id, *b"\n\n", *b"71432", t.eot_id]
    assert tokens == [t.bos_id, *user, *assistant, t.eos_id]
    assert mask == [True] * (1 + len(user)) + [False] * len(assistant) + [True]
    # Generation prompt: an empty assistant message without end tokens stops where the answer starts.
    prompt, prompt_mask = tokenizer.tokenize_messages(
        [*messages[:1], Message(role="assistant", content="")], add_end_tokens=False
    )
    assert prompt == tokens[: len(prompt)] and prompt == [t.bos_id, *user, *assistant[: 4 + len(b"assistant")]]
    assert len(prompt_mask) == len(prompt)


def test_call_is_torchtune_transform(tokenizer):
    sample = tokenizer({"messages": to_messages(CHATS[1]), "extra": 1})
    assert set(sample) == {"tokens", "mask", "extra"}
    assert (sample["tokens"], sample["mask"]) == tokenizer.tokenize_messages(to_messages(CHATS[1]))
    inference = tokenizer({"messages": to_messages(CHATS[0])}, inference=True)
    assert inference["tokens"][-1] != tokenizer.eos_id
    assert inference["tokens"] == tokenizer.tokenize_messages(to_messages(CHATS[0]), add_end_tokens=False)[0]


@pytest.mark.parametrize("max_seq_len", [5, 17, 40, 10_000])
@pytest.mark.parametrize("add_end_tokens", [True, False])
def test_max_seq_len_truncates_like_torchtune(max_seq_len, add_end_tokens):
    full, full_mask = byte_tokenizer().tokenize_messages(to_messages(CHATS[1]), add_end_tokens=add_end_tokens)
    tokens, mask = byte_tokenizer(max_seq_len=max_seq_len).tokenize_messages(
        to_messages(CHATS[1]), add_end_tokens=add_end_tokens
    )
    eos = byte_tokenizer().eos_id if add_end_tokens else None
    assert tokens == truncate(full, max_seq_len, eos)
    assert mask == truncate(full_mask, max_seq_len, True if add_end_tokens else None)
    assert len(tokens) == min(len(full), max_seq_len)


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="max_seq_len"):
        byte_tokenizer(max_seq_len=1)
    with pytest.raises(FileNotFoundError, match="path="):
        byte_tokenizer(path=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="special_tokens"):
        ByteTokenizer(special_tokens={"<|begin_of_text|>": 3})
    with pytest.raises(ValueError, match="image"):
        byte_tokenizer().tokenize_messages([Message(role="user", content=[{"type": "image", "content": None}])])


def test_saved_files_load_back(tokenizer, hf_dir):
    assert {p.name for p in hf_dir.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|pad|>",
    )
    for path in (hf_dir, hf_dir / "tokenizer.json"):
        loaded = byte_tokenizer(path=str(path))
        assert loaded.special_tokens == tokenizer.special_tokens
        assert loaded.encode(TEXTS[3]) == tokenizer.encode(TEXTS[3])


def test_load_rejects_a_non_byte_tokenizer_json(tmp_path):
    tokenizers = require_module("tokenizers", 'pip install -e ".[dev]"')
    other = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a byte-level tokenizer"):
        byte_tokenizer(path=str(tmp_path))


def test_custom_special_ids_survive_save_and_load(tmp_path):
    custom = {name: 300 + 2 * i for i, name in enumerate(ByteTokenizer().special_tokens)}
    ByteTokenizer(special_tokens=custom).save_hf_tokenizer(tmp_path)
    assert byte_tokenizer(path=str(tmp_path)).special_tokens == custom


@pytest.mark.parametrize("text", TEXTS[:4], ids=["empty", "ascii", "spaces", "unicode"])
def test_transformers_encodes_like_us(tokenizer, hf_tokenizer, text):
    # HF adds only bos (Llama-3 convention) so completion prompts stay open.
    assert hf_tokenizer.encode(text) == tokenizer.encode(text, add_eos=False)
    assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_bos=False, add_eos=False)
    assert hf_tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_transformers_decodes_random_bytes_like_us(tokenizer, hf_tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(256) for _ in range(rng.randrange(1, 24))]
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(tokenizer.stop_tokens + [tokenizer.bos_id]))
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids), ids


@pytest.mark.parametrize("chat", CHATS, ids=["one_turn", "multi_turn_system", "user_only"])
def test_transformers_chat_template_matches_tokenize_messages(tokenizer, hf_tokenizer, chat):
    ours, _ = tokenizer.tokenize_messages(to_messages(chat))
    theirs = hf_tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=False)["input_ids"]
    assert theirs == ours
    prompt, _ = tokenizer.tokenize_messages(
        [*to_messages(chat), Message(role="assistant", content="")], add_end_tokens=False
    )
    theirs = hf_tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert theirs == prompt


def test_vllm_loads_and_encodes_like_us(tokenizer, hf_dir):
    if not VLLM_PYTHON.exists():
        unavailable(f"vLLM venv not installed at {VLLM_PYTHON} (make serve-setup)")
    script = (
        "import json, sys\n"
        "from vllm.tokenizers import get_tokenizer\n"
        "tok = get_tokenizer(sys.argv[1])\n"
        "chats, texts = json.loads(sys.argv[2]), json.loads(sys.argv[3])\n"
        "print(json.dumps({'prompts': [tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True)"
        "['input_ids'] for c in chats], 'texts': [tok.encode(t) for t in texts],"
        " 'decoded': [tok.decode(tok.encode(t), skip_special_tokens=True) for t in texts]}))\n"
    )
    result = subprocess.run(
        [str(VLLM_PYTHON), "-c", script, str(hf_dir), json.dumps(CHATS), json.dumps(TEXTS[:4])],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    expected = [
        tokenizer.tokenize_messages([*to_messages(c), Message(role="assistant", content="")], add_end_tokens=False)[0]
        for c in CHATS
    ]
    assert out["prompts"] == expected
    assert out["texts"] == [tokenizer.encode(t, add_eos=False) for t in TEXTS[:4]]
    assert out["decoded"] == TEXTS[:4]
